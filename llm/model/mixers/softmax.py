"""Causal softmax attention with RoPE, optional QK-norm and grouped-query attention."""
import torch
from torch import nn

from llm.model.layers import RMSNorm, Rotary
from llm.model.mixers.base import Mixer, register_mixer
from llm.model.roles import set_role
from llm.ops.attention import attention


@register_mixer("softmax")
class SoftmaxAttention(Mixer):
    has_attention_heads = True

    def __init__(self, spec, layer_idx, args):
        super().__init__(spec, layer_idx, args)
        d = spec.d_model
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = set_role(nn.Linear(d, d, bias=False), "qk")
        self.k_proj = set_role(nn.Linear(d, kv_dim, bias=False), "qk")
        self.v_proj = set_role(nn.Linear(d, kv_dim, bias=False), "vo")
        self.o_proj = set_role(nn.Linear(d, d, bias=False), "vo")
        self.q_norm = RMSNorm(self.head_dim, spec.norm_eps) if spec.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, spec.norm_eps) if spec.qk_norm else nn.Identity()
        self.rotary = Rotary(self.head_dim, spec.rope_theta)
        self.head_mask = None  # [H] multiplier on head outputs (set_head_mask), for head ablation

    def projections(self):
        return {"q": self.q_proj, "k": self.k_proj, "v": self.v_proj, "o": self.o_proj}

    def attention_qk(self, x):
        q, k, _ = self.qkv(x)
        return q, k

    def set_head_mask(self, mask):
        if mask is not None and tuple(mask.shape) != (self.n_heads,):
            raise ValueError(f"head mask: expected shape [{self.n_heads}], got {list(mask.shape)}")
        self.head_mask = mask

    def project(self, x):
        """Projected, normed q [B, T, H, D] and k, v [B, T, Hkv, D] of the new tokens, before rotary."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim))
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        return q, k, v

    def qkv(self, x, cache=None, doc_start=None):
        """Projected, normed, rotated q [B, T, H, D] and k, v [B, T, Hkv, D] of the new tokens.

        `cache` (None in the parallel form) gives the position of the first token; subclasses that
        transform q/k (momentum) keep what they need there too, and restart at `doc_start`."""
        start = 0 if cache is None else cache["pos"]
        q, k, v = self.project(x)
        return self.rotary(q, start), self.rotary(k, start), v

    def out(self, o):
        if self.head_mask is not None:
            o = o * self.head_mask.to(o.dtype)[None, None, :, None]
        return self.o_proj(o.flatten(2))

    def forward(self, x, doc_start=None):
        q, k, v = self.qkv(x, doc_start=doc_start)
        return self.out(attention(q, k, v, doc_start=doc_start, backend=self.kernels))

    def init_cache(self, batch_size):
        w = self.k_proj.weight
        empty = w.new_zeros(batch_size, 0, self.n_kv_heads, self.head_dim)
        # doc_start: the document starts of the cached keys [B, pos], None until one is given
        return {"k": empty, "v": empty.clone(), "pos": 0, "doc_start": None}

    def forward_step(self, x, cache, doc_start=None):
        q, k, v = self.qkv(x, cache, doc_start)
        k = torch.cat([cache["k"], k], dim=1)
        v = torch.cat([cache["v"], v], dim=1)
        docs = key_doc_starts(cache["doc_start"], cache["pos"], doc_start, x)
        y = self.out(attention(q, k, v, doc_start=docs, backend=self.kernels))
        return y, {**cache, "k": k, "v": v, "pos": cache["pos"] + x.shape[1], "doc_start": docs}

    @classmethod
    def flops_per_token(cls, spec, args, seq_len):
        d, hd = spec.d_model, spec.head_dim
        kv = spec.n_kv_heads * hd
        projections = 2 * d * (2 * d + 2 * kv)
        # scores and weighted sum: 2 matmuls over on average (seq_len + 1) / 2 causal keys per head
        return projections + 2 * 2 * spec.n_heads * hd * (seq_len + 1) / 2


def key_doc_starts(cached, pos, new, x):
    """The document starts of the `pos` cached keys then of the new tokens x [B, t, C] (each None:
    none): bool [B, pos + t], or None while none was ever given (attention then has no mask)."""
    if cached is None and new is None:
        return None
    none = [torch.zeros(x.shape[0], n, dtype=torch.bool, device=x.device) for n in (pos, x.shape[1])]
    return torch.cat([none[0] if cached is None else cached, none[1] if new is None else new], 1)
