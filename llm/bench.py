"""`python -m llm bench CONFIG [overrides...] --steps N --device-name NAME --out FILE`.

Times training steps (forward, backward, clipping, AdamW step) of the config's model at its
micro batch and seq_len on one device (CUDA if available, else CPU; bf16 autocast where the
trainer would use bf16) and appends {device_name, bench_key, model summary, tokens_per_s} to a
JSON list (default benchmarks/results.json). `train.budget.accelerator_hours` converts hours into
tokens with the newest record for its `reference_device` and the config's bench_key (llm.budget).
"""
import argparse
import contextlib
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from llm.config import ConfigError, load_config
from llm.files import write_json
from llm.model import build_model
from llm.model.gpt import layer_mixers
from llm.optim import param_groups

DEFAULT_RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results.json"


def bench_key(cfg) -> str:
    """What the throughput depends on: the model, seq_len, micro batch size and dtype."""
    spec = {"model": OmegaConf.to_container(cfg.model, resolve=True), "seq_len": cfg.data.seq_len,
            "micro_batch_size": cfg.train.micro_batch_size, "dtype": cfg.train.dtype}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def default_device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{platform.machine()}"


def measure(cfg, steps: int, warmup: int = 2) -> dict:
    """Seconds and tokens/s of `steps` training steps on random tokens, after `warmup` steps."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.train.dtype if cfg.train.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    m, T = cfg.train.micro_batch_size, cfg.data.seq_len
    batch = torch.randint(cfg.model.vocab_size, (m, T + 1), device=device)
    autocast = torch.autocast(device.type, torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    def step():
        with autocast:
            logits = model(batch[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": steps * m * T / seconds, "dtype": dtype,
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llm bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.micro_batch_size=8")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--device-name", default=None, help="name to record (default: the CUDA device name or cpu-<arch>)")
    p.add_argument("--out", default=str(DEFAULT_RESULTS), help="JSON list to append to")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be >= 1")
    cfg = load_config(a.config, a.overrides)
    result = measure(cfg, a.steps)
    record = {"device_name": a.device_name or default_device_name(), "bench_key": bench_key(cfg),
              "config": os.path.relpath(a.config), "overrides": list(a.overrides),
              "model": {"layers": layer_mixers(cfg.model), "d_model": cfg.model.d_model,
                        "params": result["params"]},
              "seq_len": cfg.data.seq_len, "micro_batch_size": cfg.train.micro_batch_size,
              "dtype": result["dtype"], "steps": a.steps, "seconds": result["seconds"],
              "tokens_per_s": result["tokens_per_s"], "torch": torch.__version__,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    results = read_results(a.out) + [record]
    write_json(a.out, results)
    print(f"{record['device_name']}: {record['tokens_per_s']:,.0f} tokens/s ({a.steps} steps of "
          f"{cfg.train.micro_batch_size} x {cfg.data.seq_len}, {result['dtype']}) -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
