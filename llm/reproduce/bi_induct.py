"""Bi-Induct (Sabry & Belz): rewriting part of the training stream into forward-copy (induction),
backward-copy (anti-induction) or balanced snippets, at the same FLOPs budget as natural text,
moves when and how strongly induction and anti-induction heads form, while held-out loss stays
comparable. Swept: data.bi_induct.mode natural | forward | backward | balanced of
configs/exp/bi_induct/natural.yaml (one model, seed, data order and budget), seeds; measured
per run with `python -m llm eval RUN --induction --ablate --all-checkpoints`: the max induction
and anti-induction head scores at every checkpoint, the copy score, and what zeroing the top
induction heads (vs as many random heads) does to held-out loss and copying."""
import json
import os

from llm.files import write_json
from llm.reproduce import write_figure
from llm.sweep import Axis, reproduce_command, reproduction_overrides, sweep

NAME = "bi_induct"
DESCRIPTION = "Forward / backward / balanced copy snippets at one FLOPs budget change induction and anti-induction heads"
PAPER = {"title": "Bi-Induct: bidirectional induction-head curricula", "authors": "Sabry & Belz",
         "arxiv": "2509.22947",
         "claim": "forward snippets strengthen induction heads, backward snippets anti-induction heads, balanced "
                  "both, at the same FLOPs budget and without hurting held-out loss"}
CONFIG = "configs/exp/bi_induct/natural.yaml"
MODES = ("natural", "forward", "backward", "balanced")
QUICK_MODES = ("natural", "balanced")
FULL = ("train.ckpt_every=50", "train.keep_last=8", "train.eval_every=50")  # steps from the budget (296)
QUICK = ("train.max_steps=4", "train.ckpt_every=2", "train.keep_last=2", "data.bi_induct.span=[4,4]")
EVAL_QUICK = ["--windows", "4", "--repeat-batch", "4", "--icl-episodes", "4", "--icl-k", "0,2",
              "--ablate-seeds", "1", "--batch-size", "8"]


def mode_axis(modes) -> Axis:
    return Axis("mode", tuple((m, (f"data.bi_induct.mode={'none' if m == 'natural' else m}",)) for m in modes))


def induction_eval(run_dir: str, quick: bool) -> dict:
    """RUN/eval/induction.json, made by `python -m llm eval RUN --induction --ablate --all-checkpoints`
    unless it exists."""
    path = os.path.join(run_dir, "eval", "induction.json")
    if not os.path.isfile(path):
        from llm.eval.cli import main

        main([run_dir, "--induction", "--ablate", "--all-checkpoints", *(EVAL_QUICK if quick else [])])
    with open(path) as f:
        return json.load(f)


def _max_score(per_layer) -> float:
    return max(max(heads) for heads in per_layer if heads)


def run_scores(report: dict) -> dict:
    ab = report["ablation"]
    return {"induction_by_step": {c["step"]: _max_score(c["induction"]) for c in report["checkpoints"]},
            "anti_induction_by_step": {c["step"]: _max_score(c["anti_induction"]) for c in report["checkpoints"]},
            "copy_score": report["copy_score"],
            "ablation_val_loss_change": ab["change_induction"]["val_loss"],
            "random_ablation_val_loss_change": ab["change_random"]["val_loss"],
            "ablation_copy_loss_change": ab["change_induction"]["copy_loss_second"],
            "random_ablation_copy_loss_change": ab["change_random"]["copy_loss_second"]}


def summarize(result: dict, quick: bool) -> dict:
    """mode -> seed means of the scores (curves by checkpoint step) and the final held-out loss."""
    per_mode = {}
    for run in result["runs"]:
        scores = run_scores(induction_eval(run["run_dir"], quick))
        per_mode.setdefault(run["mode"], []).append({**scores, "final_val_loss": run["final_val_loss"]})
    return {mode: {"seeds": len(runs), **{key: _seed_mean(runs, key) for key in runs[0]}}
            for mode, runs in per_mode.items()}


def _seed_mean(runs: list[dict], key: str):
    """The mean over seeds of a number, or of a curve {step: number} step by step."""
    if isinstance(runs[0][key], dict):
        return {str(s): sum(r[key][s] for r in runs) / len(runs) for s in runs[0][key]}
    return sum(r[key] for r in runs) / len(runs)


def _final(modes: dict, mode: str, key: str) -> float:
    return list(modes[mode][key].values())[-1]


def plot(modes: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for mode, m in modes.items():
        for ax, key in zip(axes[:2], ("induction_by_step", "anti_induction_by_step")):
            ax.plot([int(s) for s in m[key]], list(m[key].values()), "o-", label=mode)
    names = list(modes)
    axes[2].bar(names, [modes[n]["final_val_loss"] for n in names], color="tab:gray")
    low = min(modes[n]["final_val_loss"] for n in names)
    axes[2].set_ylim(low * 0.98, max(modes[n]["final_val_loss"] for n in names) * 1.01)
    width = 0.4
    xs = range(len(names))
    axes[3].bar([x - width / 2 for x in xs], [modes[n]["ablation_val_loss_change"] for n in names], width,
                label="top induction heads off")
    axes[3].bar([x + width / 2 for x in xs], [modes[n]["random_ablation_val_loss_change"] for n in names], width,
                label="random heads off")
    axes[3].set_xticks(list(xs), names)
    axes[0].set(title="max induction head score", xlabel="step")
    axes[1].set(title="max anti-induction head score", xlabel="step")
    axes[2].set(title="final held-out loss", ylabel="loss")
    axes[3].set(title="held-out loss change when heads are zeroed", ylabel="nats")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[3].legend(fontsize=8)
    return write_figure(fig, path)


def run(out_dir: str, quick: bool, seeds: int, overrides=()) -> dict:
    """Train the four streams into <out_dir>/bi_induct/, evaluate, write <out_dir>/bi_induct.{json,png}."""
    shared = reproduction_overrides(CONFIG, quick, (*(QUICK if quick else FULL), *overrides))
    result = sweep(CONFIG, [mode_axis(QUICK_MODES if quick else MODES)], os.path.join(out_dir, NAME), seeds, shared)
    modes = summarize(result, quick)
    checks = {}
    if "forward" in modes:
        checks["forward_raises_induction"] = (_final(modes, "forward", "induction_by_step")
                                              > _final(modes, "natural", "induction_by_step"))
    if "backward" in modes:
        checks["backward_raises_anti_induction"] = (_final(modes, "backward", "anti_induction_by_step")
                                                    > _final(modes, "natural", "anti_induction_by_step"))
    report = {"claim": NAME, "paper": PAPER, "budget": "quick" if quick else "full",
              "command": reproduce_command(NAME, quick, seeds), "config": CONFIG, "overrides": list(shared),
              "seeds": seeds, "modes": modes, "checks": checks, "holds": bool(checks) and all(checks.values()),
              "sweep_dir": os.path.join(out_dir, NAME)}
    write_json(os.path.join(out_dir, f"{NAME}.json"), report)
    plot(modes, os.path.join(out_dir, f"{NAME}.png"))
    return report
