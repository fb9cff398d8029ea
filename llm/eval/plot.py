"""`python -m llm plot RUN_DIR [RUN_DIR ...] [--out DIR]`: PNGs of

- loss curves of all runs on one figure (train loss and held-out loss, by step and by tokens),
- per run, when RUN_DIR/eval/induction.json exists: induction / anti-induction heatmaps (layer x
  head), and their evolution over checkpoints when it was made with --all-checkpoints,
- per run, when RUN_DIR/telemetry.jsonl exists: effective rank of the QK and VO products over
  training per layer (mean over heads).
"""
import argparse
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from llm import HelpFormatter


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_curves(run_dirs: list[str], path: str) -> str:
    fig, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5))
    for color, run in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10, run_dirs):
        metrics_path = os.path.join(run, "metrics.jsonl")
        if not os.path.isfile(metrics_path):
            raise FileNotFoundError(f"{metrics_path}: missing; expected a run directory made by `python -m llm train`")
        records = read_jsonl(metrics_path)
        name = os.path.basename(os.path.normpath(run))
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_loss" in r]
        # Held-out records at step 0 carry no token count; tokens per step is constant in a run.
        per_step = next((r["tokens"] / r["step"] for r in train if r.get("tokens") and r["step"]), None)
        for ax, scale in ((by_step, 1.0), (by_tokens, per_step)):
            if scale is None:
                continue
            ax.plot([r["step"] * scale for r in train], [r["loss"] for r in train], color=color,
                    alpha=0.8, label=f"{name} train")
            ax.plot([r["step"] * scale for r in val], [r["val_loss"] for r in val], "o--", color=color,
                    label=f"{name} held-out")
    by_step.set_xlabel("step")
    by_tokens.set_xlabel("tokens")
    for ax in (by_step, by_tokens):
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _matrix(per_layer: list) -> np.ndarray:
    """[layer][head] scores with None (layers without heads) as NaN rows."""
    width = max((len(s) for s in per_layer if s), default=1)
    return np.array([s if s else [np.nan] * width for s in per_layer], dtype=float)


def induction_heatmaps(report: dict, title: str, path: str) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.6 * len(report["layers"]) + 2.5))
    for ax, key in zip(axes, ("induction", "anti_induction")):
        m = _matrix([e.get(key) for e in report["layers"]])
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto")  # scores are attention masses
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        for i in np.flatnonzero(np.isnan(m).all(1)):
            ax.text((m.shape[1] - 1) / 2, i, "no attention heads", ha="center", va="center", color="gray")
        ax.set_yticks(range(len(m)), [f"L{e['layer']} {e['mixer']}" for e in report["layers"]])
        ax.set_xticks(range(m.shape[1]))
        ax.set_xlabel("head")
        ax.set_title(f"{title}: {key.replace('_', '-')} score")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def induction_evolution(checkpoints: list[dict], title: str, path: str) -> str:
    """Max-over-heads induction and anti-induction score of each layer against training step."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [c["step"] for c in checkpoints]
    for ax, key in zip(axes, ("induction", "anti_induction")):
        for layer, scores in enumerate(checkpoints[-1][key]):
            if scores is not None:  # layers without attention heads have no scores
                ax.plot(steps, [max(c[key][layer]) for c in checkpoints], "o-", label=f"L{layer}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"max {key.replace('_', '-')} score over heads")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def rank_telemetry(records: list[dict], title: str, path: str) -> str:
    """Effective rank of each layer's QK and VO products (mean over heads) over training."""
    ranks = defaultdict(list)  # (product, layer, mixer, step) -> ranks of the heads
    for r in records:
        ranks[(r["product"], r["layer"], r["mixer"], r["step"])].append(r["effective_rank"])
    products = sorted({k[0] for k in ranks})
    fig, axes = plt.subplots(1, len(products), figsize=(5.5 * len(products), 4), squeeze=False)
    for ax, product in zip(axes[0], products):
        for layer, mixer in sorted({(k[1], k[2]) for k in ranks if k[0] == product}):
            points = sorted((k[3], np.mean(v)) for k, v in ranks.items() if k[:3] == (product, layer, mixer))
            ax.plot(*zip(*points), "o-", label=f"L{layer} {mixer}")
        ax.set_xlabel("step")
        ax.set_ylabel("effective rank (mean over heads)")
        ax.set_title(f"{title}: {product.upper()} product")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_runs(run_dirs: list[str], out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    written = [loss_curves(run_dirs, os.path.join(out, "loss_curves.png"))]
    for run in run_dirs:
        name = os.path.basename(os.path.normpath(run))
        induction = os.path.join(run, "eval", "induction.json")
        report = json.load(open(induction)) if os.path.isfile(induction) else {"layers": []}
        if any("induction" in e for e in report["layers"]):  # some layer has attention heads
            written.append(induction_heatmaps(report, name, os.path.join(out, f"{name}_induction.png")))
            if report.get("checkpoints"):
                written.append(induction_evolution(report["checkpoints"], name,
                                                   os.path.join(out, f"{name}_induction_evolution.png")))
        telemetry = os.path.join(run, "telemetry.jsonl")
        if os.path.isfile(telemetry):
            written.append(rank_telemetry(read_jsonl(telemetry), name, os.path.join(out, f"{name}_rank.png")))
    return written


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m llm plot", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (train.out_dir)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/plots for one run, plots/ for several)")
    a = p.parse_args(argv)
    out = a.out or (os.path.join(a.run_dirs[0], "plots") if len(a.run_dirs) == 1 else "plots")
    for path in plot_runs(a.run_dirs, out):
        print(f"wrote {path}")
