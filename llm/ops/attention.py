"""Causal softmax attention: flash-attn on CUDA half precision when installed, else SDPA."""
import torch
import torch.nn.functional as F

from llm.ops.utils import use_kernel


def attention(q, k, v, backend: str = "auto"):
    """q [B, T, H, D], k/v [B, S, Hkv, D] with S >= T: the T queries are the last T positions.

    Query i attends keys 0 .. S - T + i (bottom-right aligned causal mask). Returns [B, T, H, D].
    """
    T, S = q.shape[1], k.shape[1]
    if use_kernel("auto" if backend == "fla" else backend, "flash_attn", q, k, v):
        from flash_attn import flash_attn_func
        return flash_attn_func(q, k, v, causal=True)
    H, Hkv = q.shape[2], k.shape[2]
    if Hkv != H:
        k, v = (t.repeat_interleave(H // Hkv, dim=2) for t in (k, v))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if S == T:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2)


def attention_probs(q, k):
    """The causal attention weights [B, H, T, S] of the same computation (for telemetry)."""
    T, S, H, Hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * q.shape[-1] ** -0.5
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)
