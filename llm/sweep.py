"""`python -m llm sweep CONFIG [key=value ...] --grid KEY=V1,V2 [--grid ...] [--seeds N]`: a grid of
ordinary training runs, one after another on this machine or as a Slurm job array, and a table.

Every grid point x seed is one run directory `<out>/<name>` (e.g. `lr=1e-3,mixer=softmax,seed=1234`)
trained by its own process, `python -m llm train CONFIG train.resume=auto [key=value ...] <grid
overrides> train.seed=S train.out_dir=<out>/<name>` (DeepSpeed cannot build two engines in one
process). Seeds are the config's train.seed, +1, ... Those override lists are `<out>/runs.txt`,
one line per run; with `--slurm` each task of the array (`launch/slurm.sbatch`) reads its own line.

A run is finished when its metrics.jsonl has the training record of step train.max_steps (from
the run's own config.yaml, so a FLOPs or token budget counts as resolved): a rerun skips finished
runs and resumes unfinished ones from their newest checkpoint. A changed grid value is a new run
name; a changed base config needs a new --out.

The collected table (`<out>/sweep.md`, `<out>/sweep.json`, `<out>/sweep.png`) has, per run and per
grid point (mean and std over seeds): final and best held-out loss, final training loss, tokens and
train_s, the wall time of the training steps (the sum of tokens / tokens_per_s over the logged
windows; evaluations and process setup excluded: metrics.jsonl has no timestamps), all read from
metrics.jsonl.
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from llm.config import ConfigError, load_config
from llm.files import write_atomic, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(ROOT, "launch", "slurm.sbatch")


@dataclass(frozen=True)
class Axis:
    """One swept dimension: `choices` is a list of (label, overrides) pairs; the label names the
    value in run names and tables, the overrides are what a run with that value adds."""
    name: str
    choices: tuple

    @classmethod
    def of(cls, key: str, values) -> "Axis":
        """The axis that sets one config key (`optim.lr`, named `lr`) to each of `values`."""
        return cls(key.rsplit(".", 1)[-1], tuple((str(v), (f"{key}={v}",)) for v in values))

    @classmethod
    def parse(cls, spec: str) -> "Axis":
        """`--grid optim.lr=1e-3,3e-3` -> Axis.of("optim.lr", ["1e-3", "3e-3"])."""
        key, sep, values = spec.partition("=")
        if not sep or not key or not all(values.split(",")):
            raise ConfigError(f"--grid {spec!r}: expected KEY=V1,V2,... e.g. optim.lr=1e-3,3e-3")
        return cls.of(key, values.split(","))


@dataclass(frozen=True)
class Point:
    """One run of the sweep."""
    name: str
    values: dict  # axis name -> label
    seed: int
    overrides: tuple  # everything after CONFIG on the train command line
    run_dir: str = field(compare=False)

    def group(self) -> tuple:
        return tuple(self.values.items())


def plan(config: str, axes: list, seeds: int, out_dir: str, overrides=()) -> list[Point]:
    """Every grid point x seed, each checked by loading its config (a bad key fails here)."""
    names = [a.name for a in axes]
    if len(set(names)) != len(names) or "seed" in names:
        raise ConfigError(f"sweep axes {names}: names must be distinct and not 'seed'")
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: expected at least 1")
    base_seed = load_config(config, overrides).train.seed
    combos = [[]]
    for axis in axes:
        combos = [c + [(axis.name, label, extra)] for c in combos for label, extra in axis.choices]
    points = []
    for combo in combos:
        for seed in range(base_seed, base_seed + seeds):
            values = {name: label for name, label, _ in combo}
            name = ",".join([*(f"{k}={_path_safe(v)}" for k, v in values.items()), f"seed={seed}"])
            run_dir = os.path.abspath(os.path.join(out_dir, name))
            args = ("train.resume=auto", *overrides, *(o for _, _, extra in combo for o in extra),
                    f"train.seed={seed}", f"train.out_dir={run_dir}")
            bad = [a for a in args if any(c.isspace() for c in a)]
            if bad:
                raise ConfigError(f"sweep override {bad[0]!r}: no whitespace allowed (runs.txt is split on it)")
            load_config(config, args)
            points.append(Point(name, values, seed, args, run_dir))
    return points


def _path_safe(label: str) -> str:
    return label.replace(os.sep, "-")


def finished(run_dir: str) -> bool:
    """Whether metrics.jsonl holds the training record of the run's last step (its config.yaml's
    train.max_steps)."""
    cfg_path, metrics_path = os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "metrics.jsonl")
    if not (os.path.isfile(cfg_path) and os.path.isfile(metrics_path)):
        return False
    max_steps = OmegaConf.load(cfg_path).train.max_steps
    return any(r["step"] == max_steps and "loss" in r for r in read_jsonl(metrics_path))


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_plan(points: list, out_dir: str) -> str:
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    path = os.path.join(out_dir, "runs.txt")
    write_atomic(path, "".join(" ".join(p.overrides) + "\n" for p in points))
    return path


def run_local(config: str, points: list, out_dir: str, env=None) -> dict:
    """Train the unfinished runs one after another: name -> "skipped" | "finished" | "failed"."""
    status = {}
    for i, p in enumerate(points):
        if finished(p.run_dir):
            print(f"[{i + 1}/{len(points)}] {p.name}: finished before, skipped", flush=True)
            status[p.name] = "skipped"
            continue
        log = os.path.join(out_dir, "logs", p.name + ".log")
        print(f"[{i + 1}/{len(points)}] {p.name}: training (log {log})", flush=True)
        start = time.time()
        with open(log, "ab") as out:
            rc = subprocess.run([sys.executable, "-m", "llm", "train", config, *p.overrides], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(), check=False).returncode
        status[p.name] = "finished" if rc == 0 and finished(p.run_dir) else "failed"
        print(f"    {status[p.name]} in {time.time() - start:.0f} s" + (f" (exit {rc}; see {log})" if rc else ""),
              flush=True)
    return status


def submit_slurm(config: str, points: list, out_dir: str, sbatch_args=(), wait: bool = False, env=None):
    """One job array over the unfinished runs (task i reads line i + 1 of runs.txt); the job id, or
    None when every run is finished. With `wait`, returns when the whole array has ended."""
    todo = [str(i) for i, p in enumerate(points) if not finished(p.run_dir)]
    if not todo:
        return None
    env = {**(env or os.environ), "LLM_SWEEP_RUNS": os.path.join(os.path.abspath(out_dir), "runs.txt")}
    cmd = ["sbatch", "--parsable", f"--array={','.join(todo)}", "--job-name=sweep",
           f"--output={os.path.abspath(out_dir)}/logs/slurm-%A_%a.out", *sbatch_args,
           *(["--wait"] if wait else []), SBATCH, config]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    job = done.stdout.strip().split(";")[0]
    if not job:  # --wait also exits non-zero when a task failed, after printing the id
        raise RuntimeError(f"sbatch failed ({done.returncode}): {done.stderr.strip()}")
    return job


def run_summary(point: Point) -> dict:
    """One run's row, from its metrics.jsonl (None values where it has no such record yet)."""
    path = os.path.join(point.run_dir, "metrics.jsonl")
    records = read_jsonl(path) if os.path.isfile(path) else []
    train = [r for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    seconds, tokens_before = 0.0, 0
    for r in train:
        seconds += (r["tokens"] - tokens_before) / r["tokens_per_s"]
        tokens_before = r["tokens"]
    return {"name": point.name, **point.values, "seed": point.seed,
            "status": "finished" if finished(point.run_dir) else ("partial" if train else "missing"),
            "steps": train[-1]["step"] if train else 0,
            "final_val_loss": val[-1] if val else None, "best_val_loss": min(val) if val else None,
            "final_train_loss": train[-1]["loss"] if train else None,
            "tokens": train[-1]["tokens"] if train else 0, "train_s": seconds, "run_dir": point.run_dir}


def _mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def group_summary(points: list, runs: list) -> list[dict]:
    """Per grid point: the seeds' mean and std of the final and best held-out loss."""
    groups = {}
    for p, r in zip(points, runs):
        groups.setdefault(p.group(), []).append(r)
    rows = []
    for group, members in groups.items():
        final, final_std = _mean_std([r["final_val_loss"] for r in members])
        best, best_std = _mean_std([r["best_val_loss"] for r in members])
        rows.append({**dict(group), "seeds": len(members), "finished": sum(r["status"] == "finished" for r in members),
                     "final_val_loss": final, "final_val_loss_std": final_std,
                     "best_val_loss": best, "best_val_loss_std": best_std})
    return rows


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def numeric(labels) -> list | None:
    """The labels as floats, or None if any is not a number."""
    try:
        return [float(v) for v in labels]
    except ValueError:
        return None


def plot(points: list, runs: list, groups: list, axes: list, path: str) -> str:
    """Training-loss curves (one color per grid point) and final held-out loss vs the first axis
    (a line per combination of the others, seed std as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, final) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(dict.fromkeys(p.group() for p in points), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 20))
    labelled = set()
    for p in points:
        metrics_path = os.path.join(p.run_dir, "metrics.jsonl")
        train = [r for r in read_jsonl(metrics_path) if "loss" in r] if os.path.isfile(metrics_path) else []
        label = ",".join(f"{k}={v}" for k, v in p.values.items()) or "run"
        curves.plot([r["step"] for r in train], [r["loss"] for r in train], color=colors[p.group()], alpha=0.7,
                    label=None if label in labelled else label)
        labelled.add(label)
    curves.set(xlabel="step", ylabel="training loss", title="loss curves")
    if axes:
        x_axis, others = axes[0].name, [a.name for a in axes[1:]]
        lines = {}
        for g in groups:
            lines.setdefault(tuple(g[o] for o in others), []).append(g)
        for key, members in lines.items():
            xs = numeric([g[x_axis] for g in members]) or list(range(len(members)))
            done = [(x, g) for x, g in zip(xs, members) if g["final_val_loss"] is not None]
            final.errorbar([x for x, _ in done], [g["final_val_loss"] for _, g in done],
                           yerr=[g["final_val_loss_std"] for _, g in done], marker="o", capsize=3,
                           label=",".join(f"{o}={v}" for o, v in zip(others, key)) or None)
        xs = numeric([label for label, _ in axes[0].choices])
        if xs is None:
            final.set_xticks(range(len(axes[0].choices)), [label for label, _ in axes[0].choices])
        elif min(xs) > 0 and max(xs) / min(xs) >= 10:
            final.set_xscale("log")
        final.set(xlabel=x_axis, ylabel="final held-out loss", title="final held-out loss (mean ± std over seeds)")
    for ax in (curves, final):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def collect(points: list, axes: list, out_dir: str) -> dict:
    """Write <out>/sweep.{json,md,png}; returns the JSON's content and the Markdown ("markdown")."""
    runs = [run_summary(p) for p in points]
    groups = group_summary(points, runs)
    names = [a.name for a in axes]
    md = (f"# Sweep {out_dir}\n\nPer grid point (mean ± std over seeds):\n\n"
          + markdown_table(groups, [*names, "seeds", "finished", "final_val_loss", "final_val_loss_std",
                                    "best_val_loss", "best_val_loss_std"])
          + "\n\nPer run:\n\n"
          + markdown_table(runs, ["name", "status", "steps", "final_val_loss", "best_val_loss", "final_train_loss",
                                  "tokens", "train_s"]) + "\n")
    result = {"axes": {a.name: [label for label, _ in a.choices] for a in axes}, "runs": runs, "groups": groups}
    write_json(os.path.join(out_dir, "sweep.json"), result)
    write_atomic(os.path.join(out_dir, "sweep.md"), md)
    plot(points, runs, groups, axes, os.path.join(out_dir, "sweep.png"))
    return {**result, "markdown": md}


def sweep(config: str, axes: list, out_dir: str, seeds: int = 1, overrides=(), slurm: bool = False,
          sbatch_args=(), wait: bool = True, env=None) -> dict:
    """Plan, train (here, or as a Slurm array when `slurm`), collect. Returns collect()'s result
    plus "status" (name -> how this call left it) and, for Slurm, "job"."""
    config = os.path.abspath(config)  # Slurm tasks may start elsewhere
    points = plan(config, axes, seeds, out_dir, overrides)
    write_plan(points, out_dir)
    if slurm:
        job = submit_slurm(config, points, out_dir, sbatch_args, wait, env)
        extra = {"job": job}
        print(f"submitted job array {job}" if job else "every run is finished: nothing submitted", flush=True)
        if job and not wait:
            return extra
    else:
        extra = {"status": run_local(config, points, out_dir, env)}
    result = {**collect(points, axes, out_dir), **extra}
    print(result["markdown"])
    return result


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m llm sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotlist overrides shared by every run")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a swept key and its values (repeat for a grid)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per grid point: train.seed, +1, ...")
    p.add_argument("--out", help="sweep directory (default runs/sweeps/<config name>)")
    p.add_argument("--slurm", action="store_true", help="submit a job array through launch/slurm.sbatch")
    p.add_argument("--sbatch-args", default="", help="more sbatch options, e.g. '--nodes=2 --time=60'")
    p.add_argument("--no-wait", action="store_true",
                   help="with --slurm: return once submitted (tabulate later with --collect)")
    p.add_argument("--collect", action="store_true", help="only write the table of what is there")
    a = p.parse_args(argv)
    out = a.out or os.path.join("runs", "sweeps", os.path.splitext(os.path.basename(a.config))[0])
    axes = [Axis.parse(g) for g in a.grid]
    if a.collect:
        points = plan(a.config, axes, a.seeds, out, a.overrides)
        print(collect(points, axes, out)["markdown"])
        return
    result = sweep(a.config, axes, out, a.seeds, a.overrides, a.slurm, shlex.split(a.sbatch_args), not a.no_wait)
    if "failed" in result.get("status", {}).values() or any(r["status"] != "finished" for r in result.get("runs", [])):
        sys.exit(1)


# Reproductions (llm/reproduce/<claim>.py) are sweeps: their --quick runs take this tiny shape
# (seconds a run on CPU), and every run logs quietly with the vocabulary of the data it reads.
TINY = ("model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.seq_len=32", "train.global_batch_size=8",
        "train.micro_batch_size=8", "train.budget.flops=null", "optim.warmup_steps=1", "eval.windows=4")
QUIET = ("logging.wandb=disabled", "logging.progress=false")


def reproduction_overrides(config: str, quick: bool, overrides=()) -> tuple:
    """QUIET, TINY when quick, model.vocab_size of the config's data.path, then `overrides` (which win)."""
    from llm.data import TokenShards

    base = (*QUIET, *(TINY if quick else ()))
    path = load_config(config, (*base, *overrides)).data.path
    if not os.path.isdir(path):
        raise ConfigError(f"data.path={path}: no such directory; make it with `python -m data_prep tokenize "
                          f"--source builtin:python-docs --out {path}` or pass data.path=DIR")
    return (*base, f"model.vocab_size={TokenShards(path, 'train').vocab_size}", *overrides)


def reproduce_command(name: str, quick: bool, seeds: int) -> str:
    return f"python -m llm reproduce {name}" + (" --quick" if quick else "") + f" --seeds {seeds}"
