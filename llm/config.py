"""The config schema (dataclasses) and the one entry point to configs: `load_config`.

A YAML file may list other YAML files under `defaults:`; they are merged first, in order, then the
file itself, then dotlist overrides (`optim.lr=3e-4`). An include is looked up relative to the
including file, then under the config root: `$LLM_CONFIG_ROOT` if set, else `configs/` in the
current directory (so installed or not, `python -m llm train configs/...` from a checkout works).
Everything is validated against the schema here, so an unknown key, a wrong type or an impossible
combination fails at load time with the key's dotted path.

Dependencies point one way: this module imports the model's schema and validation
(`llm.model.spec`, which asks the mixer registry) and the optimizer's group names (`llm.optim`);
neither llm.model nor llm.optim imports this module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm.model.spec import ModelConfig, model_spec
from llm.model.wrap import checkpointed_blocks
from llm.optim import GROUPS
from llm.schema import ConfigError, at_least, check, in_range, one_of, optional, positive, typed_merge

__all__ = ["Config", "ConfigError", "ModelConfig", "build_config", "config_root", "load_config", "model_config",
           "save_config"]


def config_root() -> Path:
    """Where includes not found next to the including file are looked up."""
    return Path(os.environ.get("LLM_CONFIG_ROOT", "configs")).resolve()


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
    # no token attends to or carries state across an EOS into the next document (the model gets
    # doc_start = llm.data.doc_starts(tokens, eos_id)); false: windows flow across documents
    doc_mask: bool = False
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
    keep_best: bool = True  # pruning keeps the checkpoint with the best held-out loss too
    skip_nonfinite: int = 0  # non-finite steps (update skipped) tolerated before the run stops
    spike_window: int = 50  # loss-spike detector: steps of loss history
    spike_zscore: float = 6.0  # a step's loss this many std above the window's mean is a spike (0: off)
    resume: str = "none"  # none | auto | path to a checkpoint tag directory
    init_from: Optional[str] = None  # a Llama / Qwen3 checkpoint directory to start from (not on resume)
    # Load checkpoint files that pickle more than tensors and DeepSpeed's own types (unpickling runs
    # their code): only for checkpoints from a trusted source.
    trust_checkpoint: bool = False
    zero_stage: int = 1
    seed: int = 1234
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    z_loss: float = 0.0  # coefficient of logsumexp(logits)^2
    compile: bool = False  # torch.compile each block
    activation_checkpointing: str = "none"  # none | full | every:N (blocks 0, N, 2N, ... recomputed in backward)
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


def _betas(b) -> bool:
    return len(b) == 2 and all(0 <= x < 1 for x in b)


# Each value's constraint: dotted key -> (predicate, what was expected). The model section's are
# in llm.model.spec (SHAPE); cross-key rules are in `validate`.
CONSTRAINTS = {
    "data.seq_len": positive("an integer"),
    "data.bi_induct.mode": one_of("none", "forward", "backward", "balanced"),
    "data.bi_induct.rate": in_range(0, 1, open_hi=True),
    "data.bi_induct.anneal": one_of("none", "linear"),
    "data.bi_induct.seed": at_least(0, "an integer"),
    "data.bi_induct.apply": one_of("online", "prep"),
    "optim.lr": positive(),
    "optim.weight_decay": at_least(0),
    "optim.betas": (_betas, "[beta1, beta2], each 0 <= beta < 1"),
    "optim.eps": positive(),
    "optim.warmup_steps": at_least(0, "an integer"),
    "optim.schedule": one_of("cosine", "wsd", "constant"),
    "optim.min_lr_ratio": in_range(0, 1),
    "optim.decay_fraction": in_range(0, 1, open_lo=True),
    "optim.grad_clip": at_least(0),  # 0: no clipping
    **{f"train.{key}": positive("an integer")
       for key in ("max_steps", "global_batch_size", "micro_batch_size", "eval_every", "ckpt_every", "keep_last")},
    "train.time_limit": optional(positive("seconds")),
    "train.zero_stage": one_of(0, 1, 2, 3, text="0, 1, 2 or 3"),
    "train.seed": at_least(0, "an integer"),
    "train.dtype": one_of("auto", "fp32", "bf16"),
    "train.z_loss": at_least(0),
    "train.dist_timeout": positive("seconds"),
    "train.skip_nonfinite": at_least(0, "an integer"),
    "train.spike_window": at_least(2, "an integer"),
    "train.spike_zscore": at_least(0, "a number", " (0: off)"),
    "eval.windows": at_least(0, "an integer", " (0 = the whole val split)"),
    "logging.log_every": positive("an integer"),
    "logging.wandb": one_of("offline", "online", "disabled"),
    "logging.peak_flops": optional(positive()),
}
GROUP_OPTIONS = {"weight_decay": at_least(0), "lr_scale": positive()}  # optim.groups.<group>.<option>


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
    root = config_root()
    for candidate in (base / name, root / name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"defaults: include '{name}' not found next to {base} or under {root} "
                      f"(the config root: $LLM_CONFIG_ROOT, else ./configs)")


def _parse_overrides(overrides) -> DictConfig:
    """Dotlist overrides (`optim.lr=3e-4`) as one node; each bad one fails naming itself."""
    node = OmegaConf.create()
    for override in overrides:
        key, eq, _ = override.partition("=")
        if not eq or not all(key.split(".")):
            raise ConfigError(f"override {override!r}: expected key=value with a dotted key of non-empty "
                              f"names, e.g. optim.lr=3e-4")
        try:
            node = OmegaConf.merge(node, OmegaConf.from_dotlist([override]))
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            reason = " ".join(line.strip() for line in str(e).splitlines() if "<unicode string>" not in line)
            raise ConfigError(f"override {override!r}: the value is not valid YAML ({reason}); close its "
                              f"brackets (e.g. optim.betas=[0.9,0.95]) or quote a literal string") from None
    return node


def build_config(*nodes) -> DictConfig:
    """Validate plain dicts / DictConfigs against the schema (later ones win)."""
    cfg = typed_merge(Config, *nodes)
    validate(cfg)
    return cfg


def load_config(path, overrides=()) -> DictConfig:
    """Load a YAML config (with includes), apply dotlist overrides, validate, return it."""
    return build_config(_read_yaml(Path(path).resolve()), _parse_overrides(overrides))


def model_config(model_cfg) -> DictConfig:
    """A validated model config (DictConfig) from a ModelConfig, a DictConfig or a plain dict."""
    node = typed_merge(ModelConfig, model_cfg if model_cfg is not None else {}, prefix="model.")
    model_spec(node)
    return node


def validate(cfg: DictConfig) -> None:
    check(cfg, CONSTRAINTS)
    spec = model_spec(cfg.model)  # the model section: shape, mixer names and options (llm.model.spec)
    used = list(dict.fromkeys(name for name, _ in spec.layers))
    for name in cfg.model.mixer_args:
        if name not in used:
            raise ConfigError(f"model.mixer_args.{name}: options of a mixer this model does not use "
                              f"(its layers use: {', '.join(used)}); remove them or use {name} in "
                              f"model.mixer / model.layer_pattern")
    t = cfg.train
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}")
    if t.compile and t.zero_stage == 3:
        raise ConfigError("train.compile with train.zero_stage=3: ZeRO-3 gathers each parameter outside the "
                          "compiled blocks, which torch.compile cannot trace; use zero_stage 1 or 2, or compile off")
    if t.skip_nonfinite and t.zero_stage == 0:
        raise ConfigError("train.skip_nonfinite needs train.zero_stage >= 1: only DeepSpeed's ZeRO optimizers "
                          "skip the update of a step with a non-finite gradient norm")
    try:
        checkpointed_blocks(t.activation_checkpointing, cfg.model.n_layers)
    except ValueError as e:
        raise ConfigError(f"train.activation_checkpointing: {e}") from None
    if t.stop_at_step is not None and not 0 < t.stop_at_step <= t.max_steps:
        raise ConfigError(f"train.stop_at_step={t.stop_at_step}: expected 1..train.max_steps ({t.max_steps})")
    if not (t.resume in ("none", "auto") or os.path.isdir(t.resume)):
        raise ConfigError(f"train.resume: got {t.resume!r}, expected none, auto or an existing checkpoint directory")
    lo, hi = (list(cfg.data.bi_induct.span) + [None, None])[:2]
    if lo is None or hi is None or not 1 <= lo <= hi:
        raise ConfigError(f"data.bi_induct.span: expected [lo, hi] with 1 <= lo <= hi, got {list(cfg.data.bi_induct.span)}")
    for name, opts in cfg.optim.groups.items():
        if name not in GROUPS:
            raise ConfigError(f"optim.groups.{name}: unknown group; expected one of {', '.join(GROUPS)}")
        for k, v in opts.items():
            if k not in GROUP_OPTIONS:
                raise ConfigError(f"optim.groups.{name}.{k}: unknown option; expected {', '.join(GROUP_OPTIONS)}")
            ok, expected = GROUP_OPTIONS[k]
            if not isinstance(v, (int, float)) or not ok(v):
                raise ConfigError(f"optim.groups.{name}.{k}: got {v!r}, expected {expected}")


def save_config(cfg: DictConfig, path) -> None:
    from llm.files import atomic_path

    with atomic_path(str(path)) as tmp:
        OmegaConf.save(cfg, tmp, resolve=True)
