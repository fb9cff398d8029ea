"""The config schema (dataclasses) and the one entry point to configs: `load_config`.

A YAML file may list other YAML files under `defaults:` (paths relative to that file, or to
`configs/`); they are merged first, in order, then the file itself, then dotlist overrides
(`optim.lr=3e-4`). Everything is validated against the schema here, so an unknown key, a wrong
type or an impossible combination fails at load time with the key's dotted path.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config value is missing, unknown, mistyped or inconsistent; the message names the key."""


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
    kernels: str = "auto"  # auto | torch | fla: fast GPU kernels where available, or force one


@dataclass
class BiInductConfig:
    mode: str = "none"  # none | forward | backward | balanced
    rate: float = 0.5  # fraction of tokens inside snippets (at the start of training if annealed)
    anneal: str = "none"  # none | linear (to zero over train.max_steps)
    span: List[int] = field(default_factory=lambda: [20, 20])  # snippet half length L ~ U[lo, hi]
    seed: int = 0
    apply: str = "online"  # online (in the loader) | prep (shards already rewritten)


@dataclass
class DataConfig:
    path: str = "data/pydocs"  # a directory written by `python -m data_prep tokenize`
    seq_len: int = 256
    bi_induct: BiInductConfig = field(default_factory=BiInductConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd | constant
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: fraction of max_steps spent decaying
    grad_clip: float = 1.0
    independent_wd: bool = False  # decay by schedule_t * wd instead of lr_t * wd
    groups: Dict[str, Any] = field(default_factory=dict)  # groups.<name>.{weight_decay,lr_scale}


@dataclass
class BudgetConfig:
    tokens: Optional[float] = None
    flops: Optional[float] = None
    accelerator_hours: Optional[float] = None
    reference_device: Optional[str] = None  # key into the bench results for accelerator_hours


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    max_steps: int = 1000
    stop_at_step: Optional[int] = None  # end this job early (checkpoint, exit 0), schedule unchanged
    time_limit: Optional[float] = None  # seconds of wall clock; checkpoint and exit before it
    global_batch_size: int = 32  # sequences per optimizer step, for any number of ranks
    micro_batch_size: int = 8  # sequences per rank per forward
    eval_every: int = 100
    ckpt_every: int = 500
    keep_last: int = 2
    resume: str = "none"  # none | auto | path to a checkpoint tag directory
    zero_stage: int = 1
    seed: int = 1234
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    z_loss: float = 0.0  # coefficient of logsumexp(logits)^2
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    dist_timeout: float = 600.0  # seconds a collective may wait before the job fails


@dataclass
class EvalConfig:
    windows: int = 128  # held-out windows per evaluation (0 = all)
    final: bool = True  # evaluate once more at the end of training


@dataclass
class LoggingConfig:
    log_every: int = 10
    wandb: str = "offline"  # offline | online | disabled
    project: str = "llm"
    run_name: Optional[str] = None
    progress: bool = True  # progress bar on rank 0
    peak_flops: Optional[float] = None  # per device, for MFU; None = known GPU table or a CPU probe


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


CHOICES = {
    "model.kernels": ("auto", "torch", "fla"),
    "data.bi_induct.mode": ("none", "forward", "backward", "balanced"),
    "data.bi_induct.anneal": ("none", "linear"),
    "data.bi_induct.apply": ("online", "prep"),
    "optim.schedule": ("cosine", "wsd", "constant"),
    "train.dtype": ("auto", "fp32", "bf16"),
    "logging.wandb": ("offline", "online", "disabled"),
}


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Load one YAML file with its `defaults:` includes merged underneath it."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"config include cycle: {' -> '.join(map(str, seen + (path,)))}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    includes = node.pop("defaults", [])
    if not isinstance(includes, (list, ListConfig)):
        raise ConfigError(f"{path}: defaults: expected a list of YAML paths")
    merged = OmegaConf.create()
    for inc in includes:
        inc_path = _resolve_include(str(inc), path.parent)
        merged = OmegaConf.merge(merged, _read_yaml(inc_path, seen + (path,)))
    return OmegaConf.merge(merged, node)


def _resolve_include(name: str, base: Path) -> Path:
    name = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    for candidate in (base / name, CONFIG_ROOT / name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"defaults: include '{name}' not found next to {base} or under {CONFIG_ROOT}")


def _structured_merge(schema, *nodes) -> DictConfig:
    """Merge nodes into a structured schema, turning omegaconf errors into ConfigError."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), *nodes)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        if "not in struct" in msg or "Key '" in msg and "not in" in msg:
            allowed = _allowed_keys(schema, key)
            msg = f"unknown key; allowed here: {', '.join(allowed)}" if allowed else msg
        raise ConfigError(f"{key}: {msg}") from None


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


def _parse_overrides(overrides) -> DictConfig:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r}: expected key=value, e.g. optim.lr=3e-4")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides {list(overrides)}: {e}") from None


def build_config(*nodes) -> DictConfig:
    """Validate plain dicts / DictConfigs against the schema (later ones win)."""
    cfg = _structured_merge(Config, *nodes)
    validate(cfg)
    return cfg


def load_config(path, overrides=()) -> DictConfig:
    """Load a YAML config (with includes), apply dotlist overrides, validate, return it."""
    return build_config(_read_yaml(Path(path).resolve()), _parse_overrides(overrides))


def model_config(model_cfg) -> DictConfig:
    """A validated model config from a ModelConfig, a DictConfig or a plain dict."""
    if isinstance(model_cfg, ModelConfig):
        model_cfg = dataclasses.asdict(model_cfg)
    node = _structured_merge(ModelConfig, model_cfg if model_cfg is not None else {})
    _validate_model(node, prefix="model.")
    return node


def validate(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: got {value!r}, expected one of {', '.join(allowed)}")
    _validate_model(cfg.model, prefix="model.")
    t = cfg.train
    _positive(cfg, "train.max_steps", "train.global_batch_size", "train.micro_batch_size",
              "train.eval_every", "train.ckpt_every", "train.keep_last", "data.seq_len",
              "logging.log_every")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage: got {t.zero_stage}, expected 0, 1, 2 or 3")
    if t.stop_at_step is not None and not 0 < t.stop_at_step <= t.max_steps:
        raise ConfigError(f"train.stop_at_step={t.stop_at_step}: expected 1..train.max_steps ({t.max_steps})")
    if not (t.resume in ("none", "auto") or os.path.isdir(t.resume)):
        raise ConfigError(f"train.resume: got {t.resume!r}, expected none, auto or an existing checkpoint directory")
    if cfg.optim.warmup_steps < 0 or cfg.optim.lr <= 0:
        raise ConfigError("optim.lr must be > 0 and optim.warmup_steps >= 0")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {list(cfg.optim.betas)}")
    lo, hi = (list(cfg.data.bi_induct.span) + [None, None])[:2]
    if lo is None or hi is None or not 1 <= lo <= hi:
        raise ConfigError(f"data.bi_induct.span: expected [lo, hi] with 1 <= lo <= hi, got {list(cfg.data.bi_induct.span)}")
    if not 0.0 <= cfg.data.bi_induct.rate < 1.0:
        raise ConfigError(f"data.bi_induct.rate: expected 0 <= rate < 1, got {cfg.data.bi_induct.rate}")
    from llm.optim import GROUPS  # groups are the optimizer's vocabulary
    for name, opts in cfg.optim.groups.items():
        if name not in GROUPS:
            raise ConfigError(f"optim.groups.{name}: unknown group; expected one of {', '.join(GROUPS)}")
        for k, v in opts.items():
            if k not in ("weight_decay", "lr_scale") or not isinstance(v, (int, float)):
                raise ConfigError(f"optim.groups.{name}.{k}: expected weight_decay or lr_scale with a number")


def _positive(cfg, *keys):
    for key in keys:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{key}: expected a positive number, got {OmegaConf.select(cfg, key)}")


def _validate_model(m: DictConfig, prefix: str) -> None:
    from llm.model.mixers import MIXERS

    if m.kernels not in CHOICES["model.kernels"]:
        raise ConfigError(f"{prefix}kernels: got {m.kernels!r}, expected one of auto, torch, fla")
    for key in ("vocab_size", "d_model", "n_layers", "n_heads"):
        if m[key] <= 0:
            raise ConfigError(f"{prefix}{key}: expected a positive integer, got {m[key]}")
    if m.d_model % m.n_heads:
        raise ConfigError(f"{prefix}d_model={m.d_model} is not divisible by {prefix}n_heads={m.n_heads}")
    if m.n_kv_heads is not None and (m.n_kv_heads <= 0 or m.n_heads % m.n_kv_heads):
        raise ConfigError(f"{prefix}n_kv_heads={m.n_kv_heads} must divide {prefix}n_heads={m.n_heads}")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"{prefix}d_model / n_heads must be even for rotary embeddings")
    names = [(f"{prefix}mixer", m.mixer)]
    names += [(f"{prefix}layer_pattern[{i}]", n) for i, n in enumerate(m.layer_pattern or [])]
    for key, name in names:
        if name not in MIXERS:
            raise ConfigError(f"{key}: unknown mixer {name!r}; registered: {', '.join(sorted(MIXERS))}")
    if m.layer_pattern is not None and len(m.layer_pattern) == 0:
        raise ConfigError(f"{prefix}layer_pattern: expected a non-empty list of mixer names or null")
    for name, args in m.mixer_args.items():
        if name not in MIXERS:
            raise ConfigError(f"{prefix}mixer_args.{name}: unknown mixer; registered: {', '.join(sorted(MIXERS))}")
        if not isinstance(args, (dict, DictConfig)):
            raise ConfigError(f"{prefix}mixer_args.{name}: expected a mapping of options")
        mixer_args(m, name, prefix=prefix)


def mixer_args(m: DictConfig, name: str, prefix: str = "model."):
    """The typed options of mixer `name` (its `Args` dataclass) with the config's values applied."""
    from llm.model.mixers import MIXERS

    schema = MIXERS[name].Args
    try:
        node = OmegaConf.merge(OmegaConf.structured(schema), m.mixer_args.get(name, {}) or {})
    except OmegaConfBaseException as e:
        allowed = ", ".join(f.name for f in dataclasses.fields(schema)) or "(none)"
        raise ConfigError(f"{prefix}mixer_args.{name}.{getattr(e, 'full_key', '?')}: "
                          f"{str(e).splitlines()[0]}; options: {allowed}") from None
    args = OmegaConf.to_object(node)
    check = getattr(args, "check", None)
    if check is not None:
        try:
            check(m)
        except ValueError as e:
            raise ConfigError(f"{prefix}mixer_args.{name}: {e}") from None
    return args


def save_config(cfg: DictConfig, path) -> None:
    from llm.files import atomic_path

    with atomic_path(str(path)) as tmp:
        OmegaConf.save(cfg, tmp, resolve=True)
