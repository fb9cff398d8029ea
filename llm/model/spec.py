"""The model's config schema (`ModelConfig`) and what a model is built from (`ModelSpec`).

`model_spec` resolves a ModelConfig, a DictConfig or a plain dict of its fields once into a frozen
ModelSpec of plain values: the shape, one (mixer name, typed options) pair per layer and the kernel
backend. Modules read only the spec, so nothing on the forward path touches OmegaConf.

Dependency direction: llm.config imports this module (the model section's schema and validation);
nothing under llm.model imports llm.config. Errors are `llm.schema.ConfigError` naming the dotted key.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm.model.mixers import MIXERS
from llm.schema import ConfigError, check, one_of, optional, positive, typed_merge

KERNELS = ("auto", "torch", "fla")


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # grouped-query attention; None = n_heads
    mlp_hidden: Optional[int] = None  # SwiGLU width; None = 8/3 d_model rounded up to 64
    mixer: str = "softmax"
    layer_pattern: Optional[List[str]] = None  # cycled over the layers; None = [mixer]
    mixer_args: Dict[str, Any] = field(default_factory=dict)  # mixer_args.<name>.<option>
    qk_norm: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = True
    # auto: the fast GPU path where the inputs are CUDA bf16/fp16 and the library is installed
    # (fla for linear mixers, flash-attn or SDPA for attention), else the torch reference;
    # torch: always the reference; fla: require the fast path (error on other inputs): fla's
    # kernels, flash-attn for attention where installed, else SDPA restricted to its flash kernel.
    kernels: str = "auto"


@dataclass(frozen=True)
class ModelSpec:
    """Plain, resolved values: `n_kv_heads` and `mlp_hidden` are filled in, `layers` holds each
    layer's (mixer name, its `Args` instance)."""
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden: int
    qk_norm: bool
    rope_theta: float
    norm_eps: float
    init_std: float
    tie_embeddings: bool
    kernels: str
    layers: tuple

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def model_spec(model_cfg, prefix: str = "model.") -> ModelSpec:
    """The validated ModelSpec of a ModelSpec (returned as is), a ModelConfig, a DictConfig or a
    plain dict of ModelConfig's fields (missing ones take their defaults)."""
    if isinstance(model_cfg, ModelSpec):
        return model_cfg
    m = typed_merge(ModelConfig, model_cfg if model_cfg is not None else {}, prefix=prefix)
    _check_shape(m, prefix)
    args = {name: _mixer_args(m, name, prefix) for name in _mixer_names(m, prefix)}
    pattern = list(m.layer_pattern or [m.mixer])
    names = [pattern[i % len(pattern)] for i in range(m.n_layers)]
    return ModelSpec(
        vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads or m.n_heads, mlp_hidden=m.mlp_hidden or 64 * math.ceil(8 * m.d_model / 3 / 64),
        qk_norm=m.qk_norm, rope_theta=m.rope_theta, norm_eps=m.norm_eps, init_std=m.init_std,
        tie_embeddings=m.tie_embeddings, kernels=m.kernels, layers=tuple((n, args[n]) for n in names))


SHAPE = {
    "kernels": one_of(*KERNELS),
    **{key: positive("an integer") for key in ("vocab_size", "d_model", "n_layers", "n_heads")},
    "mlp_hidden": optional(positive("an integer")),
    "rope_theta": positive(),
    "norm_eps": positive(),
    "init_std": positive(),
}


def _check_shape(m: DictConfig, prefix: str) -> None:
    check(m, SHAPE, prefix)
    if m.d_model % m.n_heads:
        raise ConfigError(f"{prefix}d_model={m.d_model} is not divisible by {prefix}n_heads={m.n_heads}")
    if m.n_kv_heads is not None and (m.n_kv_heads <= 0 or m.n_heads % m.n_kv_heads):
        raise ConfigError(f"{prefix}n_kv_heads={m.n_kv_heads} must divide {prefix}n_heads={m.n_heads}")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"{prefix}d_model / n_heads must be even for rotary embeddings")


def _mixer_names(m: DictConfig, prefix: str) -> list[str]:
    """Every mixer the config names (its default, its pattern, its mixer_args), each checked."""
    registered = ", ".join(sorted(MIXERS))
    if m.layer_pattern is not None and len(m.layer_pattern) == 0:
        raise ConfigError(f"{prefix}layer_pattern: expected a non-empty list of mixer names or null")
    named = [(f"{prefix}mixer", m.mixer)]
    named += [(f"{prefix}layer_pattern[{i}]", n) for i, n in enumerate(m.layer_pattern or [])]
    for key, name in named:
        if name not in MIXERS:
            raise ConfigError(f"{key}: unknown mixer {name!r}; registered: {registered}")
    for name, options in m.mixer_args.items():
        if name not in MIXERS:
            raise ConfigError(f"{prefix}mixer_args.{name}: unknown mixer; registered: {registered}")
        if not isinstance(options, (dict, DictConfig)):
            raise ConfigError(f"{prefix}mixer_args.{name}: expected a mapping of options")
    return list(dict.fromkeys([n for _, n in named] + list(m.mixer_args)))


def _mixer_args(m: DictConfig, name: str, prefix: str):
    """The typed options of mixer `name` (its frozen `Args` dataclass) with the config's values applied."""
    schema = MIXERS[name].Args
    try:
        node = OmegaConf.merge(OmegaConf.structured(schema), m.mixer_args.get(name, {}) or {})
    except OmegaConfBaseException as e:
        allowed = ", ".join(f.name for f in dataclasses.fields(schema)) or "(none)"
        raise ConfigError(f"{prefix}mixer_args.{name}.{getattr(e, 'full_key', '?')}: "
                          f"{str(e).splitlines()[0]}; options: {allowed}") from None
    args = OmegaConf.to_object(node)
    try:
        args.check(m)
    except ValueError as e:
        raise ConfigError(f"{prefix}mixer_args.{name}: {e}") from None
    return args
