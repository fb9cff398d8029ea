"""Momentum attention: one layer forms an induction head (copying a repeated span) when its
queries and keys are sheared, q'_t = q_t + gamma (q_t - q_{t-1}); one softmax layer cannot (its
keys know only their own token), two can. Copy accuracy (second copy of a random span, see
llm.eval.probes.induction_task) vs gamma, beside one- and two-layer softmax."""
import time

from llm.eval.probes import accuracy, induction_task, make_model, train
from llm.reproduce import mean_std, save

DESCRIPTION = "momentum attention: one-layer induction (copy accuracy) vs gamma, vs 1- and 2-layer softmax"
PAPER = {"claim": "the shear stands in for the second layer: 1-layer momentum attention copies like "
                  "2-layer softmax, 1-layer softmax does not"}


def _configs(gammas):
    yield "softmax 1 layer", "softmax", {}, 1
    yield "softmax 2 layers", "softmax", {}, 2
    for g in gammas:
        yield f"momentum gamma={g:g}", "momentum", {"momentum": {"gamma": g}}, 1


def run(out_dir: str, quick: bool, seeds: int) -> dict:
    budget = (dict(steps=80, seq_len=32, vocab=16, d_model=32, batch=16, eval_batch=64, gammas=[1.0])
              if quick else dict(steps=400, seq_len=64, vocab=32, d_model=64, batch=32, eval_batch=128,
                                 gammas=[0.25, 0.5, 1.0, 2.0, 4.0]))
    task = induction_task(budget["vocab"])
    rows, start = [], time.perf_counter()
    for name, mixer, mixer_args, layers in _configs(budget["gammas"]):
        accs = []
        for seed in range(seeds):
            model = make_model(task, mixer, mixer_args, budget["d_model"], layers, 4, seed)
            train(model, task, (budget["seq_len"],) * 2, budget["steps"], budget["batch"], 3e-3, seed)
            accs.append(accuracy(model, task, budget["seq_len"], budget["eval_batch"], seed + 1000, final_only=False))
        rows.append({"model": name, "layers": layers, "copy_acc": mean_std(accs)})
        print(f"{name}: {rows[-1]['copy_acc']['mean']:.3f} +- {rows[-1]['copy_acc']['std']:.3f}", flush=True)
    results = {"description": DESCRIPTION, "paper": PAPER, "quick": quick, "seeds": seeds, "budget": budget,
               "chance": 1 / budget["vocab"], "wall_s": round(time.perf_counter() - start), "rows": rows}
    return save(out_dir, "momentum_induction", results, _plot)


def _plot(fig, results):
    ax = fig.add_subplot()
    rows = results["rows"]
    means = [r["copy_acc"]["mean"] for r in rows]
    ax.bar(range(len(rows)), means, yerr=[r["copy_acc"]["std"] for r in rows],
           color=["tab:gray" if r["model"].startswith("softmax") else "tab:blue" for r in rows])
    ax.axhline(results["chance"], color="k", ls=":", label="chance")
    ax.set_xticks(range(len(rows)), [r["model"].replace("momentum ", "") for r in rows], rotation=30, ha="right")
    ax.set_ylabel(f"copy accuracy ({results['seeds']} seeds)")
    ax.set_ylim(0, 1)
    ax.set_title("one-layer induction: momentum attention vs softmax")
    ax.legend()
