"""What the config loader (llm.config) and the model's spec (llm.model.spec) share: the error type
and the typed merge of values into a dataclass schema, whose errors name the dotted key.

A leaf module, so that llm.config can depend on llm.model (for the model's schema and its mixer
registry) while nothing under llm.model imports llm.config.
"""
import dataclasses

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config value is missing, unknown, mistyped or inconsistent; the message names the key."""


def typed_merge(schema, *nodes, prefix: str = "") -> DictConfig:
    """Merge dicts / DictConfigs into the dataclass `schema` (later nodes win), turning omegaconf's
    errors into ConfigError naming `prefix` + the dotted key and, for an unknown key, the allowed ones."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), *nodes)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        if "not in struct" in msg or "Key '" in msg and "not in" in msg:
            allowed = _allowed_keys(schema, key)
            msg = f"unknown key; allowed here: {', '.join(allowed)}" if allowed else msg
        raise ConfigError(f"{prefix}{key}: {msg}") from None


def _allowed_keys(schema, dotted: str) -> list[str]:
    node = schema if dataclasses.is_dataclass(schema) else type(schema)
    for part in dotted.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return []
        ftype = fields[part].default_factory() if fields[part].default_factory is not dataclasses.MISSING else None
        if not dataclasses.is_dataclass(ftype):
            return []
        node = type(ftype)
    return [f.name for f in dataclasses.fields(node)]
