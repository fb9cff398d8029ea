"""PD-SSM state tracking as parallel cells: one process per (task, model, seed), all on one machine
(one GPU takes many such tiny models at once), merged into one `<out>/pdssm_state_tracking.json` and
`.png` as `python -m llm reproduce` writes them, the seeds of a (task, model) as mean +- std. A cell
still running at `--deadline-s` is stopped and listed under "unfinished"; each cell's output is in
`<out>/cells.log`.

    python benchmarks/reproduce_cells.py --out DIR --deadline-s 510 --budget train_seconds=360 \\
        --budget batch=256 --budget state_size=32 cycle_nav:pdssm parity:gated_deltanet:1 ...

A cell is TASK:MODEL or TASK:MODEL:SEED (seed 0 if left out).

`--budget KEY=VALUE` items go to every cell (llm.reproduce.pdssm_state_tracking.budget). Used by
benchmarks/reproduce_gpu.sh; the numbers are in docs/reproductions.md.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from llm.reproduce import pdssm_state_tracking as claim
from llm.reproduce import mean_std, save

NAME = "pdssm_state_tracking"


def launch(cell: str, index: int, a) -> tuple:
    """Start one cell's process; returns (cell, process, its out dir, its log path)."""
    parts = cell.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and not parts[2].isdigit()):
        raise SystemExit(f"cell {cell!r}: expected TASK:MODEL or TASK:MODEL:SEED, e.g. cycle_nav:pdssm:1")
    task, model, seed = (*parts, "0")[:3]
    out = os.path.join(a.out, "cells", str(index))
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "log")
    budget = [*a.budget, f"tasks=[{task}]", f"models=[{json.dumps(model)}]", f"first_seed={seed}"]
    cmd = [sys.executable, "-m", "llm", "reproduce", NAME, "--seeds", "1", "--out", out,
           *(arg for item in budget for arg in ("--budget", item))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        return cell, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), out, log


def wait(running: list, deadline: float) -> list:
    """Wait for the cells until `deadline` (perf_counter); stop the rest. Returns the unfinished cells."""
    while any(p.poll() is None for _, p, _, _ in running) and time.perf_counter() < deadline:
        time.sleep(2)
    unfinished = [cell for cell, p, _, _ in running if p.poll() is None]
    for _, p, _, _ in running:
        if p.poll() is None:
            p.kill()
            p.wait()
    return unfinished


def merge(running: list, unfinished: list, wall_s: float) -> dict:
    """One result of the cells' results: a row per (task, model) over its cells' seeds, in order;
    the budget's task and model lists the union of theirs."""
    parts = []
    for cell, p, out, _ in running:
        path = os.path.join(out, f"{NAME}.json")
        if cell not in unfinished and p.returncode == 0 and os.path.exists(path):
            with open(path) as f:
                parts.append(json.load(f))
    if not parts:
        raise SystemExit("no cell finished: see cells.log")
    merged = {**parts[0], "rows": _pool_seeds([row for part in parts for row in part["rows"]]),
              "wall_s": round(wall_s),
              "cells_wall_s": [part["wall_s"] for part in parts],
              "unfinished": unfinished + [cell for cell, p, _, _ in running if cell not in unfinished and p.returncode]}
    for key in ("tasks", "models"):
        union = dict.fromkeys(x for part in parts for x in part["budget"][key])
        merged["budget"] = {**merged["budget"], key: list(union)}
    merged["chance"] = {t: c for part in parts for t, c in part["chance"].items()}
    merged["seeds"] = max(len(row["seeds"]) for row in merged["rows"])
    merged["budget"].pop("first_seed")  # each row lists its seeds
    return merged


def _pool_seeds(rows: list) -> list:
    """One row per (task, model): the cells' accuracies (each of its own seeds) pooled."""
    pooled = {}
    for row in rows:
        into = pooled.setdefault((row["task"], row["model"]), {**row, "seeds": [], "steps": [], "accuracy": {}})
        into["seeds"], into["steps"] = into["seeds"] + row["seeds"], into["steps"] + row["steps"]
        for L, stat in row["accuracy"].items():
            into["accuracy"].setdefault(L, []).extend(stat["values"])
    return [{**row, "accuracy": {L: mean_std(v) for L, v in row["accuracy"].items()}} for row in pooled.values()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cells", nargs="+", metavar="TASK:MODEL")
    p.add_argument("--out", required=True, help="directory for the merged json/png, cells.log and cells/")
    p.add_argument("--deadline-s", type=float, required=True, help="cells still running then are stopped")
    p.add_argument("--budget", action="append", default=[], metavar="KEY=VALUE", help="a budget change for every cell")
    a = p.parse_args(argv)
    start = time.perf_counter()
    running = [launch(cell, i, a) for i, cell in enumerate(a.cells)]
    unfinished = wait(running, start + a.deadline_s)
    with open(os.path.join(a.out, "cells.log"), "w") as f:
        for cell, proc, _, log in running:
            f.write(f"=== {cell} (exit {proc.returncode})\n{open(log).read()}\n")
    merged = merge(running, unfinished, time.perf_counter() - start)
    save(a.out, NAME, merged, claim._plot)
    finished = len(a.cells) - len(merged["unfinished"])
    print(f"{finished} of {len(a.cells)} cells finished in {merged['wall_s']} s; unfinished: {merged['unfinished'] or 'none'}")


if __name__ == "__main__":
    main()
