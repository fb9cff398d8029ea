"""`python -m llm bench CONFIG [overrides...] --steps N --device-name NAME --out FILE`.

Times the trainer's own optimizer step (llm.engine: the DeepSpeed engine as `llm train` builds
it, at the config's ZeRO stage, dtype, micro batch and gradient accumulation, on random tokens)
on this process's device (CUDA if available, else CPU) and reports tokens/s per device, MFU
against the device's dense bf16 peak (llm.flops; not reported on CPU, where no peak is known,
unless logging.peak_flops is set) and peak memory (CUDA: the allocator's peak; CPU: the
process's peak resident set). Appends a record {device_name, bench_key, model summary,
tokens_per_s, mfu, peak_memory_bytes, ...} to a JSON list: --out, default benchmarks/results.json
relative to the working directory. `train.budget.accelerator_hours` converts hours into tokens
with the newest record for its `reference_device` and the config's bench_key (llm.budget).
"""
import argparse
import hashlib
import json
import os
import multiprocessing
import platform
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from omegaconf import OmegaConf

from llm import distributed
from llm.config import ConfigError, load_config
from llm.engine import build_engine, resolve_dtype, train_step
from llm.files import write_json
from llm.flops import mfu, peak_flops, train_flops_per_token
from llm.model import build_model
from llm.model.gpt import layer_mixers

DEFAULT_RESULTS = os.path.join("benchmarks", "results.json")  # relative to the working directory


def bench_key(cfg) -> str:
    """What the throughput depends on: the model, seq_len, micro batch size and dtype."""
    spec = {"model": OmegaConf.to_container(cfg.model, resolve=True), "seq_len": cfg.data.seq_len,
            "micro_batch_size": cfg.train.micro_batch_size, "dtype": cfg.train.dtype}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def default_device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{platform.machine()}"


class PeakMemory:
    """Peak memory from `reset()` on: CUDA's allocator peak, or on CPU the process's peak resident
    set (Linux VmHWM, reset through /proc/self/clear_refs; None where that is not available)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif os.path.exists("/proc/self/clear_refs"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := the current resident set

    def peak(self):
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return None

    def kind(self) -> str:
        return "cuda_max_allocated" if self.cuda else "process_peak_rss"


def measure(cfg, steps: int, warmup: int = 2) -> dict:
    """Seconds, tokens/s (per device), MFU and peak memory of `steps` trainer steps after `warmup`.

    In a fresh process: DeepSpeed keeps its process groups in module globals, so a process can set
    up engines only once, and the caller's environment (ranks, port) stays as it was."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(_measure, OmegaConf.to_container(cfg, resolve=True), steps, warmup).result()


def _measure(cfg: dict, steps: int, warmup: int) -> dict:
    cfg = OmegaConf.create(cfg)
    distributed.prepare_env()
    distributed.init(cfg.train.dist_timeout)
    world = distributed.world_size()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    engine, _, _ = build_engine(cfg, model, world, warmup + steps)
    m, T, accum = cfg.train.micro_batch_size, cfg.data.seq_len, engine.gradient_accumulation_steps()
    batch = torch.randint(cfg.model.vocab_size, (m, T + 1), device=engine.device)
    memory = PeakMemory(engine.device)

    def timed(n: int) -> float:
        memory.reset()
        start = time.perf_counter()
        for _ in range(n):
            train_step(engine, lambda i: (batch[:, :-1], batch[:, 1:]), accum, cfg.train.z_loss)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(warmup)
    seconds = timed(steps)
    peak_memory = memory.peak()
    distributed.teardown()
    tokens_per_s = steps * accum * m * T / seconds
    return {"device": engine.device.type, "seconds": seconds, "tokens_per_s": tokens_per_s,
            "dtype": resolve_dtype(cfg.train),
            "mfu": mfu(train_flops_per_token(cfg.model, T), tokens_per_s, peak_flops(cfg.logging.peak_flops)),
            "peak_memory_bytes": peak_memory, "memory_kind": memory.kind(), "grad_accumulation": accum,
            "params": sum(p.numel() for p in model.parameters())}


def read_results(path) -> list:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def find_throughput(cfg, device_name: str, path=None) -> dict:
    """The newest bench record of this config (bench_key) on `device_name`."""
    path = path or DEFAULT_RESULTS
    key = bench_key(cfg)
    records = [r for r in read_results(path) if r["device_name"] == device_name and r["bench_key"] == key]
    if not records:
        raise ConfigError(
            f"train.budget.accelerator_hours: {path} has no throughput for device {device_name!r} and this "
            f"model / seq_len / micro batch / dtype (bench_key {key}); measure it on that device with: "
            f"python -m llm bench <this config> [overrides] --device-name {device_name!r} --out {path}")
    return records[-1]


def describe(record: dict) -> str:
    """One line: tokens/s, MFU (or why there is none), peak memory."""
    if record["mfu"] is not None:
        eff = f"MFU {record['mfu']:.1%}"
    elif record["device"] == "cpu":
        eff = "MFU n/a on CPU (no meaningful peak to compare with; logging.peak_flops sets one)"
    else:
        eff = "MFU n/a (this GPU is not in llm.flops.GPU_PEAK_FLOPS; logging.peak_flops sets its peak)"
    mem = record["peak_memory_bytes"]
    mem = f"peak memory {mem / 2 ** 30:.2f} GiB ({record['memory_kind']})" if mem is not None else "peak memory n/a"
    return (f"{record['device_name']}: {record['tokens_per_s']:,.0f} tokens/s, {eff}, {mem}; {record['steps']} "
            f"steps of {record['grad_accumulation']} x {record['micro_batch_size']} x {record['seq_len']}, {record['dtype']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llm bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.micro_batch_size=8")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--device-name", default=None, help="name to record (default: the CUDA device name or cpu-<arch>)")
    p.add_argument("--out", default=DEFAULT_RESULTS, help=f"JSON list to append to (default: {DEFAULT_RESULTS})")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be >= 1")
    cfg = load_config(a.config, a.overrides)
    result = measure(cfg, a.steps)
    record = {"device_name": a.device_name or default_device_name(), "bench_key": bench_key(cfg),
              "config": os.path.relpath(a.config), "overrides": list(a.overrides),
              "model": {"layers": layer_mixers(cfg.model), "d_model": cfg.model.d_model,
                        "params": result.pop("params")},
              "seq_len": cfg.data.seq_len, "micro_batch_size": cfg.train.micro_batch_size,
              "zero_stage": cfg.train.zero_stage, "steps": a.steps, **result,
              "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    write_json(a.out, read_results(a.out) + [record])
    print(f"{describe(record)} -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
