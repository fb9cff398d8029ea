"""Real training runs for the multi-process tests: a tiny config, launches through launch/torchrun.sh
(or plain python for one rank) with their output in a log file, their rank processes, metrics."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds for one run: generous, as CI machines are shared

# G = 6 sequences per step splits evenly over 1, 2 and 3 ranks (grad accumulation 6, 3, 2).
TINY = {
    "model": {"vocab_size": 512, "d_model": 32, "n_layers": 2, "n_heads": 2, "mixer": "softmax"},
    "data": {"seq_len": 32},
    "optim": {"lr": 1.0e-2, "warmup_steps": 2},
    "train": {"max_steps": 6, "global_batch_size": 6, "micro_batch_size": 1, "eval_every": 1000,
              "ckpt_every": 1000, "keep_last": 2, "dist_timeout": 60},
    "eval": {"windows": 4, "final": True},
    "logging": {"log_every": 1, "wandb": "disabled", "progress": False},
}


def write_config(path: Path, data_dir) -> Path:
    cfg = {**TINY, "data": {**TINY["data"], "path": str(data_dir)}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    """This interpreter's environment for a launch: its bin/ first on PATH (torchrun.sh calls
    `torchrun`), one OpenMP thread per rank (2 cores), and no rank or Slurm variables of our own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                        "MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Launch:
    """A launched command, its output appended to `log`. Every launch is killed at kill_all()."""
    live: list["Launch"] = []

    def __init__(self, cmd: list, log: Path, env: dict, new_session: bool = False):
        self.log = log
        with open(log, "ab") as out:  # new_session: its own process group, as a terminal's foreground job
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                         start_new_session=new_session)
        Launch.live.append(self)

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.proc.args} ran past {timeout} s; output:\n{self.output()[-5000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ranks(self) -> list:
        """The training processes: torchrun's workers (`python -u -m llm train`), or the process itself."""
        procs = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        return [p for p in procs if p.cmdline()[1:4] in (["-u", "-m", "llm"], ["-m", "llm", "train"])]

    def kill(self) -> None:
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True) + [psutil.Process(self.proc.pid)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()


def kill_all() -> None:
    while Launch.live:
        Launch.live.pop().kill()


def launch(config, run_dir: Path, *overrides, nproc: int = 2, log: Path = None, new_session: bool = False,
           **env) -> Launch:
    """Train `config` into `run_dir`: launch/torchrun.sh with `nproc` ranks, or plain python for 1."""
    if nproc > 1:
        cmd = [str(ROOT / "launch" / "torchrun.sh")]
        env.setdefault("NPROC_PER_NODE", nproc)
    else:
        cmd = [sys.executable, "-m", "llm", "train"]
    cmd += [str(config), f"train.out_dir={run_dir}", *overrides]
    return Launch(cmd, log or run_dir.with_name(run_dir.name + ".log"), clean_env(**env), new_session)


def train(config, run_dir: Path, *overrides, nproc: int = 2, **env) -> str:
    """Launch and wait; the run must succeed. Returns its output."""
    run = launch(config, run_dir, *overrides, nproc=nproc, **env)
    rc = run.wait()
    assert rc == 0, f"training exited with {rc}; output:\n{run.output()[-5000:]}"
    return run.output()


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def metrics(run_dir: Path) -> dict:
    """step -> metrics record, for the training records (not the step-0 evaluation)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


def wait_for(condition, what: str, timeout: float = TIMEOUT, every: float = 0.2):
    start = time.time()
    while time.time() - start < timeout:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def logged_steps(run_dir: Path) -> int:
    """Training steps in the metrics file so far (0 while it does not exist)."""
    path = run_dir / "metrics.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def loss_table(title: str, columns: dict) -> str:
    """`columns` name -> {step: loss}, side by side (for the test log)."""
    steps = sorted(set().union(*columns.values()))
    lines = [title, "step " + "".join(f"{name:>22}" for name in columns)]
    for s in steps:
        lines.append(f"{s:>4} " + "".join(f"{c[s]:>22.17g}" if s in c else f"{'':>22}" for c in columns.values()))
    return "\n".join(lines)
