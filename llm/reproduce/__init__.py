"""Reproductions of papers' claims: `python -m llm reproduce NAME [--quick] [--seeds N] [--out DIR]`.

Each claim is a module `llm/reproduce/<name>.py`, found here by pkgutil, that defines
- `DESCRIPTION: str`, one line for `--list`;
- `PAPER: dict`, the paper's numbers the results are set beside;
- `run(out_dir: str, quick: bool, seeds: int) -> dict`, which writes `<out_dir>/<name>.json` and a
  small plot `<out_dir>/<name>.png` and returns the results. `quick` is a budget of about a minute
  (the tests use it); without it the module runs its full budget (at most ~30 minutes on CPU).

The tables beside the papers' numbers, with commands, budgets and wall times: docs/reproductions.md.
"""
import argparse
import importlib
import pkgutil
import time


def claims() -> dict:
    """{name: module} of every claim module in this package."""
    return {m.name: importlib.import_module(f"{__name__}.{m.name}")
            for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m llm reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("name", nargs="?", help="the claim to reproduce (see --list)")
    p.add_argument("--list", action="store_true", help="list the claims and exit")
    p.add_argument("--quick", action="store_true", help="a budget of about a minute (for tests)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration")
    p.add_argument("--out", default="docs/reproductions", help="directory for <name>.json and <name>.png")
    p.add_argument("--budget", action="append", default=[], metavar="KEY=VALUE",
                   help="change one key of the claim's budget, the value in YAML (e.g. tasks=[cycle_nav], "
                        "steps=3000); repeatable; for the claims whose run() takes budget changes")
    a = p.parse_args(argv)
    found = claims()
    if a.list or a.name is None:
        for name, module in sorted(found.items()):
            print(f"{name:24s} {module.DESCRIPTION}")
        return None
    if a.name not in found:
        p.error(f"unknown claim {a.name!r}; expected one of {', '.join(sorted(found))}")
    if a.seeds < 1:
        p.error(f"--seeds: expected a positive integer, got {a.seeds}")
    changes = budget_changes(p, found[a.name], a.budget)
    start = time.perf_counter()
    results = found[a.name].run(a.out, a.quick, a.seeds, **changes)
    print(f"{a.name}: wrote {a.out}/{a.name}.json and .png in {time.perf_counter() - start:.0f} s")
    return results


def budget_changes(parser, module, items: list) -> dict:
    """{key: value} of `--budget KEY=VALUE` items (YAML values); an error if the claim takes none."""
    import inspect

    import yaml

    if not items:
        return {}
    takes = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(module.run).parameters.values())
    if not takes:
        parser.error(f"--budget: {module.__name__.rsplit('.', 1)[-1]} takes no budget changes")
    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--budget: expected KEY=VALUE, got {item!r}")
        changes[key] = _number(yaml.safe_load(value))
    return changes


def _number(value):
    """YAML 1.1 reads 1e-2 (no dot) as a string: such a value as the float it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


# --- what the claim modules share -------------------------------------------------------------------

def with_changes(budget: dict, changes: dict) -> dict:
    """`budget` with `changes` (from `--budget KEY=VALUE`) applied; an unknown key is an error."""
    unknown = set(changes) - set(budget)
    if unknown:
        raise ValueError(f"budget: unknown keys {sorted(unknown)}; expected some of {sorted(budget)}")
    for key, value in changes.items():
        if not _same_kind(budget[key], value):
            raise ValueError(f"budget: {key}: expected {type(budget[key]).__name__} (like {budget[key]!r}), "
                             f"got {value!r}")
    return {**budget, **changes}


def _same_kind(default, value) -> bool:
    """Whether `value` may replace `default`: an int for an int, any number for a float or None."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if default is None or isinstance(default, float):
        return (default is None and value is None) or number(value)
    return isinstance(value, type(default)) and (isinstance(default, bool) or not isinstance(value, bool))


def mean_std(values) -> dict:
    """{"mean", "std", "values"} of a list of numbers (std 0 for one value)."""
    import statistics
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def save(out_dir: str, name: str, results: dict, plot) -> dict:
    """Write `<out_dir>/<name>.json` (results) and `<out_dir>/<name>.png` (plot(fig, results) draws on
    a matplotlib figure, Agg backend); return results."""
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llm.files import write_json

    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"{name}.json"), results)
    fig = plt.figure(figsize=(6, 4))
    plot(fig, results)
    write_figure(fig, os.path.join(out_dir, f"{name}.png"), dpi=80)
    return results


def write_figure(fig, path: str, dpi: int = 120) -> str:
    """Lay out a matplotlib figure, write it to `path` as PNG (atomically) and close it; returns path."""
    import matplotlib.pyplot as plt

    from llm.files import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path
