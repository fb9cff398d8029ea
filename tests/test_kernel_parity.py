"""fla's real Triton kernels against our torch references, on CPU under Triton's interpreter.

For every op the dispatch in `llm.ops` sends to fla, `backend="fla"` and `backend="torch"` get
the same inputs in fp16 and bf16; the output, the final state and every gradient (initial state
included, where fla has a backward) must agree within the named relative tolerances below. Then
the same through the DeltaNet, Gated DeltaNet and Mesa layers built by `build_model` with
model.kernels=fla vs torch and the same weights. A glue that hands fla exp(g) instead of g must fail.

Runs in a pytest process of its own, because TRITON_INTERPRET must be set before fla is imported:
    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernel_parity.py
(needs `pip install -e .[kernels-cpu]`). The table of errors prints in pytest's terminal summary.
The one hook into llm: `llm.ops.utils.kernel_inputs_ok` is patched to accept CPU tensors.
"""
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("fla kernel parity runs in its own process: TRITON_INTERPRET=1 python -m pytest "
                "tests/test_kernel_parity.py", allow_module_level=True)
try:  # asked for explicitly: fail, not skip, where the kernels are missing
    import fla.ops  # noqa: F401
except ImportError as missing:
    raise ImportError("the kernel parity test needs triton and fla: pip install -e '.[kernels-cpu]'") from missing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import triton_cpu  # noqa: E402  (tests/ is on sys.path, as for stepping.py)
from llm.model import build_model  # noqa: E402
from llm.ops.delta_rule import chunk_delta_rule, recurrent_delta_rule  # noqa: E402
from llm.ops.mesa import chunk_mesa  # noqa: E402

triton_cpu.install()

# Largest |fla - torch| over the largest |torch| of each tensor. Ops: the same half-precision
# inputs, the torch path computing in fp32; seen here up to 3e-3 in fp16 and 7e-3 in bf16.
FP16_REL_TOL = 5e-3
BF16_REL_TOL = 4e-2
# Layers run in the half dtype throughout, and their parameter gradients are sums over all B * T
# tokens that autograd accumulates in that dtype: the torch path's own error against an fp32 run
# reaches 6e-2 in bf16 (Mesa's b_proj.bias). fla's Mesa also keeps its chunk states in bf16 for
# fp16 inputs. Seen here: up to 8e-3 in fp16 and 4.5e-2 in bf16.
LAYER_FP16_REL_TOL = 2e-2
LAYER_BF16_REL_TOL = 8e-2
REL_TOL = {"op": {torch.float16: FP16_REL_TOL, torch.bfloat16: BF16_REL_TOL},
           "layer": {torch.float16: LAYER_FP16_REL_TOL, torch.bfloat16: LAYER_BF16_REL_TOL}}
DTYPES = [torch.float16, torch.bfloat16]
B, T, H, D = 2, 100, 2, 32  # T not a multiple of fla's 64-token chunks: the tail is exercised

TABLE = []  # (case, dtype, tensor, relative error, tolerance)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _delta_inputs(dtype, gated):
    """Leaves for the delta rule: half q, k (unit norm, as fla expects), v; fp32 beta, g, state."""
    x = {"q": _randn(B, T, H, D, seed=1).to(dtype), "k": F.normalize(_randn(B, T, H, D, seed=2), dim=-1).to(dtype),
         "v": _randn(B, T, H, D, seed=3).to(dtype), "beta": _randn(B, T, H, seed=4).sigmoid(),
         "initial_state": 0.1 * _randn(B, H, D, D, seed=5)}
    if gated:
        x["g"] = F.logsigmoid(_randn(B, T, H, seed=6) + 3.0)  # decays around exp(-0.05)
    return x


def _mesa_inputs(dtype):
    """Leaves for Mesa: unit-norm q, k; log-decay g; beta; lamb > 0.25; a symmetric PSD H0 and G0."""
    A = _randn(B, H, D, D, seed=7) / D ** 0.5
    return {"q": F.normalize(_randn(B, T, H, D, seed=1), dim=-1).to(dtype),
            "k": F.normalize(_randn(B, T, H, D, seed=2), dim=-1).to(dtype), "v": _randn(B, T, H, D, seed=3).to(dtype),
            "g": F.logsigmoid(_randn(B, T, H, seed=6) + 3.0), "beta": _randn(B, T, H, seed=4).sigmoid(),
            "lamb": F.softplus(_randn(H, D, seed=8)) + 0.25,
            "initial_state": (A @ A.mT, 0.1 * _randn(B, H, D, D, seed=9))}


@dataclass
class OpCase:
    op: Callable  # ours: op(q, k, v, **kwargs, backend=...) -> (o, final state)
    fla_module: str  # where our glue finds fla's kernel
    fla_name: str
    inputs: Callable  # dtype -> dict of leaf tensors (initial_state may be a pair)
    backward: bool = True  # fla's fused_recurrent_gated_delta_rule has no backward


OP_CASES = {
    "chunk_delta_rule": OpCase(chunk_delta_rule, "fla.ops.delta_rule", "chunk_delta_rule",
                               lambda dt: _delta_inputs(dt, gated=False)),
    "chunk_gated_delta_rule": OpCase(chunk_delta_rule, "fla.ops.gated_delta_rule", "chunk_gated_delta_rule",
                                     lambda dt: _delta_inputs(dt, gated=True)),
    "fused_recurrent_delta_rule": OpCase(recurrent_delta_rule, "fla.ops.delta_rule", "fused_recurrent_delta_rule",
                                         lambda dt: _delta_inputs(dt, gated=False)),
    "fused_recurrent_gated_delta_rule": OpCase(recurrent_delta_rule, "fla.ops.gated_delta_rule",
                                               "fused_recurrent_gated_delta_rule",
                                               lambda dt: _delta_inputs(dt, gated=True), backward=False),
    "chunk_mesa_net": OpCase(chunk_mesa, "fla.ops.mesa_net", "chunk_mesa_net", _mesa_inputs),
}


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """The one hook: let the dispatch send CPU tensors to fla (the interpreter runs them)."""
    monkeypatch.setattr("llm.ops.utils.kernel_inputs_ok", lambda *tensors: True)


def wrap_fla(monkeypatch, case: OpCase, change_kwargs: Optional[Callable] = None):
    """Replace fla's kernel (where our glue looks it up) by a wrapper that records each call and
    optionally rewrites its keyword arguments; returns the list of recorded calls."""
    module = importlib.import_module(case.fla_module)
    kernel = getattr(module, case.fla_name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(sorted(kwargs))
        return kernel(*args, **(change_kwargs(kwargs) if change_kwargs else kwargs))

    monkeypatch.setattr(module, case.fla_name, wrapper)
    return calls


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
        loss = sum((t.float() * _randn(*t.shape, seed=10 + i)).sum() for i, t in enumerate(results.values()))
        loss.backward()
        for name, x in {"q": q, "k": k, "v": v, **fresh}.items():
            results.update({f"d{n}": t.grad for n, t in _flat(name, x).items()})
    return results


def relative_error(got, want) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def assert_parity(label, dtype, tol, got: dict, want: dict):
    """Every tensor of `want` within relative error `tol` of `got` (NaN fails; a gradient that one
    side does not produce fails too). Records the errors in TABLE."""
    errors = {}
    for name, w in want.items():
        g = got.get(name)
        errors[name] = float("nan") if g is None or w is None else relative_error(g, w)
        TABLE.append((label, str(dtype).removeprefix("torch."), name, errors[name], tol))
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"{label} in {dtype}: fla and torch differ beyond {tol} (relative): {bad}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(OP_CASES))
def test_op_parity(name, dtype, kernels_on_cpu, monkeypatch):
    case = OP_CASES[name]
    leaves = case.inputs(dtype)
    calls = wrap_fla(monkeypatch, case)
    got = run_op(case, leaves, "fla", case.backward)
    assert len(calls) == 1, f"backend='fla' did not reach fla's {case.fla_name}"
    want = run_op(case, leaves, "torch", case.backward)
    assert len(calls) == 1, "backend='torch' called fla"
    assert_parity(name, dtype, REL_TOL["op"][dtype], got, want)


def test_bf16_codec_matches_torch():
    """The shim's bf16 rounding is torch's (nearest, ties to even), ties and overflow included;
    NaN stays NaN (its bits may differ)."""
    x = torch.cat([_randn(4096, seed=13) * 10.0 ** torch.arange(-20, 20, 10).repeat(1024),
                   torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3.4e38, float("inf"), float("nan")])])
    bits = torch.from_numpy(triton_cpu.f32_to_bf16(x.numpy()).view("int16"))
    number = ~x.isnan()
    assert torch.equal(bits[number], x.to(torch.bfloat16).view(torch.int16)[number])
    decoded = torch.from_numpy(triton_cpu.bf16_to_f32(bits.numpy().view("uint16")))
    torch.testing.assert_close(decoded, x.to(torch.bfloat16).float(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_wrong_glue_is_caught(kernels_on_cpu, monkeypatch):
    """The check has teeth: a glue that passed exp(g) where fla wants the log-decay g fails it."""
    case, dtype = OP_CASES["chunk_gated_delta_rule"], torch.float16
    leaves = case.inputs(dtype)
    want = run_op(case, leaves, "torch", backward=False)
    calls = wrap_fla(monkeypatch, case, change_kwargs=lambda kw: {**kw, "g": kw["g"].exp()})
    got = run_op(case, leaves, "fla", backward=False)
    assert calls, "the wrong glue was never called"
    with pytest.raises(AssertionError, match="differ beyond"):
        assert_parity("chunk_gated_delta_rule [exp(g) for g]", dtype, REL_TOL["op"][dtype], got, want)


MIXERS = {"deltanet": "chunk_delta_rule", "gated_deltanet": "chunk_gated_delta_rule", "mesa": "chunk_mesa_net"}


def run_mixer(name, kernels, dtype, x, state_dict=None):
    """Layer 0's mixer of a one-layer model (build_model, model.kernels=`kernels`) in `dtype`:
    its output and the gradients of a random projection of it w.r.t. x and every parameter."""
    torch.manual_seed(0)
    model = build_model({"vocab_size": 64, "d_model": H * D, "n_layers": 1, "n_heads": H, "mixer": name,
                         "kernels": kernels})
    mixer = model.blocks[0].mixer
    if state_dict is not None:
        mixer.load_state_dict(state_dict)
    mixer.to(dtype)
    x = x.to(dtype, copy=True).requires_grad_()
    y = mixer(x)
    (y.float() * _randn(*y.shape, seed=11)).sum().backward()
    grads = {f"d{n}": p.grad for n, p in mixer.named_parameters()}
    return {"y": y, "dx": x.grad, **grads}, mixer.state_dict()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_parity(name, dtype, kernels_on_cpu, monkeypatch):
    case = OP_CASES[MIXERS[name]]
    calls = wrap_fla(monkeypatch, case)
    x = _randn(B, T, H * D, seed=12)
    want, weights = run_mixer(name, "torch", dtype, x)
    assert not calls, "model.kernels=torch called fla"
    got, _ = run_mixer(name, "fla", dtype, x, weights)
    assert len(calls) == 1, f"model.kernels=fla did not reach fla's {MIXERS[name]}"
    assert_parity(f"{name} layer", dtype, REL_TOL["layer"][dtype], got, want)


class _ParityTable:
    """A pytest plugin that prints TABLE in the terminal summary (shown with or without -s)."""

    def pytest_terminal_summary(self, terminalreporter):
        if not TABLE:
            return
        tr = terminalreporter
        tr.section("fla vs torch reference (Triton interpreter, CPU): max relative error")
        tr.write_line(f"{'case':40} {'dtype':6} {'tensor':22} {'rel err':>9} {'tol':>7}")
        for case, dtype, tensor, err, tol in TABLE:
            tr.write_line(f"{case:40} {dtype:6} {tensor:22} {err:9.2e} {tol:7.0e}{'' if err <= tol else '  FAIL'}")


@pytest.fixture(scope="module", autouse=True)
def parity_table(request):
    request.config.pluginmanager.register(_ParityTable(), "kernel_parity_table")
