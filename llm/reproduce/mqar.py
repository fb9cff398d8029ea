"""Associative recall (Arora et al., Zoology): multi-query associative recall accuracy vs model width
for every mixer, at a fixed sequence length and number of key-value pairs (the task:
llm.eval.probes.mqar_task). Softmax attention recalls exactly at any width; a fixed-size recurrent
state needs enough width (state) for the pairs it must hold."""
import time

from llm.eval.probes import accuracy, make_model, mqar_task, train
from llm.model.mixers import MIXERS
from llm.reproduce import mean_std, save, with_changes

DESCRIPTION = "MQAR (Zoology): associative-recall accuracy vs width for every mixer at fixed length and pairs"
PAPER = {"claim": "attention solves MQAR at every width; gated convolutions and small-state recurrences need "
                  "width growing with the number of pairs (Arora et al. 2023, Fig. 2)"}
MODELS = ("softmax", "momentum", "deltanet", "gated_deltanet", "mesa", "pdssm")


def run(out_dir: str, quick: bool, seeds: int, **changes) -> dict:
    """The comparison at the quick or full budget with `changes` (e.g. models=[softmax], steps=3000)."""
    budget = (dict(widths=[16, 32], pairs=4, vocab=32, steps=60, batch=16, eval_batch=64, layers=2, lr=3e-3)
              if quick else dict(widths=[32, 64, 128], pairs=16, vocab=128, steps=600, batch=32, eval_batch=128,
                                 layers=2, lr=3e-3))
    budget = with_changes({**budget, "models": [m for m in MODELS if m in MIXERS]}, changes)
    if set(budget["models"]) - set(MIXERS):
        raise ValueError(f"budget: unknown models {sorted(set(budget['models']) - set(MIXERS))}; "
                         f"expected some of {sorted(MIXERS)}")
    task = mqar_task(budget["vocab"], budget["pairs"])
    seq_len = 4 * budget["pairs"]
    rows, start = [], time.perf_counter()
    for mixer in budget["models"]:
        for width in budget["widths"]:
            accs = []
            for seed in range(seeds):
                model = make_model(task, mixer, {}, width, budget["layers"], max(1, width // 32), seed)
                train(model, task, (seq_len, seq_len), budget["steps"], budget["batch"], budget["lr"], seed)
                accs.append(accuracy(model, task, seq_len, budget["eval_batch"], seed + 1000, final_only=False))
            rows.append({"model": mixer, "d_model": width, "accuracy": mean_std(accs)})
            print(f"{mixer} d={width}: {rows[-1]['accuracy']['mean']:.3f} +- {rows[-1]['accuracy']['std']:.3f}",
                  flush=True)
    results = {"description": DESCRIPTION, "paper": PAPER, "quick": quick, "seeds": seeds, "budget": budget,
               "seq_len": seq_len, "chance": 2 / budget["vocab"], "wall_s": round(time.perf_counter() - start),
               "rows": rows}
    return save(out_dir, "mqar", results, _plot)


def _plot(fig, results):
    ax = fig.add_subplot()
    for mixer in dict.fromkeys(r["model"] for r in results["rows"]):
        rows = [r for r in results["rows"] if r["model"] == mixer]
        ax.errorbar([r["d_model"] for r in rows], [r["accuracy"]["mean"] for r in rows],
                    yerr=[r["accuracy"]["std"] for r in rows], marker="o", capsize=3, label=mixer)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("d_model")
    ax.set_ylabel(f"MQAR accuracy ({results['seeds']} seeds)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"MQAR: {results['budget']['pairs']} pairs, length {results['seq_len']}")
    ax.legend(fontsize=7)
