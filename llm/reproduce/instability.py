"""Small-scale proxies for training instabilities (Wortsman et al.): at high learning rates attention
logits grow until training diverges; qk-layernorm (model.qk_norm) and the z-loss (train.z_loss)
keep the logits bounded and flatten final loss vs learning rate. Swept: a log grid of optim.lr x
variant (baseline | qk_norm | z_loss | qk_norm + z_loss) of the small softmax model, seeds;
measured: final held-out loss vs LR, the LR sensitivity of each variant (the paper's
E_lr[min(L(lr), L0) - L*]: L0 the loss at initialization, L* the best over the grid), and the
largest attention logit q.k / sqrt(D) on held-out windows at each checkpoint."""
import math
import os

import torch

from llm.files import write_json
from llm.reproduce import write_figure
from llm.sweep import Axis, read_jsonl, reproduce_command, reproduction_overrides, sweep

NAME = "instability"
DESCRIPTION = "qk-layernorm and z-loss flatten final loss vs learning rate and bound the attention logits"
PAPER = {"title": "Small-scale proxies for large-scale Transformer training instabilities",
         "authors": "Wortsman et al.", "venue": "ICLR 2024", "arxiv": "2309.14322",
         "claim": "attention logit growth and output-logit divergence make small models unstable at high LR; "
                  "qk-layernorm and z-loss reduce the LR sensitivity"}
CONFIG = "configs/quickstart.yaml"
FULL_LRS = ["3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1", "3e-1"]
FULL = ("train.max_steps=1000", "optim.warmup_steps=100", "train.eval_every=200", "train.ckpt_every=200",
        "train.keep_last=5")  # 5 checkpoints for the logit curves (~60 MB each at the small model)
QUICK = ("train.max_steps=6", "train.eval_every=1000", "train.ckpt_every=3", "train.keep_last=2")
Z_LOSS = "train.z_loss=1e-4"  # the paper's coefficient
VARIANTS = {"baseline": (), "qk_norm": ("model.qk_norm=true",), "z_loss": (Z_LOSS,),
            "qk_norm+z_loss": ("model.qk_norm=true", Z_LOSS)}
QUICK_VARIANTS = ("baseline", "qk_norm+z_loss")


@torch.no_grad()
def max_attention_logit(model, windows: torch.Tensor) -> float:
    """max |q.k| / sqrt(D) over causal pairs, heads and layers with attention (q, k as the scores
    see them: after qk-norm and rotary), on `windows`."""
    found = []

    def capture(mixer, inputs, output):
        q, k = mixer.attention_qk(inputs[0])  # [B, T, H, D], [B, T, Hkv, D]
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        found.append(scores.abs().masked_fill(~causal, 0).amax().item())

    hooks = [b.mixer.register_forward_hook(capture) for b in model.blocks if hasattr(b.mixer, "attention_qk")]
    try:
        model(windows[:, :-1])
    finally:
        for h in hooks:
            h.remove()
    return max(found)


def logit_curve(run_dir: str, windows: int = 8) -> dict:
    """step -> max attention logit, over the run's complete checkpoints."""
    from llm import checkpoint
    from llm.data import TokenShards, eval_windows

    curve = {}
    root = os.path.join(run_dir, "checkpoints")
    for tag in checkpoint.complete_tags(root):
        model, cfg = checkpoint.load_model(run_dir, tag)
        val = eval_windows(TokenShards(cfg.data.path, "val"), cfg.data.seq_len, windows)
        curve[checkpoint.commit_record(root, tag)["step"]] = max_attention_logit(model, val)
    return curve


def initial_loss(run_dir: str):
    return next((r["val_loss"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["step"] == 0), None)


def lr_sensitivity(losses: dict, initial: float) -> float:
    """E_lr[min(L(lr), L0) - L*] over the grid; a diverged (non-finite or missing) run counts as L0."""
    clipped = [min(v, initial) if v is not None and math.isfinite(v) else initial for v in losses.values()]
    return sum(clipped) / len(clipped) - min(clipped)


def analyze(result: dict) -> dict:
    """Per variant: final loss by LR (seed mean), LR sensitivity, max attention logit curves by LR."""
    variants = {}
    for run in result["runs"]:
        v = variants.setdefault(run["variant"], {"losses": {}, "initial": [], "logits": {}})
        v["losses"].setdefault(run["lr"], []).append(run["final_val_loss"])
        v["initial"].append(initial_loss(run["run_dir"]))
        v["logits"].setdefault(run["lr"], []).append(logit_curve(run["run_dir"]))
    out = {}
    for name, v in variants.items():
        losses = {lr: _mean(ls) for lr, ls in v["losses"].items()}
        initial = _mean(v["initial"])
        logits = {lr: {str(s): sum(c[s] for c in cs) / len(cs) for s in cs[0]} for lr, cs in v["logits"].items()}
        out[name] = {"final_val_loss": losses, "initial_val_loss": initial,
                     "lr_sensitivity": lr_sensitivity(losses, initial), "max_attention_logit": logits,
                     "final_max_attention_logit": {lr: list(c.values())[-1] for lr, c in logits.items()}}
    return out


def _mean(values):
    finite = [x for x in values if x is not None and math.isfinite(x)]
    return sum(finite) / len(finite) if len(finite) == len(values) else None  # a diverged seed: None


def plot(variants: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, sens_ax, logit_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, v in variants.items():
        lrs = sorted(v["final_val_loss"], key=float)
        done = [lr for lr in lrs if v["final_val_loss"][lr] is not None]
        loss_ax.plot([float(lr) for lr in done], [v["final_val_loss"][lr] for lr in done], "o-", label=name)
        top = max(lrs, key=float)
        curve = v["max_attention_logit"][top]
        logit_ax.plot([int(s) for s in curve], list(curve.values()), "o-", label=f"{name}, lr {top}")
    sens_ax.bar(list(variants), [v["lr_sensitivity"] for v in variants.values()], color="tab:gray")
    loss_ax.set(xscale="log", xlabel="learning rate", ylabel="final held-out loss", title="final loss vs LR")
    sens_ax.set(ylabel="LR sensitivity (nats)", title="mean excess loss over the LR grid")
    logit_ax.set(yscale="log", xlabel="step", ylabel="max |q.k| / sqrt(D)", title="max attention logit, highest LR")
    for ax in (loss_ax, logit_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return write_figure(fig, path)


def run(out_dir: str, quick: bool, seeds: int, overrides=()) -> dict:
    """Train the grid into <out_dir>/instability/, write <out_dir>/instability.{json,png}."""
    shared = reproduction_overrides(CONFIG, quick, (*(QUICK if quick else FULL), *overrides))
    lrs = ["1e-3", "1e-1"] if quick else FULL_LRS
    names = QUICK_VARIANTS if quick else tuple(VARIANTS)
    axes = [Axis.of("optim.lr", lrs), Axis("variant", tuple((n, VARIANTS[n]) for n in names))]
    result = sweep(CONFIG, axes, os.path.join(out_dir, NAME), seeds, shared)
    variants = analyze(result)
    report = {"claim": NAME, "paper": PAPER, "budget": "quick" if quick else "full",
              "command": reproduce_command(NAME, quick, seeds), "config": CONFIG, "overrides": list(shared),
              "seeds": seeds, "variants": variants,
              "holds": variants["qk_norm+z_loss"]["lr_sensitivity"] < variants["baseline"]["lr_sensitivity"],
              "sweep_dir": os.path.join(out_dir, NAME)}
    write_json(os.path.join(out_dir, f"{NAME}.json"), report)
    plot(variants, os.path.join(out_dir, f"{NAME}.png"))
    return report
