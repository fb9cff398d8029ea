"""llm.reproduce.mqar's full budget run in pieces, for a shared machine with a deadline.

Each cell (mixer, width, seed) is trained and scored exactly as mqar.run() does it (same
make_model / train / accuracy calls, same seeds), so a cell's accuracy is the one run() would give;
what changes is only which cells run, and that several worker processes can share the queue.

    PYTHONPATH=. python docs/reproductions/mqar_full/run_cells.py work DIR DEADLINE_EPOCH
    PYTHONPATH=. python docs/reproductions/mqar_full/run_cells.py merge DIR

`work` takes the queue in order (every cell of seed 0, longest first, then seed 1, then seed 2),
claims a cell by creating DIR/cells/<cell>.claim, and skips a cell whose estimated time (timed on
this machine, scaled by how the finished cells compared) would end past the deadline. `merge`
writes DIR/mqar.json and DIR/mqar.png in run()'s format from the finished cells; a row's
accuracy lists the seeds it has ("values"), which may be fewer than the most any row has.
"""
import glob
import json
import os
import statistics
import sys
import time

from llm.eval.probes import accuracy, make_model, mqar_task, train
from llm.reproduce import mean_std, mqar, save

BUDGET = dict(widths=[32, 64, 128], pairs=16, vocab=128, steps=600, batch=32, eval_batch=128, layers=2, lr=3e-3)
SEEDS = 3
# seconds per training, 20 timed steps x 30 on this machine (2 shared cores, nice 19); 64: geometric mean
EST = {32: dict(softmax=55, momentum=55, deltanet=107, gated_deltanet=85, mesa=334, pdssm=222),
       128: dict(softmax=215, momentum=265, deltanet=375, gated_deltanet=395, mesa=1409, pdssm=1193)}
EST[64] = {m: (EST[32][m] * EST[128][m]) ** 0.5 for m in EST[32]}


def name(mixer, width, seed):
    return f"{mixer}_d{width}_s{seed}"


def queue():
    cells = []
    for seed in range(SEEDS):
        cells += sorted(((m, w, seed) for m in mqar.MODELS for w in BUDGET["widths"]), key=lambda c: -EST[c[1]][c[0]])
    return cells


def load():
    return os.getloadavg()[0]


def work(out, deadline):
    os.makedirs(f"{out}/cells", exist_ok=True)
    task = mqar_task(BUDGET["vocab"], BUDGET["pairs"])
    seq_len = 4 * BUDGET["pairs"]
    for mixer, width, seed in queue():
        cell = name(mixer, width, seed)
        done = [json.load(open(p)) for p in glob.glob(f"{out}/cells/*.json")]
        factor = statistics.median([d["seconds"] / d["estimate"] for d in done]) if done else 1.2
        if time.time() + 1.1 * factor * EST[width][mixer] > deadline:
            continue
        try:
            os.close(os.open(f"{out}/cells/{cell}.claim", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        print(f"{time.strftime('%H:%M:%S')} {cell} start (estimate {factor * EST[width][mixer]:.0f} s)", flush=True)
        load0, start = load(), time.perf_counter()
        model = make_model(task, mixer, {}, width, BUDGET["layers"], max(1, width // 32), seed)
        train(model, task, (seq_len, seq_len), BUDGET["steps"], BUDGET["batch"], BUDGET["lr"], seed)
        acc = accuracy(model, task, seq_len, BUDGET["eval_batch"], seed + 1000, final_only=False)
        seconds = time.perf_counter() - start
        result = dict(model=mixer, d_model=width, seed=seed, accuracy=acc, seconds=round(seconds, 1),
                      estimate=EST[width][mixer], load=[round(load0, 2), round(load(), 2)],
                      started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds)),
                      ended=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with open(f"{out}/cells/{cell}.json.tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(f"{out}/cells/{cell}.json.tmp", f"{out}/cells/{cell}.json")
        print(f"{time.strftime('%H:%M:%S')} {cell} accuracy {acc:.3f} in {seconds:.0f} s", flush=True)


def merge(out):
    cells = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/cells/*.json"))]
    rows = []
    for mixer in mqar.MODELS:
        for width in BUDGET["widths"]:
            accs = [c["accuracy"] for c in sorted(cells, key=lambda c: c["seed"])
                    if c["model"] == mixer and c["d_model"] == width]
            if accs:
                rows.append({"model": mixer, "d_model": width, "accuracy": mean_std(accs)})
    starts = [time.mktime(time.strptime(c["started"], "%Y-%m-%dT%H:%M:%SZ")) for c in cells]
    ends = [time.mktime(time.strptime(c["ended"], "%Y-%m-%dT%H:%M:%SZ")) for c in cells]
    results = {"description": mqar.DESCRIPTION, "paper": mqar.PAPER, "quick": False,
               "seeds": max(len(r["accuracy"]["values"]) for r in rows), "budget": BUDGET,
               "seq_len": 4 * BUDGET["pairs"], "chance": 2 / BUDGET["vocab"],
               "wall_s": round(max(ends) - min(starts)), "train_s_total": round(sum(c["seconds"] for c in cells)),
               "load_mean": round(statistics.fmean(x for c in cells for x in c["load"]), 2),
               "runner": "docs/reproductions/mqar_full/run_cells.py (cells as mqar.run(), queue over worker processes)",
               "rows": rows}
    return save(out, "mqar", results, mqar._plot)


if __name__ == "__main__":
    if sys.argv[1] == "work":
        work(sys.argv[2], float(sys.argv[3]))
    else:
        merge(sys.argv[2])
