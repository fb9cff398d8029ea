"""Parameter groups by role (decoupled weight decay) and learning-rate schedules.

Every parameter declares its role where it is defined (`llm.model.roles.set_role`); here roles
become optimizer groups with their own weight decay and learning-rate scale, so the attention
products (roles qk, vo) can be decayed differently from the rest: L2 on the factors of W_Q^T W_K
or W_O W_V acts as a nuclear-norm penalty on the product and drives it towards low rank.

AdamW applies decay decoupled from the gradient: p -= lr_t * wd * p. With `optim.independent_wd`
(Wortsman et al. 2023) the decay follows the schedule but not the peak LR: p -= schedule_t * wd * p
(implemented by dividing wd by the group's peak LR), so sensible values are ~ lr x the usual wd
(e.g. 1e-4), and changing the LR no longer changes the decay.
"""
import math

from llm.model.roles import ROLES, param_role

GROUPS = ROLES
DECAYED = tuple(g for g in GROUPS if g != "no_decay")


def param_groups(model, optim_cfg) -> list[dict]:
    """One dict per non-empty role: name, params, weight_decay, lr (peak x lr_scale)."""
    by_role = {g: [] for g in GROUPS}
    undeclared = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role = param_role(p)
        if role is None:
            undeclared.append(name)
        else:
            by_role[role].append(p)
    if undeclared:
        raise ValueError(f"parameters without a declared role (llm.model.roles.set_role): {undeclared}")
    groups = []
    for name, params in by_role.items():
        if not params:
            continue
        opts = (optim_cfg.groups or {}).get(name, {})
        wd = float(opts.get("weight_decay", optim_cfg.weight_decay if name in DECAYED else 0.0))
        lr = optim_cfg.lr * float(opts.get("lr_scale", 1.0))
        if optim_cfg.independent_wd:
            if lr <= 0:
                raise ValueError(f"optim.independent_wd needs optim.groups.{name}.lr_scale > 0")
            wd = wd / lr
        groups.append({"name": name, "params": params, "weight_decay": wd, "lr": lr})
    return groups


def describe_groups(groups, optim_cfg) -> list[dict]:
    """What the run directory records about each group (the configured, not the internal, decay)."""
    rows = []
    for g in groups:
        wd = g["weight_decay"] * g["lr"] if optim_cfg.independent_wd else g["weight_decay"]
        rows.append({"name": g["name"], "tensors": len(g["params"]),
                     "params": sum(p.numel() for p in g["params"]), "weight_decay": wd, "lr": g["lr"]})
    return rows


def lr_schedule(optim_cfg, max_steps: int):
    """step -> multiplier of the peak LR (linear warmup, then cosine / warmup-stable-decay / constant)."""
    warmup, floor = optim_cfg.warmup_steps, optim_cfg.min_lr_ratio
    kind = optim_cfg.schedule
    decay_start = max_steps - int(optim_cfg.decay_fraction * max_steps) if kind == "wsd" else warmup

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant" or step < decay_start:
            return 1.0
        frac = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        if kind == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0 - (1.0 - floor) * frac  # wsd: linear decay to the floor
    return multiplier
