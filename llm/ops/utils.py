"""What the ops share: the kernel dispatch rule, shape checks and the chunked layout."""
import importlib.util

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)


def kernel_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def kernel_inputs_ok(*tensors) -> bool:
    """Whether GPU kernels can take these inputs: CUDA tensors in half precision. (Tests that run
    the kernels under Triton's CPU interpreter lift this one condition.)"""
    return all(t.is_cuda and t.dtype in _HALF for t in tensors)


def use_kernel(backend: str, module, *tensors) -> bool:
    """Whether to take the fast GPU path for these inputs, through the library `module` (None: the
    path needs no extra library, e.g. SDPA's flash kernel). The one meaning of `model.kernels`:

    "torch": never; "auto": when the inputs are CUDA bf16/fp16 tensors and `module` is installed;
    "fla": always, and a RuntimeError when the inputs or the installation do not allow it.
    """
    inputs_ok = kernel_inputs_ok(*tensors)  # looked up at call time: tests may patch it
    installed = module is None or kernel_available(module)
    if backend == "fla" and not (inputs_ok and installed):
        need = "CUDA bf16/fp16 inputs" if not inputs_ok else f"the {module} package (pip install -e .[gpu])"
        raise RuntimeError(f"model.kernels=fla requires the fast GPU path{f' ({module})' if module else ''}, "
                           f"which needs {need}; use kernels=auto or torch to fall back to the reference")
    return backend != "torch" and inputs_ok and installed


def check_shapes(q, k, v, **per_token):
    """Raise ValueError unless q, k are [B, T, H, K], v is [B, T, H, V] and every per-token tensor
    (None skipped) is [B, T, H]; return (B, T, H, K, V)."""
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k [B, T, H, K] and v [B, T, H, V] with the same B, T, H; got "
                         f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    B, T, H, K = q.shape
    if T == 0:
        raise ValueError("expected at least one token (T >= 1)")
    for name, t in per_token.items():
        if t is not None and t.shape != (B, T, H):
            raise ValueError(f"{name}: expected shape [B, T, H] = {[B, T, H]}, got {list(t.shape)}")
    return B, T, H, K, v.shape[-1]


def check_state(name, t, shape):
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")


def to_chunks(x, chunk_size):
    """[B, T, H, ...] -> fp32 [B, H, N, C, ...], zero-padded at the end to N * C tokens.

    Zero padding is neutral for these recurrences: a zero key writes nothing, g = 0 does not decay."""
    x = x.float().movedim(1, 2)
    pad = -x.shape[2] % chunk_size
    x = F.pad(x, [0, 0] * (x.ndim - 3) + [0, pad])
    return x.unflatten(2, (x.shape[2] // chunk_size, chunk_size))


def chunk_gates(g, like):
    """Within-chunk cumulative log-decay G [B, H, N, C] (zeros for g=None; `like` is any chunked
    [B, H, N, C, ...] input) and the causal decay matrix gamma [B, H, N, C, C], with
    gamma_ij = exp(G_i - G_j) for j <= i and 0 above the diagonal.

    The exponent is masked before exp, so no large positive number is ever exponentiated; for
    j <= i it is a sum of log-decays, <= 0 whenever g <= 0, so strong decay underflows to 0."""
    C = like.shape[3]
    G = like.new_zeros(like.shape[:4]) if g is None else to_chunks(g, C).cumsum(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=G.device).tril()
    gamma = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    return G, gamma
