"""The training step, shared by the trainer, `llm bench` and the synthetic probes.

`build_engine` makes the DeepSpeed engine exactly as the trainer runs it (parameter groups, the
generated DeepSpeed config, the LR schedule); `train_step` is one optimizer step on it. The probes
train many small models in one process, which DeepSpeed cannot (its process groups and engine
state are module globals), so they run the same `train_step` on `PlainEngine`, the few engine
methods the step uses over a plain torch optimizer.
"""
import torch
import torch.nn.functional as F

from llm.config import ConfigError
from llm.data.docs import doc_starts
from llm.model.wrap import apply_training_options
from llm.optim import describe_groups, lr_schedule, param_groups


def lm_loss(logits, targets, z_loss: float = 0.0):
    """(loss to optimize, cross-entropy): mean next-token CE over targets that are not -100
    (cross_entropy's ignore_index: unlabelled positions) plus z_loss * mean logsumexp^2."""
    logits = logits.float().flatten(0, 1)
    ce = F.cross_entropy(logits, targets.flatten())
    if not z_loss:
        return ce, ce
    return ce + z_loss * torch.logsumexp(logits, dim=-1).pow(2).mean(), ce


def resolve_dtype(train_cfg) -> str:
    return train_cfg.dtype if train_cfg.dtype != "auto" else ("bf16" if torch.cuda.is_available() else "fp32")


def ds_config(cfg, world: int, dtype: str, load_universal: bool = False) -> dict:
    t, o = cfg.train, cfg.optim
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size "
            f"({t.micro_batch_size}) x data-parallel ranks ({world})")
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // per_step,
        "gradient_clipping": o.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            "torch_adam": True, "adam_w_mode": True}},
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": dtype == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


def build_engine(cfg, model, world: int, max_steps: int, load_universal: bool = False):
    """(DeepSpeed engine, param-group rows for the run directory, LR schedule) for `model`.

    The process group must be up (llm.distributed.init). train.compile and
    train.activation_checkpointing are applied to `model` here, so the trainer and bench both get them."""
    import deepspeed

    apply_training_options(model, compile=cfg.train.compile,
                           activation_checkpointing=cfg.train.activation_checkpointing)
    groups = param_groups(model, cfg.optim)
    group_rows = describe_groups(groups, cfg.optim)  # before the scheduler scales the group LRs
    schedule = lr_schedule(cfg.optim, max_steps)
    config = ds_config(cfg, world, resolve_dtype(cfg.train), load_universal)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return engine, group_rows, schedule


def to_device(tensor, device):
    """A batch on `device`; from the host to CUDA through pinned memory without blocking the host,
    so the copy queues behind the device's work instead of waiting for it."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def forward(engine, x, eos_id=None, **loss_args):
    """Logits of inputs `x`, or with `targets=` (and `z_loss=`) the model's (loss, cross-entropy);
    with `eos_id` (data.doc_mask), every token after an EOS starts a document that sees nothing
    before it."""
    x = to_device(x, engine.device)
    return engine(x, doc_start=None if eos_id is None else doc_starts(x, eos_id), **loss_args)


def train_step(engine, micro_batch, accum: int, z_loss: float = 0.0, eos_id=None) -> dict:
    """One optimizer step over `accum` micro-batches, `micro_batch(i) -> (inputs, targets)` on the
    host; the engine applies the update after the last (its gradient accumulation). Returns the
    mean cross-entropy and z-loss term over the micro-batches, and the last one's cross-entropy.

    Nothing waits for the device until the step's one read of these numbers at the end: micro-batch
    i + 1 is read and its copy queued while the device still runs micro-batch i."""
    device = engine.device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # cross-entropy, z-loss term, on the device
    x, y = micro_batch(0)
    batch = to_device(x, device), to_device(y, device)
    for i in range(accum):
        x, y = batch
        loss, ce = forward(engine, x, eos_id, targets=y, z_loss=z_loss)
        engine.backward(loss)
        engine.step()
        if i + 1 < accum:  # queued behind this micro-batch's work
            nx, ny = micro_batch(i + 1)
            batch = to_device(nx, device), to_device(ny, device)
        sums += torch.stack([ce.detach(), (loss - ce).detach()]).double()
    ce_mean, z_mean, last_ce = torch.cat([sums / accum, ce.detach().double()[None]]).tolist()
    return {"ce": ce_mean, "z": z_mean, "last_ce": last_ce}


class PlainEngine:
    """What `train_step` needs of a DeepSpeed engine, over torch AdamW on one process: forward,
    backward, and a step that clips, updates, advances the LR schedule and clears the gradients
    (one micro-batch per step)."""

    def __init__(self, model, optim_cfg, max_steps: int):
        self.module, self.clip = model, optim_cfg.grad_clip
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(param_groups(model, optim_cfg), betas=tuple(optim_cfg.betas),
                                           eps=optim_cfg.eps)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(optim_cfg, max_steps))

    def __call__(self, x, doc_start=None, **loss_args):
        return self.module(x, doc_start=doc_start, **loss_args)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
