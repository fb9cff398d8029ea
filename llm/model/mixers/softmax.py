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

    def qkv(self, x, cache=None):
        """Projected, normed, rotated q [B, T, H, D] and k, v [B, T, Hkv, D] of the new tokens.

        `cache` (None in the parallel form) gives the position of the first token; subclasses that
        transform q/k (momentum) keep what they need there too."""
        start = 0 if cache is None else cache["pos"]
        q, k, v = self.project(x)
        return self.rotary(q, start), self.rotary(k, start), v

    def out(self, o):
        if self.head_mask is not None:
            o = o * self.head_mask.to(o.dtype)[None, None, :, None]
        return self.o_proj(o.flatten(2))

    def forward(self, x):
        q, k, v = self.qkv(x)
        return self.out(attention(q, k, v, backend=self.kernels))

    def init_cache(self, batch_size):
        w = self.k_proj.weight
        empty = w.new_zeros(batch_size, 0, self.n_kv_heads, self.head_dim)
        return {"k": empty, "v": empty.clone(), "pos": 0}

    def forward_step(self, x, cache):
        q, k, v = self.qkv(x, cache)
        k = torch.cat([cache["k"], k], dim=1)
        v = torch.cat([cache["v"], v], dim=1)
        y = self.out(attention(q, k, v, backend=self.kernels))
        return y, {**cache, "k": k, "v": v, "pos": cache["pos"] + x.shape[1]}

    @classmethod
    def flops_per_token(cls, spec, args, seq_len):
        d, hd = spec.d_model, spec.head_dim
        kv = spec.n_kv_heads * hd
        projections = 2 * d * (2 * d + 2 * kv)
        # scores and weighted sum: 2 matmuls over on average (seq_len + 1) / 2 causal keys per head
        return projections + 2 * 2 * spec.n_heads * hd * (seq_len + 1) / 2
