"""fla-vs-torch parity cases, shared by tests/test_kernel_parity.py (CPU, under Triton's
interpreter) and benchmarks/kernel_parity.py (GPU, the real kernels at full length).

For each op the dispatch in `llm.ops` sends to fla: how to make its inputs, which fla kernel our
glue should reach, and a run of the op (forward, and backward where fla has one) that returns
every output and gradient by name. Ops are called with keyword arguments after q, k, v.
"""
import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from llm.ops.delta_rule import chunk_delta_rule, recurrent_delta_rule
from llm.ops.mesa import chunk_mesa

# Largest |fla - torch| over the largest |torch| of each tensor, the ops given the same
# half-precision inputs (the torch path computes in fp32). Seen under the interpreter at T = 100:
# up to 3e-3 in fp16 and 1e-2 in bf16.
FP16_REL_TOL = 5e-3
BF16_REL_TOL = 4e-2


class Shape(NamedTuple):
    B: int
    T: int
    H: int
    D: int  # key = value dim per head (fla's Mesa needs V == K)


def randn(*shape, seed, device="cpu"):
    """Seeded normal noise, drawn on the CPU so every device gets the same numbers."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def delta_inputs(dtype, s: Shape, device, gated):
    """Leaves for the delta rule: half q, k (unit norm, as fla expects), v; fp32 beta, g, state."""
    x = {"q": randn(s.B, s.T, s.H, s.D, seed=1, device=device).to(dtype),
         "k": F.normalize(randn(s.B, s.T, s.H, s.D, seed=2, device=device), dim=-1).to(dtype),
         "v": randn(s.B, s.T, s.H, s.D, seed=3, device=device).to(dtype),
         "beta": randn(s.B, s.T, s.H, seed=4, device=device).sigmoid(),
         "initial_state": 0.1 * randn(s.B, s.H, s.D, s.D, seed=5, device=device)}
    if gated:
        x["g"] = F.logsigmoid(randn(s.B, s.T, s.H, seed=6, device=device) + 3.0)  # decays around exp(-0.05)
    return x


def mesa_inputs(dtype, s: Shape, device):
    """Leaves for Mesa: unit-norm q, k; log-decay g; beta; lamb > 0.25; a symmetric PSD H0 and G0."""
    A = randn(s.B, s.H, s.D, s.D, seed=7, device=device) / s.D ** 0.5
    return {"q": F.normalize(randn(s.B, s.T, s.H, s.D, seed=1, device=device), dim=-1).to(dtype),
            "k": F.normalize(randn(s.B, s.T, s.H, s.D, seed=2, device=device), dim=-1).to(dtype),
            "v": randn(s.B, s.T, s.H, s.D, seed=3, device=device).to(dtype),
            "g": F.logsigmoid(randn(s.B, s.T, s.H, seed=6, device=device) + 3.0),
            "beta": randn(s.B, s.T, s.H, seed=4, device=device).sigmoid(),
            "lamb": F.softplus(randn(s.H, s.D, seed=8, device=device)) + 0.25,
            "initial_state": (A @ A.mT, 0.1 * randn(s.B, s.H, s.D, s.D, seed=9, device=device))}


@dataclass
class OpCase:
    op: Callable  # ours: op(q, k, v, **leaves, output_final_state=True, backend=...) -> (o, state)
    fla_module: str  # where our glue finds fla's kernel
    fla_name: str
    inputs: Callable  # (dtype, Shape, device) -> dict of leaf tensors (initial_state may be a pair)
    backward: bool = True  # fla's fused_recurrent_gated_delta_rule has no backward


OP_CASES = {
    "chunk_delta_rule": OpCase(chunk_delta_rule, "fla.ops.delta_rule", "chunk_delta_rule",
                               lambda *a: delta_inputs(*a, gated=False)),
    "chunk_gated_delta_rule": OpCase(chunk_delta_rule, "fla.ops.gated_delta_rule", "chunk_gated_delta_rule",
                                     lambda *a: delta_inputs(*a, gated=True)),
    "fused_recurrent_delta_rule": OpCase(recurrent_delta_rule, "fla.ops.delta_rule", "fused_recurrent_delta_rule",
                                         lambda *a: delta_inputs(*a, gated=False)),
    "fused_recurrent_gated_delta_rule": OpCase(recurrent_delta_rule, "fla.ops.gated_delta_rule",
                                               "fused_recurrent_gated_delta_rule",
                                               lambda *a: delta_inputs(*a, gated=True), backward=False),
    "chunk_mesa_net": OpCase(chunk_mesa, "fla.ops.mesa_net", "chunk_mesa_net", mesa_inputs),
}


@contextlib.contextmanager
def fla_calls(case: OpCase, change_kwargs: Callable | None = None):
    """Within the block, fla's kernel (where our glue looks it up) is a wrapper that records each
    call and optionally rewrites its keyword arguments; yields the list of recorded calls (so a
    check can tell that backend="fla" really ran fla, and a test can plant a wrong glue)."""
    module = importlib.import_module(case.fla_module)
    kernel, calls = getattr(module, case.fla_name), []

    def wrapper(*args, **kwargs):
        calls.append(sorted(kwargs))
        return kernel(*args, **(change_kwargs(kwargs) if change_kwargs else kwargs))

    setattr(module, case.fla_name, wrapper)
    try:
        yield calls
    finally:
        setattr(module, case.fla_name, kernel)


def _flat(name, value):
    """Named tensors of an op's input or output (Mesa's state is a pair (H, G))."""
    if isinstance(value, tuple):
        return {f"{name}.{part}": t for part, t in zip("HG", value)}
    return {} if value is None else {name: value}


def run_op(case: OpCase, leaves: dict, backend: str, backward: bool) -> dict:
    """The op's output, final state and (with `backward`) the gradients of a fixed random
    projection of both with respect to every leaf, each on fresh copies of `leaves`."""
    fresh = {n: tuple(t.clone().requires_grad_(backward) for t in x) if isinstance(x, tuple)
             else x.clone().requires_grad_(backward) for n, x in leaves.items()}
    q, k, v = fresh.pop("q"), fresh.pop("k"), fresh.pop("v")
    with torch.set_grad_enabled(backward):
        o, state = case.op(q, k, v, **fresh, output_final_state=True, backend=backend)
    results = {"o": o, **_flat("final_state", state)}
    if backward:
        loss = sum((t.float() * randn(*t.shape, seed=10 + i, device=t.device)).sum()
                   for i, t in enumerate(results.values()))
        loss.backward()
        for name, x in {"q": q, "k": k, "v": v, **fresh}.items():
            results.update({f"d{n}": t.grad for n, t in _flat(name, x).items()})
    return results


def relative_error(got, want) -> float:
    """max |got - want| / max |want|; NaN where either side is missing (a gradient fla lacks)."""
    if got is None or want is None:
        return float("nan")
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def table_lines(rows) -> list[str]:
    """Rows (case, dtype, tensor, relative error, tolerance) as aligned text, failures marked."""
    lines = [f"{'case':40} {'dtype':8} {'tensor':22} {'rel err':>9} {'tol':>7}"]
    lines += [f"{case:40} {dtype:8} {tensor:22} {err:9.2e} {tol:7.0e}{'' if err <= tol else '  FAIL'}"
              for case, dtype, tensor, err, tol in rows]
    return lines
