"""Held-out loss of the token mixers at one training-FLOPs budget (MesaNet, von Oswald et al.):
Mesa vs Gated DeltaNet vs DeltaNet vs softmax attention, the small model of configs/quickstart.yaml
with train.budget.flops fixed, so each mixer trains as many steps as its own FLOPs per token allow
(llm.budget). Measured: final and best held-out loss (seed mean and std), steps and tokens, from
each run's metrics."""
import os

from llm.files import write_json
from llm.reproduce import write_figure
from llm.sweep import Axis, read_jsonl, reproduce_command, reproduction_overrides, sweep

NAME = "mixer_loss"
DESCRIPTION = "Held-out loss of Mesa vs Gated DeltaNet vs DeltaNet vs softmax at one FLOPs budget"
PAPER = {"title": "MesaNet: Sequence Modeling by Locally Optimal Test-Time Training", "authors": "von Oswald et al.",
         "arxiv": "2506.05233",
         "claim": "MesaNet reaches a lower held-out loss than Gated DeltaNet and DeltaNet, close to softmax attention"}
CONFIG = "configs/quickstart.yaml"
MIXERS = ("softmax", "deltanet", "gated_deltanet", "mesa")
QUICK_MIXERS = ("softmax", "gated_deltanet", "mesa")
# 1.6e13 FLOPs: 296 steps of the small softmax model (the Bi-Induct budget), 124 of Mesa
FULL = ("train.budget.flops=1.6e13", "train.eval_every=50", "train.ckpt_every=1000")
QUICK = ("train.budget.flops=8e8", "train.eval_every=1000", "train.ckpt_every=1000")  # 10 softmax steps, 2 Mesa


def summarize(result: dict) -> dict:
    """mixer -> the sweep's group row plus steps, tokens and the held-out curve (seed 0's)."""
    out = {}
    for group in result["groups"]:
        runs = [r for r in result["runs"] if r["mixer"] == group["mixer"]]
        first = runs[0]
        tokens_per_step = first["tokens"] // max(first["steps"], 1)
        records = read_jsonl(os.path.join(first["run_dir"], "metrics.jsonl"))
        out[group["mixer"]] = {**group, "steps": first["steps"], "tokens": first["tokens"],
                               "val_curve": {r["step"] * tokens_per_step: r["val_loss"] for r in records
                                             if "val_loss" in r}}
    return out


def plot(mixers: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curve_ax, bar_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, m in mixers.items():
        curve_ax.plot(list(m["val_curve"]), list(m["val_curve"].values()), "o-", label=f"{name} ({m['steps']} steps)")
    names = list(mixers)
    bar_ax.bar(names, [mixers[n]["final_val_loss"] for n in names], yerr=[mixers[n]["final_val_loss_std"] for n in names],
               color="tab:gray", capsize=4)
    bar_ax.set_ylim(min(mixers[n]["final_val_loss"] for n in names) * 0.98,
                    max(mixers[n]["final_val_loss"] for n in names) * 1.01)
    curve_ax.set(xlabel="training tokens", ylabel="held-out loss", title="held-out loss at one FLOPs budget")
    bar_ax.set(ylabel="final held-out loss", title="final held-out loss (mean ± std over seeds)")
    curve_ax.grid(alpha=0.3)
    curve_ax.legend(fontsize=8)
    return write_figure(fig, path)


def run(out_dir: str, quick: bool, seeds: int, overrides=()) -> dict:
    """Train every mixer into <out_dir>/mixer_loss/, write <out_dir>/mixer_loss.{json,png}."""
    shared = reproduction_overrides(CONFIG, quick, (*(QUICK if quick else FULL), *overrides))
    axis = Axis.of("model.mixer", QUICK_MIXERS if quick else MIXERS)
    result = sweep(CONFIG, [axis], os.path.join(out_dir, NAME), seeds, shared)
    mixers = summarize(result)
    ranked = sorted((m["final_val_loss"], name) for name, m in mixers.items() if m["final_val_loss"] is not None)
    linear = [name for _, name in ranked if name != "softmax"]
    report = {"claim": NAME, "paper": PAPER, "budget": "quick" if quick else "full",
              "command": reproduce_command(NAME, quick, seeds), "config": CONFIG, "overrides": list(shared),
              "seeds": seeds, "mixers": mixers, "ranking": [name for _, name in ranked],
              "holds": bool(linear) and linear[0] == "mesa", "sweep_dir": os.path.join(out_dir, NAME)}
    write_json(os.path.join(out_dir, f"{NAME}.json"), report)
    plot(mixers, os.path.join(out_dir, f"{NAME}.png"))
    return report
