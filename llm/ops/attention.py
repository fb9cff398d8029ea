"""Causal softmax attention. `attention` checks the backend and dispatches: flash-attn on the fast
GPU path where installed, else `sdpa` (restricted to SDPA's fused kernels when backend="fla").
Arguments after q, k, v are keyword-only.

`doc_start` (bool [B, S] over the key positions, None: one document per row) marks where documents
begin: a query sees no key before the latest document start at or before its own position (a
block-diagonal causal mask; flash-attn's variable-length kernel over the documents, on the fast path).
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from llm.ops.utils import Segments, check_doc_start, doc_begin, kernel_available, use_kernel


def attention(q, k, v, *, doc_start=None, backend: str = "auto"):
    """q [B, T, H, D], k/v [B, S, Hkv, D] with S >= T: the T queries are the last T positions.

    Query i attends keys 0 .. S - T + i (bottom-right aligned causal mask), from its document's
    start on where `doc_start` is given. Returns [B, T, H, D].
    """
    T, S = q.shape[1], k.shape[1]
    check_doc_start(doc_start, k.shape[0], S)
    if use_kernel(backend, None, q, k, v) and kernel_available("flash_attn"):
        if doc_start is None:
            from flash_attn import flash_attn_func
            return flash_attn_func(q, k, v, causal=True)
        if S == T:  # (continuing from a cache with document starts: SDPA's masked kernels below)
            return _flash_documents(q, k, v, doc_start)
    if backend == "fla":  # the fast path is required: SDPA's flash kernel (masks: its efficient one), or its error
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION if doc_start is None else SDPBackend.EFFICIENT_ATTENTION):
            return sdpa(q, k, v, doc_start=doc_start)
    return sdpa(q, k, v, doc_start=doc_start)


def _flash_documents(q, k, v, doc_start):
    """flash-attn's variable-length kernel with every document a sequence (one flattened row)."""
    from flash_attn import flash_attn_varlen_func
    cu_seqlens = Segments.of(doc_start).cu_seqlens.to(torch.int32)
    longest = int(cu_seqlens.diff().max())
    o = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens, cu_seqlens,
                               longest, longest, causal=True)
    return o.view(q.shape)


def causal_mask(T, S, doc_start=None, device=None):
    """bool [T, S] (with doc_start [B, S]: [B, 1, T, S]): which keys each of the last T positions sees."""
    pos = torch.arange(S, device=device if doc_start is None else doc_start.device)
    mask = pos <= pos[S - T:, None]
    if doc_start is None:
        return mask
    return (mask & (pos >= doc_begin(doc_start)[:, S - T:, None]))[:, None]


def sdpa(q, k, v, *, doc_start=None):
    """The same attention through torch's scaled_dot_product_attention (the reference on CPU). With
    S > T (continuing from a cache) the mask is a lower-right causal bias, which every SDPA kernel
    (flash included) takes; the bias is a tensor subclass, which torch.compile would break its graph
    on, hence is_causal for the training case S == T. Document starts make it a boolean mask."""
    T, S, H, Hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if Hkv != H:
        k, v = (t.repeat_interleave(H // Hkv, dim=2) for t in (k, v))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if doc_start is not None:
        causal = dict(attn_mask=causal_mask(T, S, doc_start))
    else:
        causal = dict(is_causal=True) if S == T else dict(attn_mask=causal_lower_right(T, S))
    return F.scaled_dot_product_attention(q, k, v, **causal).transpose(1, 2)


def attention_probs(q, k):
    """The causal attention weights [B, H, T, S] of the same computation (for telemetry)."""
    T, S, H, Hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * q.shape[-1] ** -0.5
    return scores.masked_fill(~causal_mask(T, S, device=q.device), float("-inf")).softmax(-1)
