"""Run fla's Triton kernels on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1): test-only.

Triton 3.9's interpreter runs each kernel program by program in numpy. Three gaps keep fla's
kernels from running correctly there; `install()` closes them from outside both libraries:

1. Autotuning benchmarks every config on a GPU driver, and there is none ("0 active drivers"):
   keep only the first config that survives pruning, so nothing is benchmarked.
2. fla calls tensor methods on loop indices (`i_t.to(tl.int64)`); the interpreter runs
   `for i_t in range(...)` as a Python loop, so `i_t` is an int. Each `range` / `tl.range` loop
   of a kernel is rewritten (through the interpreter's AST transformer) to first turn its index
   into a Triton tensor.
3. The interpreter keeps bfloat16 as its raw uint16 bits and computes on those bits as
   integers: silently wrong numbers. fla uses bf16 inside its kernels even for fp16 inputs (Mesa's
   chunk states). Every builder op that computes (arithmetic, math, select, fma, dot, casts) and
   every reduction and scan decodes bf16 operands to fp32, computes, and rounds results that
   were bf16 back to bf16 (round to nearest even), as bf16 arithmetic on a GPU does.

TRITON_INTERPRET must be set before fla (or triton) is imported, so kernel tests run in a pytest
process of their own: `TRITON_INTERPRET=1 python -m pytest tests/test_kernel_parity.py`.
"""
import ast
import functools

import numpy as np
import triton.language as tl
from triton.runtime import autotuner, interpreter


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Decode raw bf16 bits (uint16) to float32: bf16 is the top half of a float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 bits (uint16), to nearest, ties to even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    nan = np.isnan(x)
    return np.where(nan, (bits >> 16) | np.uint32(0x40), rounded).astype(np.uint16)


def _is_bf16(handle) -> bool:
    return isinstance(handle, interpreter.TensorHandle) and handle.dtype.scalar == tl.bfloat16


def _decoded(handle):
    """A bf16 handle as an fp32 one; anything else unchanged."""
    if _is_bf16(handle):
        return interpreter.TensorHandle(bf16_to_f32(handle.data), tl.float32)
    return handle


def _encoded(handle):
    """An fp32 result handle rounded back to bf16."""
    if isinstance(handle, interpreter.TensorHandle) and handle.data.dtype == np.float32:
        return interpreter.TensorHandle(f32_to_bf16(handle.data), tl.bfloat16)
    return handle


def _in_fp32(op, result_from):
    """Wrap builder method `op` so bf16 operands are computed on in fp32; the result goes back to
    bf16 when argument `result_from` (the one whose type the result takes) was bf16."""

    @functools.wraps(op)
    def wrapped(self, *args):
        if not any(_is_bf16(a) for a in args):
            return op(self, *args)
        out = op(self, *(_decoded(a) for a in args))
        return _encoded(out) if _is_bf16(args[result_from]) else out

    return wrapped


def _cast(original):
    """Casts from or to bf16 through fp32, rounding to nearest even (the interpreter truncates)."""

    @functools.wraps(original)
    def cast(self, src, dst_type):
        if src.dtype.scalar == tl.bfloat16:
            src = _decoded(src)
            if dst_type.scalar == tl.float32:
                return src
        if dst_type.scalar == tl.bfloat16:
            as_f32 = src if src.dtype.scalar == tl.float32 else original(self, src, tl.float32)
            return _encoded(as_f32)
        return original(self, src, dst_type)

    return cast


def _fp_to_fp(original):
    """fp_to_fp from or to bf16 through the cast above (the interpreter's own "nearest even" rounds
    ties up and drops the carry into an odd exponent); other formats (fp8) as it does them."""

    @functools.wraps(original)
    def fp_to_fp(self, src, dst_type, rounding_mode):
        if tl.bfloat16 in (src.dtype.scalar, dst_type.scalar):
            return self.cast_impl(src, dst_type)
        return original(self, src, dst_type, rounding_mode)

    return fp_to_fp


def _reduce_scan_in_fp32(apply):
    """ReduceOps / ScanOps.apply with bf16 inputs decoded to fp32 and the matching outputs encoded
    back (outputs line up with inputs; argmin/argmax's extra index output stays as it is)."""

    def as_tensor(t, handle):
        shape = list(t.shape)
        return tl.core.tensor(handle, tl.block_type(handle.dtype, shape) if shape else handle.dtype)

    @functools.wraps(apply)
    def wrapped(self, input):
        inputs = input if isinstance(input, tuple) else (input,)
        was_bf16 = [_is_bf16(t.handle) for t in inputs]
        if not any(was_bf16):
            return apply(self, input)
        decoded = tuple(as_tensor(t, _decoded(t.handle)) if b else t for t, b in zip(inputs, was_bf16))
        out = apply(self, decoded if isinstance(input, tuple) else decoded[0])
        outs = out if isinstance(out, tuple) else (out,)
        outs = tuple(as_tensor(o, _encoded(o.handle)) if i < len(was_bf16) and was_bf16[i] else o
                     for i, o in enumerate(outs))
        return outs if isinstance(out, tuple) else outs[0]

    return wrapped


class _LoopIndexAsTensor(interpreter.ASTTransformer):
    """`for i in range(...)` / `tl.range(...)`: make `i` a Triton tensor at the top of the body
    (`tl.static_range` indices stay Python ints: they may index constexpr tuples)."""

    def visit_For(self, node):
        node = self.generic_visit(node)
        func = node.iter.func if isinstance(node.iter, ast.Call) else None
        is_range = (isinstance(func, ast.Name) and func.id == "range") or \
                   (isinstance(func, ast.Attribute) and func.attr == "range")
        if is_range and isinstance(node.target, ast.Name):
            to_tensor = ast.parse(f"{node.target.id} = interpreter_semantic.to_tensor({node.target.id}, False)").body[0]
            node.body.insert(0, to_tensor)
        return node


def _first_config_only(prune_configs):
    @functools.wraps(prune_configs)
    def first(self, kwargs):
        return prune_configs(self, kwargs)[:1]

    return first


# Builder methods that compute on their operands -> the argument whose type the result takes
# (binary/unary ops: the first; select, fma and dot: the last, `other` / the accumulator).
_BUILDER_OPS = {"binary_op": 0, "ternary_op": 2, "unary_op": 0, "create_fma": 2, "create_dot": 2,
                "create_erf": 0, "create_rsqrt": 0}


def install():
    """Patch Triton's interpreter (idempotent). Call before running any kernel."""
    if getattr(interpreter, "_llm_cpu_shim", False):
        return
    builder = interpreter.InterpreterBuilder
    for name, result_from in _BUILDER_OPS.items():
        setattr(builder, name, _in_fp32(getattr(builder, name), result_from))
    builder.cast_impl = _cast(builder.cast_impl)  # the create_*_to_* casts all go through it
    builder.create_fp_to_fp = _fp_to_fp(builder.create_fp_to_fp)
    for ops in (interpreter.ReduceOps, interpreter.ScanOps):
        ops.apply = _reduce_scan_in_fp32(ops.apply)
    interpreter.FunctionRewriter.ast_transformer = _LoopIndexAsTensor()
    autotuner.Autotuner.prune_configs = _first_config_only(autotuner.Autotuner.prune_configs)
    interpreter._llm_cpu_shim = True
