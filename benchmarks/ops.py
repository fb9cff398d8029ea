"""Forward+backward cost of the linear-time ops against softmax attention, as T grows.

    python benchmarks/ops.py --max-T 4096 --heads 2 --dim 64          # CPU: the torch references
    python benchmarks/ops.py --device cuda                             # GPU: fla kernels vs reference

CPU: every (op, T) cell runs in a fresh process, so no allocator state carries over. time = best
wall time of --reps forward+backward passes (loss = mean of o^2) after one untimed pass (the
minimum: on a shared machine other load only ever adds time). memory =
the growth of the process's peak resident set (Linux VmHWM, reset just before the first pass, with
the inputs already allocated and one-time costs paid by a pass at T=64) during that first pass: all
that the op and its backward hold at once (saved activations, temporaries, input gradients) as the
OS sees it. Runs with --threads threads
(default 1: on a shared machine extra OpenMP threads mostly contend).

CUDA: the same ops in bf16 through fla (backend="fla") and through the torch reference
(backend="torch", which computes in fp32 from the same bf16 inputs): max abs difference of the
outputs, forward+backward time (CUDA events) and peak allocated memory of each.
"""
import argparse
import ctypes
import json
import subprocess
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

from llm.ops.delta_rule import chunk_delta_rule, recurrent_delta_rule
from llm.ops.mesa import chunk_mesa, recurrent_mesa


def _delta(x, a, be, gated=True, recurrent=False):
    op = recurrent_delta_rule if recurrent else partial(chunk_delta_rule, chunk_size=a.chunk_size)
    return op(x["q"], x["k"], x["v"], beta=x["beta"], g=x["g"] if gated else None, backend=be)[0]


def _mesa(x, a, be, recurrent=False):
    op = recurrent_mesa if recurrent else partial(chunk_mesa, chunk_size=a.chunk_size, backend=be)
    return op(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], lamb=x["lamb"], cg_steps=a.cg_steps)[0]


def _sdpa(x, a, be):
    q, k, v = (x[n].transpose(1, 2) for n in "qkv")
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


OPS = {  # name -> f(inputs, args, backend) -> o [B, T, H, D]
    "deltanet_chunk": partial(_delta, gated=False),
    "gdn_chunk": _delta,
    "gdn_recurrent": partial(_delta, recurrent=True),
    "mesa_chunk": _mesa,
    "mesa_recurrent": partial(_mesa, recurrent=True),
    "sdpa": _sdpa,
}
CUDA_OPS = ["deltanet_chunk", "gdn_chunk", "mesa_chunk"]  # those with an fla kernel (--device cuda runs these)


def make_inputs(T, a, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, H, D = a.batch, a.heads, a.dim
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = {"q": F.normalize(rand(B, T, H, D), dim=-1), "k": F.normalize(rand(B, T, H, D), dim=-1),
         "v": rand(B, T, H, D), "beta": torch.rand(B, T, H, generator=gen),
         "g": F.logsigmoid(rand(B, T, H) + 3), "lamb": F.softplus(rand(H, D)) + 0.25}
    half = {"q", "k", "v"}
    return {n: t.to(device, dtype if n in half else torch.float32).requires_grad_(n != "lamb") for n, t in x.items()}


def fwd_bwd(op, x, a, backend="torch"):
    o = OPS[op](x, a, backend)
    o.float().square().mean().backward()
    for t in x.values():
        t.grad = None
    return o


def _status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def worker(op, T, a):
    """One CPU cell, in its own process: prints {"time": s, "mem": bytes}."""
    torch.set_num_threads(a.threads)
    fwd_bwd(op, make_inputs(min(T, 64), a), a)  # one-time costs (autograd engine, BLAS init) off the count
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # and hand its freed memory back, so reuse hides nothing
    x = make_inputs(T, a)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _status("VmRSS")
    fwd_bwd(op, x, a)
    mem = _status("VmHWM") - base
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        fwd_bwd(op, x, a)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"time": min(times), "mem": mem}))


def cpu_table(a):
    Ts = [T for T in (2 ** i for i in range(6, 20)) if a.min_T <= T <= a.max_T]
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                   if k in ("batch", "heads", "dim", "chunk_size", "cg_steps", "reps", "threads")]
    res = {}
    for op in a.ops:
        for T in Ts:
            out = subprocess.run([sys.executable, __file__, "--worker", op, str(T), *passthrough],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{op} T={T} failed:\n{out.stderr}")
            res[op, T] = json.loads(out.stdout.strip().splitlines()[-1])
            r = res[op, T]
            print(f"  {op:15s} T={T:5d}  {r['time'] * 1e3:9.1f} ms  {r['mem'] / 2 ** 20:8.1f} MiB",
                  file=sys.stderr, flush=True)
    print(f"\nCPU forward+backward, B={a.batch} H={a.heads} D={a.dim} chunk={a.chunk_size} cg_steps={a.cg_steps} "
          f"threads={a.threads}; x2 = growth from T/2; /sdpa = ratio to softmax SDPA at the same T")
    print(f"{'op':15s} {'T':>5s} | {'time ms':>9s} {'x2':>5s} {'/sdpa':>6s} | {'peak MiB':>9s} {'x2':>5s} {'/sdpa':>6s}")
    for op in a.ops:
        for T in Ts:
            r, prev, ref = res[op, T], res.get((op, T // 2)), res.get(("sdpa", T))
            cells = []
            for key, fmt, scale in (("time", "9.1f", 1e3), ("mem", "9.1f", 2 ** -20)):
                growth = f"{r[key] / prev[key]:5.2f}" if prev and prev[key] > 0 else f"{'':5s}"
                ratio = f"{r[key] / ref[key]:6.2f}" if ref and ref[key] > 0 and op != "sdpa" else f"{'':6s}"
                cells.append(f"{r[key] * scale:{fmt}} {growth} {ratio}")
            print(f"{op:15s} {T:5d} | {cells[0]} | {cells[1]}")


def cuda_table(a):
    import importlib.util
    if not torch.cuda.is_available() or importlib.util.find_spec("fla") is None:
        sys.exit("--device cuda needs a GPU and fla (pip install -e .[gpu])")

    def timed(op, x, backend):
        fwd_bwd(op, x, a, backend)  # warm-up (Triton compiles here)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(a.reps):
            fwd_bwd(op, x, a, backend)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / a.reps, torch.cuda.max_memory_allocated() / 2 ** 20

    print(f"CUDA ({torch.cuda.get_device_name()}) bf16 forward+backward, B={a.batch} H={a.heads} D={a.dim}; "
          f"err = max |fla - torch reference| of o")
    print(f"{'op':15s} {'T':>5s} | {'fla ms':>8s} {'ref ms':>8s} {'speedup':>7s} | "
          f"{'fla MiB':>8s} {'ref MiB':>8s} | {'err':>8s}")
    Ts = [T for T in (2 ** i for i in range(6, 20)) if a.min_T <= T <= a.max_T]
    for op in [o for o in a.ops if o in CUDA_OPS]:
        for T in Ts:
            x = make_inputs(T, a, "cuda", torch.bfloat16)
            with torch.no_grad():
                err = (OPS[op](x, a, "fla").float() - OPS[op](x, a, "torch").float()).abs().max().item()
            (t_fla, m_fla), (t_ref, m_ref) = timed(op, x, "fla"), timed(op, x, "torch")
            print(f"{op:15s} {T:5d} | {t_fla:8.2f} {t_ref:8.2f} {t_ref / t_fla:7.2f} | "
                  f"{m_fla:8.1f} {m_ref:8.1f} | {err:8.1e}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--ops", type=lambda s: s.split(","), default="gdn_chunk,gdn_recurrent,mesa_chunk,sdpa",
                   help=f"comma-separated, from: {', '.join(OPS)}")
    p.add_argument("--min-T", type=int, default=512)
    p.add_argument("--max-T", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64, help="head dim (K = V)")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--cg-steps", type=int, default=30)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per cell")
    p.add_argument("--worker", nargs=2, metavar=("OP", "T"), help=argparse.SUPPRESS)
    a = p.parse_args()
    unknown = set(a.ops) - set(OPS)
    if unknown:
        p.error(f"unknown ops {sorted(unknown)}; choose from {', '.join(OPS)}")
    if a.worker:
        worker(a.worker[0], int(a.worker[1]), a)
    elif a.device == "cuda":
        cuda_table(a)
    else:
        cpu_table(a)


if __name__ == "__main__":
    main()
