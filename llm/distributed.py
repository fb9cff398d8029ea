"""Process-group setup for plain `python`, torchrun and SLURM: ranks come from the environment."""
import logging
import os
import re
import socket
import subprocess
from datetime import timedelta

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_env() -> None:
    """Fill RANK/WORLD_SIZE/... for a single process, and pick DeepSpeed's CPU accelerator on CPU.

    Must run before deepspeed is imported (it reads DS_ACCELERATOR at import)."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ \
            and int(os.environ["SLURM_NTASKS"]) > 1:
        # srun launching one task per rank (no torchrun): translate SLURM's variables.
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def slurm_time_left():
    """Seconds until this Slurm job's time limit, or None (not under Slurm, no limit, or squeue failed)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_slurm_time(out)


def parse_slurm_time(text: str):
    """Seconds in squeue's `[days-][[hours:]minutes:]seconds`, or None (UNLIMITED, NOT_SET, ...)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", text)
    if not m:
        return None
    seconds = 0
    for part in m.group(2).split(":"):
        seconds = 60 * seconds + int(part)
    return 86400 * int(m.group(1) or 0) + seconds


def init(timeout_s: float) -> None:
    """Start the process group (once per process) and keep DeepSpeed's logger to warnings."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)

    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s),
                               verbose=False)


def rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64,
                     device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def teardown() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # an explicit teardown avoids ZeRO-3's abort at exit
