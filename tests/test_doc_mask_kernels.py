"""Document starts through fla's real kernels: the doc_start -> cu_seqlens dispatch
(`llm.ops.utils.Segments`) against the torch references with doc_start, output, final state and
gradients (initial state included), on CPU under Triton's interpreter (tests/triton_cpu.py).

Runs in a pytest process of its own, as tests/test_kernel_parity.py:
    TRITON_INTERPRET=1 python -m pytest -q tests/test_doc_mask_kernels.py
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("fla kernels run in their own process: TRITON_INTERPRET=1 python -m pytest "
                "tests/test_doc_mask_kernels.py", allow_module_level=True)
triton_cpu = pytest.importorskip("triton_cpu")  # tests/ is on sys.path

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernel_cases import FP16_REL_TOL, relative_error  # noqa: E402
from llm.ops.delta_rule import chunk_delta_rule, recurrent_delta_rule  # noqa: E402
from llm.ops.mesa import chunk_mesa  # noqa: E402

triton_cpu.install()

B, T, H, D = 2, 40, 1, 16  # T spans fla's chunk; starts inside it, in a row, at 0
STARTS = torch.zeros(B, T, dtype=torch.bool)
STARTS[0, [16, 23, 24]] = True
STARTS[1, [0, 31]] = True


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    monkeypatch.setattr("llm.ops.utils.kernel_inputs_ok", lambda *tensors: True)


def inputs(mesa):
    torch.manual_seed(0)
    half = torch.float16
    x = {"q": F.normalize(torch.randn(B, T, H, D), dim=-1).to(half),
         "k": F.normalize(torch.randn(B, T, H, D), dim=-1).to(half),
         "v": torch.randn(B, T, H, D).to(half), "g": F.logsigmoid(torch.randn(B, T, H))}
    if mesa:
        return {**x, "beta": torch.rand(B, T, H), "h_kk": torch.eye(D).expand(B, H, D, D) * 0.5,
                "h_kv": torch.randn(B, H, D, D)}
    return {**x, "beta": torch.rand(B, T, H).to(half), "h0": torch.randn(B, H, D, D)}


def run(case, leaves, backend):
    """(output, final state(s)) of the case on the given leaves, with STARTS."""
    x = leaves
    kw = dict(output_final_state=True, doc_start=STARTS, backend=backend)
    if case == "mesa":
        o, final = chunk_mesa(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], lamb=torch.rand(H, D) + 0.25,
                              initial_state=(x["h_kk"], x["h_kv"]), **kw)
        return o, final
    op = recurrent_delta_rule if case.startswith("recurrent") else chunk_delta_rule
    o, final = op(x["q"], x["k"], x["v"], beta=x["beta"], g=x["g"] if "gated" in case else None,
                  initial_state=x["h0"], **kw)
    return o, (final,)


@pytest.mark.parametrize("case", ["chunk", "chunk_gated", "recurrent", "recurrent_gated", "mesa"])
def test_fla_varlen_matches_the_reference_with_document_starts(case, kernels_on_cpu):
    backward = not case.startswith("recurrent")  # fla's fused recurrent kernels have no backward
    torch.manual_seed(1)
    results = {}
    for backend in ("fla", "torch"):
        leaves = {n: t.clone().requires_grad_(backward) for n, t in inputs(case == "mesa").items()}
        torch.manual_seed(2)  # the same lamb for both
        o, finals = run(case, leaves, backend)
        got = {"o": o, **{f"final{i}": f for i, f in enumerate(finals)}}
        if backward:
            torch.manual_seed(3)
            loss = sum((t.float() * torch.randn(t.shape)).sum() for t in got.values())
            loss.backward()
            got |= {f"d{n}": t.grad for n, t in leaves.items() if t.grad is not None}
        results[backend] = got
    errors = {n: relative_error(results["fla"].get(n), w) for n, w in results["torch"].items()}
    assert all(e <= FP16_REL_TOL for e in errors.values()), errors
