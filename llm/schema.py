"""What the config loader (llm.config) and the model's spec (llm.model.spec) share: the error type,
the typed merge of values into a dataclass schema, whose errors name the dotted key, and the
declarative value constraints (`check` over a table of dotted key -> (predicate, expected)).

A leaf module, so that llm.config can depend on llm.model (for the model's schema and its mixer
registry) while nothing under llm.model imports llm.config.
"""
import dataclasses
import math

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


# A constraint is (predicate, what was expected); `check` applies a table of dotted key -> constraint.
def at_least(lo, what: str = "a number", note: str = "") -> tuple:
    return (lambda v: math.isfinite(v) and v >= lo), f"{what} >= {lo}{note}"


def positive(what: str = "a number") -> tuple:
    return (lambda v: math.isfinite(v) and v > 0), f"{what} > 0"


def in_range(lo, hi, *, open_hi: bool = False, open_lo: bool = False) -> tuple:
    """lo <= v <= hi, each end open on request."""
    def ok(v):
        return (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)
    return ok, f"{lo} {'<' if open_lo else '<='} value {'<' if open_hi else '<='} {hi}"


def one_of(*allowed, text: str = None) -> tuple:
    return (lambda v: v in allowed), text or f"one of {', '.join(map(str, allowed))}"


def optional(constraint: tuple) -> tuple:
    ok, expected = constraint
    return (lambda v: v is None or ok(v)), f"{expected}, or null"


def check(cfg, table: dict, prefix: str = "") -> None:
    """Raise ConfigError naming the first key of `table` whose value in `cfg` breaks its constraint."""
    for key, (ok, expected) in table.items():
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ConfigError(f"{prefix}{key}: got {value!r}, expected {expected}")
