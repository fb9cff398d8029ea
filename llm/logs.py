"""Run logs written by rank 0: JSONL record files (metrics.jsonl, telemetry.jsonl), the console
and wandb (one wandb run per run directory, continued by resumed jobs and evaluations).

Every JSONL record has a `step`. A resumed run trains and measures again the steps after its
checkpoint, so `JsonlLog` drops the records a crashed run wrote past the step it resumes from; a
fresh run (start step 0) starts the file over.

The files are strict JSON, which has no NaN or infinity: such a value is written as null and named,
with its value as a string, under the record's `nonfinite` key, e.g. `"loss": null, "grad_norm":
null, "nonfinite": {"loss": "nan", "grad_norm": "inf"}` (nested values by dotted path).
"""
import json
import math
import os
import sys
import uuid

from omegaconf import OmegaConf

from llm.files import write_atomic


def strict_json(record: dict) -> dict:
    """`record` with each non-finite float replaced by None and listed under "nonfinite"."""
    nonfinite = {}

    def clean(value, path):
        if isinstance(value, float) and not math.isfinite(value):
            nonfinite[path] = str(value)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{path}.{k}" if path else k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{path}.{i}") for i, v in enumerate(value)]
        return value
    cleaned = clean(record, "")
    return {**cleaned, "nonfinite": nonfinite} if nonfinite else cleaned


class JsonlLog:
    """One JSON object per line, appended; inactive (not rank 0) logs write nothing."""

    def __init__(self, path: str, start_step: int, active: bool = True):
        self.path, self.active = path, active
        if active and os.path.isfile(path):
            keep = [line for line, record in self._records() if start_step and record["step"] <= start_step]
            write_atomic(path, "".join(keep))

    def _records(self) -> list:
        """(line, record) of each line; a partial last line (the writer was killed mid-append) is
        dropped with a notice, a bad line elsewhere is an error naming it."""
        with open(self.path) as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
        out = []
        for n, line in lines:
            try:
                out.append((line if line.endswith("\n") else line + "\n", json.loads(line)))
            except json.JSONDecodeError as e:
                if n != lines[-1][0]:
                    raise ValueError(f"{self.path}: line {n} is not JSON ({e})") from None
                print(f"note: {self.path}: dropped a partial last line (a run killed while writing it): "
                      f"{line.strip()[:80]!r}", flush=True)
        return out

    def append(self, records: list[dict]) -> None:
        if self.active and records:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(strict_json(r), allow_nan=False) + "\n" for r in records)


WANDB_ID = os.path.join("wandb", "run_id")  # in the run directory: the wandb run its jobs and evaluations log to


def wandb_key(key: str) -> str:
    """A metrics.jsonl key as wandb shows it: val_loss -> val/loss, loss -> train/loss; keys that are
    already grouped (erank_qk/layer0) stay."""
    if "/" in key:
        return key
    return "val/" + key[len("val_"):] if key.startswith("val_") else "train/" + key


def open_wandb(cfg, run_dir: str, continue_run: bool):
    """The wandb run of a run directory (files under RUN_DIR/wandb/). With `continue_run` (a resumed
    job, an evaluation) it continues the run whose id RUN_DIR/wandb/run_id holds, so a requeued
    job is one curve; otherwise it starts a new run and records its id there."""
    import wandb

    path = os.path.join(run_dir, WANDB_ID)
    if continue_run and os.path.isfile(path):
        with open(path) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]  # hex digits: valid wandb run ids
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, run_id)
    return wandb.init(project=cfg.logging.project, name=cfg.logging.run_name, dir=run_dir,
                      mode=cfg.logging.wandb, id=run_id, resume="allow",
                      config=OmegaConf.to_container(cfg, resolve=True))


def log_eval_results(cfg, run_dir: str, results: dict) -> None:
    """Add evaluation results ({name: result}) to the summary of the run directory's wandb run, as
    eval/<name>/<key path> for every number; nothing if training logged no wandb run."""
    if cfg.logging.wandb == "disabled" or not os.path.isfile(os.path.join(run_dir, WANDB_ID)):
        return
    run = open_wandb(cfg, run_dir, continue_run=True)
    run.summary.update(dict(_numbers(results, "eval")))
    run.finish()


def _numbers(node, prefix: str):
    """(key path, value) of every number in nested dicts (lists and text left out)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _numbers(v, f"{prefix}/{k}")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield prefix, node


class MetricsLog:
    """Rank 0: metrics.jsonl, console, wandb (offline unless configured). The console gets a tqdm
    progress bar only on a terminal: in a log file its redrawn frames would pile up, and the
    plain line of every log step (`echo`) already tells the progress."""

    def __init__(self, cfg, out_dir: str, start_step: int, max_steps: int, active: bool):
        self.active = active
        self.file = JsonlLog(os.path.join(out_dir, "metrics.jsonl"), start_step, active)
        self.bar = self.wandb = None
        if not active:
            return
        if cfg.logging.progress and sys.stderr.isatty():  # where tqdm draws
            from tqdm import tqdm
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if cfg.logging.wandb != "disabled":
            self.wandb = open_wandb(cfg, out_dir, continue_run=start_step > 0)

    def write(self, record: dict) -> None:
        self.file.append([record])
        if self.active and self.wandb is not None:
            self.wandb.log({wandb_key(k): v for k, v in record.items() if k != "step"}, step=record["step"])

    def echo(self, text: str) -> None:
        if self.active:
            if self.bar is not None:
                self.bar.write(text)
            else:
                print(text, flush=True)

    def progress(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
