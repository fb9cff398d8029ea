"""Weight decay and rank (Kobayashi et al.): decaying both factors of W_Q^T W_K and W_O W_V acts as a
nuclear-norm penalty on the product, so AdamW's uniform decay drives the attention products to low
rank, increasingly with the decay; with the qk and vo groups undecayed (decoupled) they keep their
rank. Swept: decay uniform | decoupled x optim.weight_decay 0.1 | 1.0, seeds; measured: the mean
effective rank over layers and heads of each product over training (telemetry.jsonl, every eval
step), and the held-out loss beside it."""
import os

from llm.files import write_json
from llm.reproduce import write_figure
from llm.sweep import Axis, read_jsonl, reproduce_command, reproduction_overrides, sweep

NAME = "weight_decay_rank"
DESCRIPTION = "Uniform weight decay lowers the effective rank of W_Q^T W_K and W_O W_V; decoupled (qk/vo wd 0) keeps it"
PAPER = {"title": "Weight decay induces low-rank attention layers", "authors": "Kobayashi et al.",
         "venue": "NeurIPS 2024", "arxiv": "2410.23819",
         "claim": "with weight decay on both factors the attention products W_Q^T W_K and W_V W_O become low "
                  "rank (more so with more decay); decoupling their decay keeps the rank"}
CONFIG = "configs/quickstart.yaml"
FULL = ("train.max_steps=2000", "train.eval_every=100", "train.ckpt_every=1000")
QUICK = ("train.max_steps=6", "train.eval_every=2", "train.ckpt_every=1000", "optim.lr=1e-2")
DECAY = Axis("decay", (("uniform", ()),
                       ("decoupled", ("optim.groups.qk.weight_decay=0", "optim.groups.vo.weight_decay=0"))))


def rank_curves(run_dir: str) -> dict:
    """product -> {step: mean effective rank over layers and heads}."""
    by_product = {}
    for r in read_jsonl(os.path.join(run_dir, "telemetry.jsonl")):
        by_product.setdefault(r["product"], {}).setdefault(r["step"], []).append(r["effective_rank"])
    return {p: {s: sum(v) / len(v) for s, v in sorted(steps.items())} for p, steps in by_product.items()}


def summarize(result: dict) -> list[dict]:
    """Per (decay, weight_decay): the seeds' mean rank curves and final held-out loss."""
    rows = {}
    for run in result["runs"]:
        row = rows.setdefault((run["decay"], run["weight_decay"]),
                              {"decay": run["decay"], "weight_decay": run["weight_decay"], "curves": [], "val": []})
        row["curves"].append(rank_curves(run["run_dir"]))
        row["val"].append(run["final_val_loss"])
    out = []
    for row in rows.values():
        mean = {p: {s: sum(c[p][s] for c in row["curves"]) / len(row["curves"]) for s in row["curves"][0][p]}
                for p in row["curves"][0]}
        out.append({"decay": row["decay"], "weight_decay": row["weight_decay"], "seeds": len(row["val"]),
                    "erank": {p: {str(s): v for s, v in c.items()} for p, c in mean.items()},
                    "final_erank_qk": list(mean["qk"].values())[-1], "final_erank_vo": list(mean["vo"].values())[-1],
                    "start_erank_qk": next(iter(mean["qk"].values())), "start_erank_vo": next(iter(mean["vo"].values())),
                    "final_val_loss": sum(row["val"]) / len(row["val"])})
    return out


def plot(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for row in rows:
        label = f"{row['decay']}, wd {row['weight_decay']}"
        style = "-" if row["decay"] == "uniform" else "--"
        for ax, product in zip(axes[:2], ("qk", "vo")):
            curve = row["erank"][product]
            ax.plot([int(s) for s in curve], list(curve.values()), style, marker="o", ms=3, label=label)
    names = [f"{r['decay']}\nwd {r['weight_decay']}" for r in rows]
    axes[2].bar(names, [r["final_val_loss"] for r in rows], color="tab:gray")
    axes[2].set_ylim(min(r["final_val_loss"] for r in rows) * 0.98, max(r["final_val_loss"] for r in rows) * 1.01)
    axes[0].set(title="effective rank of W_Q^T W_K (mean over layers, heads)", xlabel="step", ylabel="effective rank")
    axes[1].set(title="effective rank of W_O W_V", xlabel="step")
    axes[2].set(title="final held-out loss (mean over seeds)", ylabel="loss")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return write_figure(fig, path)


def run(out_dir: str, quick: bool, seeds: int, overrides=()) -> dict:
    """Train the grid into <out_dir>/weight_decay_rank/, write <out_dir>/weight_decay_rank.{json,png}."""
    shared = reproduction_overrides(CONFIG, quick, (*(QUICK if quick else FULL), *overrides))
    wd = Axis.of("optim.weight_decay", ["1.0"] if quick else ["0.1", "1.0"])
    result = sweep(CONFIG, [DECAY, wd], os.path.join(out_dir, NAME), seeds, shared)
    rows = summarize(result)
    by = {(r["decay"], r["weight_decay"]): r for r in rows}
    # the claim, per decay strength: uniform decay ends at a lower rank than decoupled
    gaps = {w: {p: by["decoupled", w][f"final_erank_{p}"] - by["uniform", w][f"final_erank_{p}"] for p in ("qk", "vo")}
            for _, w in by if ("uniform", w) in by and ("decoupled", w) in by}
    report = {"claim": NAME, "paper": PAPER, "budget": "quick" if quick else "full",
              "command": reproduce_command(NAME, quick, seeds), "config": CONFIG, "overrides": list(shared),
              "seeds": seeds, "rows": rows, "erank_gap_decoupled_minus_uniform": gaps,
              "holds": all(g > 0 for per in gaps.values() for g in per.values()),
              "sweep_dir": os.path.join(out_dir, NAME)}
    write_json(os.path.join(out_dir, f"{NAME}.json"), report)
    plot(rows, os.path.join(out_dir, f"{NAME}.png"))
    return report
