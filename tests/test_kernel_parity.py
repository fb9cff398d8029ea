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
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("fla kernel parity runs in its own process: TRITON_INTERPRET=1 python -m pytest "
                "tests/test_kernel_parity.py", allow_module_level=True)
try:  # asked for explicitly: fail, not skip, where the kernels are missing
    import fla.ops  # noqa: F401
except ImportError as missing:
    raise ImportError("the kernel parity test needs triton and fla: pip install -e '.[kernels-cpu]'") from missing

import torch

import triton_cpu  # tests/ is on sys.path, as for stepping.py
from kernel_cases import (BF16_REL_TOL, FP16_REL_TOL, OP_CASES, Shape, fla_calls, randn,
                          relative_error, run_op, table_lines)
from llm.model import build_model

triton_cpu.install()

# Op tolerances (FP16_REL_TOL, BF16_REL_TOL) live with the cases in kernel_cases.py, shared with
# the GPU check. Layers run in the half dtype throughout, and their parameter gradients are sums
# over all B * T tokens that autograd accumulates in that dtype: the torch path's own error
# against an fp32 run reaches 6e-2 in bf16 (Mesa's b_proj.bias). fla's Mesa also keeps its chunk
# states in bf16 for fp16 inputs. Seen here: up to 8e-3 in fp16 and 4.5e-2 in bf16.
LAYER_FP16_REL_TOL = 2e-2
LAYER_BF16_REL_TOL = 8e-2
REL_TOL = {"op": {torch.float16: FP16_REL_TOL, torch.bfloat16: BF16_REL_TOL},
           "layer": {torch.float16: LAYER_FP16_REL_TOL, torch.bfloat16: LAYER_BF16_REL_TOL}}
DTYPES = [torch.float16, torch.bfloat16]
SHAPE = Shape(B=2, T=100, H=2, D=32)  # T not a multiple of fla's 64-token chunks: the tail is exercised

TABLE = []  # (case, dtype, tensor, relative error, tolerance)


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """The one hook: let the dispatch send CPU tensors to fla (the interpreter runs them)."""
    monkeypatch.setattr("llm.ops.utils.kernel_inputs_ok", lambda *tensors: True)


def assert_parity(label, dtype, tol, got: dict, want: dict):
    """Every tensor of `want` within relative error `tol` of `got` and of the same dtype (NaN
    fails; a gradient that one side does not produce fails too). Records the errors in TABLE."""
    errors = {}
    for name, w in want.items():
        errors[name] = relative_error(got.get(name), w)
        TABLE.append((label, str(dtype).removeprefix("torch."), name, errors[name], tol))
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"{label} in {dtype}: fla and torch differ beyond {tol} (relative): {bad}"
    dtypes = {n: (got[n].dtype, w.dtype) for n, w in want.items() if got[n].dtype != w.dtype}
    assert not dtypes, f"{label} in {dtype}: (fla, torch) return different dtypes: {dtypes}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(OP_CASES))
def test_op_parity(name, dtype, kernels_on_cpu):
    case = OP_CASES[name]
    leaves = case.inputs(dtype, SHAPE, "cpu")
    with fla_calls(case) as calls:
        got = run_op(case, leaves, "fla", case.backward)
        assert len(calls) == 1, f"backend='fla' did not reach fla's {case.fla_name}"
        want = run_op(case, leaves, "torch", case.backward)
        assert len(calls) == 1, "backend='torch' called fla"
    assert_parity(name, dtype, REL_TOL["op"][dtype], got, want)


def test_bf16_codec_matches_torch():
    """The shim's bf16 rounding is torch's (nearest, ties to even), ties and overflow included;
    NaN stays NaN (its bits may differ)."""
    x = torch.cat([randn(4096, seed=13) * 10.0 ** torch.arange(-20, 20, 10).repeat(1024),
                   torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3.4e38, float("inf"), float("nan")])])
    bits = torch.from_numpy(triton_cpu.f32_to_bf16(x.numpy()).view("int16"))
    number = ~x.isnan()
    assert torch.equal(bits[number], x.to(torch.bfloat16).view(torch.int16)[number])
    decoded = torch.from_numpy(triton_cpu.bf16_to_f32(bits.numpy().view("uint16")))
    torch.testing.assert_close(decoded, x.to(torch.bfloat16).float(), rtol=0, atol=0, equal_nan=True)


# Glue mistakes the check must catch: (op, how the planted glue rewrites fla's keyword arguments).
WRONG_GLUES = {
    "exp(g) for g": ("chunk_gated_delta_rule", lambda kw: {**kw, "g": kw["g"].exp()}),
    "initial state dropped": ("chunk_delta_rule", lambda kw: {**kw, "initial_state": None}),
    "lamb doubled": ("chunk_mesa_net", lambda kw: {**kw, "lamb": 2 * kw["lamb"]}),
}


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@pytest.mark.parametrize("mistake", list(WRONG_GLUES))
def test_wrong_glue_is_caught(mistake, kernels_on_cpu):
    """The check has teeth: fla called with one argument wrong fails it."""
    name, change_kwargs = WRONG_GLUES[mistake]
    case, dtype = OP_CASES[name], torch.float16
    leaves = case.inputs(dtype, SHAPE, "cpu")
    want = run_op(case, leaves, "torch", backward=False)
    with fla_calls(case, change_kwargs=change_kwargs) as calls:
        got = run_op(case, leaves, "fla", backward=False)
    assert calls, "the wrong glue was never called"
    with pytest.raises(AssertionError, match="differ beyond"):
        assert_parity(f"{name} [{mistake}]", dtype, REL_TOL["op"][dtype], got, want)


MIXERS = {"deltanet": "chunk_delta_rule", "gated_deltanet": "chunk_gated_delta_rule", "mesa": "chunk_mesa_net"}


def run_mixer(name, kernels, dtype, x, state_dict=None):
    """Layer 0's mixer of a one-layer model (build_model, model.kernels=`kernels`) in `dtype`:
    its output and the gradients of a random projection of it w.r.t. x and every parameter."""
    torch.manual_seed(0)
    model = build_model({"vocab_size": 64, "d_model": SHAPE.H * SHAPE.D, "n_layers": 1, "n_heads": SHAPE.H,
                         "mixer": name, "kernels": kernels})
    mixer = model.blocks[0].mixer
    if state_dict is not None:
        mixer.load_state_dict(state_dict)
    mixer.to(dtype)
    x = x.to(dtype, copy=True).requires_grad_()
    y = mixer(x)
    (y.float() * randn(*y.shape, seed=11)).sum().backward()
    grads = {f"d{n}": p.grad for n, p in mixer.named_parameters()}
    return {"y": y, "dx": x.grad, **grads}, mixer.state_dict()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_parity(name, dtype, kernels_on_cpu):
    x = randn(SHAPE.B, SHAPE.T, SHAPE.H * SHAPE.D, seed=12)
    with fla_calls(OP_CASES[MIXERS[name]]) as calls:
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
        terminalreporter.section("fla vs torch reference (Triton interpreter, CPU): max relative error")
        for line in table_lines(TABLE):
            terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def parity_table(request):
    request.config.pluginmanager.register(_ParityTable(), "kernel_parity_table")


def test_compiled_block_runs_fla_as_a_graph_break(kernels_on_cpu):
    """train.compile with model.kernels=fla: dynamo leaves the fla call to eager (on an H200 with
    torch 2.11 it died tracing fla's own version check) and the compiled block gives the eager
    block's output and gradients."""
    from llm.model.wrap import apply_training_options

    torch.manual_seed(0)
    spec = {"vocab_size": 64, "d_model": SHAPE.H * SHAPE.D, "n_layers": 1, "n_heads": SHAPE.H,
            "mixer": "deltanet", "kernels": "fla"}
    eager, compiled = build_model(spec).half(), build_model(spec).half()
    compiled.load_state_dict(eager.state_dict())
    apply_training_options(compiled, compile=True)
    ids = torch.randint(64, (SHAPE.B, 40))
    compiling = []  # per fla call: whether dynamo was tracing it

    def note(kwargs):
        compiling.append(torch.compiler.is_compiling())
        return kwargs

    with fla_calls(OP_CASES["chunk_delta_rule"], change_kwargs=note) as calls:
        outputs = []
        for model in (eager, compiled):
            logits = model(ids)
            logits.float().square().mean().backward()
            outputs.append({"logits": logits, **{n: p.grad for n, p in model.named_parameters()}})
    assert len(calls) == 2, "the compiled block did not reach fla"
    assert compiling == [False, False], "dynamo traced into the fla call instead of leaving it to eager"
    assert_parity("deltanet block, compiled", torch.float16, REL_TOL["layer"][torch.float16], *outputs[::-1])
