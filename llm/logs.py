"""Run logs written by rank 0: JSONL record files (metrics.jsonl, telemetry.jsonl) and the console.

Every JSONL record has a `step`. A resumed run trains and measures again the steps after its
checkpoint, so `JsonlLog` drops the records a crashed run wrote past the step it resumes from; a
fresh run (start step 0) starts the file over.
"""
import json
import os

from omegaconf import OmegaConf

from llm.files import write_atomic


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
                f.writelines(json.dumps(r) + "\n" for r in records)


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
