"""PD-SSM (Terzic et al.): finite-state tracking that generalizes in length. Models train on lengths
3-40 with the state after every prefix as the label (llm.eval.probes) and are scored by the accuracy
of the final state at longer test lengths, beside the paper's table (accuracy at test lengths 40-256
after 100k steps, batch 256, state 128).

Variants: `pdssm` with the mixer's defaults, `pdssm +state_norm` (the readout sees each head's state
divided by its RMS, so its scale, shrunk by |d| < 1 or grown by accumulated inputs, does not matter)
and `pdssm +state_norm -phase` (d real positive: every state change comes from the discrete P_t),
the diagonal-only ablation `pdssm_diag` (P = I, defaults otherwise), and the paper's baselines
Gated DeltaNet and `deltanet_neg` (DeltaNet[-1,1]: beta in (0, 2), eigenvalues down to -1). The
diagnosis: docs/reproductions.md.
"""
import time

from llm.eval.probes import TASKS, accuracy, device_name, make_model, steps_within, train
from llm.reproduce import mean_std, save, with_changes

DESCRIPTION = "PD-SSM: state tracking (parity, even pairs, cycle nav, mod arith) accuracy vs test length"
PAPER = {  # accuracy (%) at test lengths 40-256, Terzic et al. Table (100k steps, batch 256, state 128)
    "cycle_nav": {"pdssm": 99.5, "gated_deltanet": 55.9, "deltanet[-1,1]": 47.3, "transformer": 24.4},
    "even_pairs": {"pdssm": 99.7, "gated_deltanet": 100.0, "deltanet[-1,1]": 100.0, "transformer": 90.4},
    "mod_arith": {"pdssm": 96.2, "gated_deltanet": 49.9, "deltanet[-1,1]": 63.9, "transformer": 23.6},
    "parity": {"pdssm": 99.9, "gated_deltanet": 56.6, "deltanet[-1,1]": 97.2, "transformer": 52.2},
}


def models(state_size: int, pdssm_args: dict = None) -> dict:
    """{name: (mixer, mixer_args)} of the compared models; `pdssm_args` go to every PD-SSM variant."""
    pd = {"state_size": state_size, "dict_size": 8, **(pdssm_args or {})}
    return {"pdssm": ("pdssm", {"pdssm": pd}),
            "pdssm +state_norm": ("pdssm", {"pdssm": {**pd, "state_norm": True}}),
            "pdssm +state_norm -phase": ("pdssm", {"pdssm": {**pd, "state_norm": True, "phase": False}}),
            "pdssm_diag": ("pdssm", {"pdssm": {**pd, "selection": "identity"}}),
            "gated_deltanet": ("gated_deltanet", {}),
            "deltanet_neg": ("deltanet", {"deltanet": {"allow_neg_eigval": True}})}  # the paper's DeltaNet[-1,1]


def budget(quick: bool, **changes) -> dict:
    """The quick (tests) or full budget, with `changes` (e.g. tasks=[...]) applied."""
    if quick:
        b = dict(tasks=["parity", "cycle_nav"], models=["pdssm", "pdssm +state_norm -phase", "pdssm_diag"],
                 steps=40, batch=16, test_lengths=[40, 64], eval_batch=64, d_model=32, layers=1, state_size=8,
                 lr=3e-3)
    else:
        b = dict(tasks=list(PAPER), models=list(models(16)), steps=600, batch=32, test_lengths=[40, 64, 128, 256],
                 eval_batch=256, d_model=64, layers=2, state_size=16, lr=3e-3)
    b["train_seconds"] = None  # if set, each model trains for the steps that fit in it (timed), not `steps`
    b["first_seed"] = 0  # the seeds are first_seed, first_seed + 1, ...
    b["pdssm_args"] = {}  # mixer args for every PD-SSM variant, e.g. {magnitude_init: 0.99}
    b = with_changes(b, changes)
    for key, known in (("tasks", TASKS), ("models", models(1))):
        if set(b[key]) - set(known):
            raise ValueError(f"budget: unknown {key} {sorted(set(b[key]) - set(known))}; expected some of {sorted(known)}")
    return b


def run(out_dir: str, quick: bool, seeds: int, **changes) -> dict:
    """The comparison at budget(quick, **changes); `changes` runs a reduced version (docs/reproductions.md)."""
    b = budget(quick, **changes)
    compared = models(b["state_size"], b["pdssm_args"])
    rows, start = [], time.perf_counter()
    for task_name in b["tasks"]:
        task = TASKS[task_name]
        for name in b["models"]:
            mixer, mixer_args = compared[name]
            seed_list = list(range(b["first_seed"], b["first_seed"] + seeds))
            accs, steps = {L: [] for L in b["test_lengths"]}, []
            for seed in seed_list:
                def make():
                    return make_model(task, mixer, mixer_args, b["d_model"], b["layers"], 4, seed)

                steps.append(b["steps"] if b["train_seconds"] is None else
                             steps_within(b["train_seconds"], make, task, (3, 40), b["batch"], b["lr"], seed))
                model = make()
                train(model, task, (3, 40), steps[-1], b["batch"], b["lr"], seed)
                for L in b["test_lengths"]:
                    accs[L].append(accuracy(model, task, L, b["eval_batch"], seed + 1000, final_only=True))
            rows.append({"task": task_name, "model": name, "seeds": seed_list, "steps": steps,
                         "accuracy": {str(L): mean_std(a) for L, a in accs.items()}})
            print(task_name, name, f"{steps} steps", {L: round(v["mean"], 3) for L, v in rows[-1]["accuracy"].items()},
                  flush=True)
    results = {"description": DESCRIPTION, "paper": PAPER, "quick": quick, "seeds": seeds, "budget": b,
               "device": device_name(),
               "chance": {t: 1 / TASKS[t].n_classes for t in b["tasks"]},
               "wall_s": round(time.perf_counter() - start), "rows": rows}
    return save(out_dir, "pdssm_state_tracking", results, _plot)


def _plot(fig, results):
    tasks = results["budget"]["tasks"]
    fig.set_size_inches(3 * len(tasks), 3.2)
    lengths = results["budget"]["test_lengths"]
    color = {m: f"C{i}" for i, m in enumerate(results["budget"]["models"])}  # one per model in every panel
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        for row in (r for r in results["rows"] if r["task"] == task):
            acc = [row["accuracy"][str(L)] for L in lengths]
            ax.errorbar(lengths, [a["mean"] for a in acc], yerr=[a["std"] for a in acc], marker="o", capsize=2,
                        color=color[row["model"]], label=row["model"])
        ax.axhline(results["chance"][task], color="k", ls=":")
        ax.axvline(40, color="gray", ls="--", lw=0.8)  # longest training length
        ax.set_title(task)
        ax.set_xlabel("test length")
        ax.set_ylim(0, 1.02)
    fig.axes[0].set_ylabel("final-state accuracy")
    handles = {h.get_label(): h for ax in fig.axes for h in ax.get_legend_handles_labels()[0]}
    fig.axes[0].legend(handles.values(), handles.keys(), fontsize=6)
