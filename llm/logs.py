"""Run logs written by rank 0: JSONL record files (metrics.jsonl, telemetry.jsonl) and the console.

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
            with open(path) as f:
                keep = [line for line in f if start_step and line.strip() and json.loads(line)["step"] <= start_step]
            write_atomic(path, "".join(keep))

    def append(self, records: list[dict]) -> None:
        if self.active and records:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(strict_json(r), allow_nan=False) + "\n" for r in records)


class MetricsLog:
    """Rank 0: metrics.jsonl, console progress bar, wandb (offline unless configured)."""

    def __init__(self, cfg, out_dir: str, start_step: int, max_steps: int, active: bool):
        self.active = active
        self.file = JsonlLog(os.path.join(out_dir, "metrics.jsonl"), start_step, active)
        self.bar = self.wandb = None
        if not active:
            return
        if cfg.logging.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if cfg.logging.wandb != "disabled":
            import wandb
            self.wandb = wandb.init(project=cfg.logging.project, name=cfg.logging.run_name,
                                    dir=out_dir, mode=cfg.logging.wandb, resume="allow",
                                    config=OmegaConf.to_container(cfg, resolve=True))

    def write(self, record: dict) -> None:
        self.file.append([record])
        if self.active and self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

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
