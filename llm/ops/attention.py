"""Causal softmax attention. `attention` checks the backend and dispatches: flash-attn on the fast
GPU path where installed, else `sdpa` (restricted to SDPA's flash kernel when backend="fla").
Arguments after q, k, v are keyword-only."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from llm.ops.utils import kernel_available, use_kernel


def attention(q, k, v, *, backend: str = "auto"):
    """q [B, T, H, D], k/v [B, S, Hkv, D] with S >= T: the T queries are the last T positions.

    Query i attends keys 0 .. S - T + i (bottom-right aligned causal mask). Returns [B, T, H, D].
    """
    if use_kernel(backend, None, q, k, v) and kernel_available("flash_attn"):
        from flash_attn import flash_attn_func
        return flash_attn_func(q, k, v, causal=True)
    if backend == "fla":  # the fast path is required: SDPA's flash kernel, or its error
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, v)
    return sdpa(q, k, v)


def sdpa(q, k, v):
    """The same attention through torch's scaled_dot_product_attention (the reference on CPU). With
    S > T (continuing from a cache) the mask is a lower-right causal bias, which every SDPA kernel
    (flash included) takes; the bias is a tensor subclass, which torch.compile would break its graph
    on, hence is_causal for the training case S == T."""
    T, S, H, Hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if Hkv != H:
        k, v = (t.repeat_interleave(H // Hkv, dim=2) for t in (k, v))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    causal = dict(is_causal=True) if S == T else dict(attn_mask=causal_lower_right(T, S))
    return F.scaled_dot_product_attention(q, k, v, **causal).transpose(1, 2)


def attention_probs(q, k):
    """The causal attention weights [B, H, T, S] of the same computation (for telemetry)."""
    T, S, H, Hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * q.shape[-1] ** -0.5
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)
