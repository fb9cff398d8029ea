"""fla's kernels against the torch references at full length: relative error of every output and
gradient (forward and backward; fla's fused_recurrent_gated_delta_rule is forward only).

    python benchmarks/kernel_parity.py                                # GPU: bf16, T = 2048
    TRITON_INTERPRET=1 python benchmarks/kernel_parity.py --T 64 --B 1 --H 1 --D 16   # CPU check

The cases (inputs, which fla kernel the dispatch must reach, the error measure, the tolerances)
are tests/kernel_cases.py's, shared with the CI test tests/test_kernel_parity.py. On CUDA the
dispatch picks fla by itself (backend="fla"); under TRITON_INTERPRET=1 on a CPU, Triton's
interpreter runs the kernels with the CI test's patches (tests/triton_cpu.py) and the dispatch's
CUDA-input condition is lifted. Exits 1 when an error is above the tolerance (or NaN).
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:  # before fla is imported
    import triton_cpu

    triton_cpu.install()

import torch  # noqa: E402

import llm.ops.utils  # noqa: E402
from kernel_cases import (BF16_REL_TOL, FP16_REL_TOL, OP_CASES, Shape, fla_calls, relative_error,  # noqa: E402
                          run_op, table_lines)

DTYPES = {"bf16": (torch.bfloat16, BF16_REL_TOL), "fp16": (torch.float16, FP16_REL_TOL)}


def compare(name, dtype, tol, shape, device):
    """Rows (case, dtype, tensor, relative error, tol) of one op; checks that fla was reached."""
    case = OP_CASES[name]
    leaves = case.inputs(dtype, shape, device)
    with fla_calls(case) as calls:
        got = run_op(case, leaves, "fla", case.backward)
    if not calls:
        raise RuntimeError(f"{name}: backend='fla' did not reach fla's {case.fla_name}")
    want = run_op(case, leaves, "torch", case.backward)
    label = str(dtype).removeprefix("torch.")
    return [(name, label, tensor, relative_error(got.get(tensor), w), tol) for tensor, w in want.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=64, help="key = value dim per head (fla's Mesa: <= 128)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--ops", default=",".join(OP_CASES), help="comma-separated, from: " + ", ".join(OP_CASES))
    a = p.parse_args(argv)
    if INTERPRET:
        llm.ops.utils.kernel_inputs_ok = lambda *tensors: True  # the interpreter runs CPU tensors
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        p.error("needs a CUDA GPU, or TRITON_INTERPRET=1 for Triton's CPU interpreter")
    dtype, tol = DTYPES[a.dtype]
    shape = Shape(a.B, a.T, a.H, a.D)
    print(f"fla vs torch reference on {device}, {a.dtype}, B={a.B} T={a.T} H={a.H} D={a.D}", flush=True)
    rows = []
    for name in a.ops.split(","):
        start = time.perf_counter()
        rows += compare(name, dtype, tol, shape, device)
        print(f"  {name}: {time.perf_counter() - start:.1f} s (fla + torch, fwd{' + bwd' * OP_CASES[name].backward})",
              flush=True)
    print("\n".join(table_lines(rows)))
    bad = [r for r in rows if not r[3] <= r[4]]
    print(f"{len(rows) - len(bad)}/{len(rows)} tensors within tolerance")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
