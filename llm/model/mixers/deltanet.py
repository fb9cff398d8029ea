"""DeltaNet and Gated DeltaNet (fla's layer recipe) on the delta-rule ops.

q, k, v: projection -> short causal conv + SiLU; q and k L2-normalized per head;
beta = sigmoid(W_b x) (times 2 with `allow_neg_eigval`, so I - beta k k^T may reflect);
gated variant: log-decay g = -exp(A_log) * softplus(W_a x + dt_bias) (Mamba-2's parameterization);
output: per-head RMSNorm, times SiLU(W_g x) with `use_gate`, then the output projection.
The cache is the recurrent state plus the conv tails: constant size in the sequence length.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llm.model.layers import OutputNorm, ShortConv, l2norm
from llm.model.mixers.base import Mixer, register_mixer
from llm.model.roles import set_role
from llm.ops.delta_rule import chunk_delta_rule, recurrent_delta_rule


@register_mixer("deltanet")
class DeltaNet(Mixer):
    gated = False  # Gated DeltaNet (below) adds the per-token decay

    @dataclass(frozen=True)
    class Args:
        head_dim: Optional[int] = None  # key dim per head; None = d_model / n_heads
        expand_v: float = 1.0  # value dim per head = expand_v * head_dim
        conv_size: int = 4
        chunk_size: int = 64  # torch path only; fla chooses its own
        use_gate: bool = True  # SiLU(W_g x) output gate
        allow_neg_eigval: bool = False  # beta in (0, 2) instead of (0, 1)

        def check(self, m):
            head_dim = self.head_dim or m.d_model // m.n_heads
            if head_dim < 1 or self.conv_size < 1 or self.chunk_size < 1:
                raise ValueError("head_dim, conv_size and chunk_size must be positive integers")
            if self.expand_v <= 0 or not float(head_dim * self.expand_v).is_integer():
                raise ValueError(f"expand_v={self.expand_v} times head_dim={head_dim} must be a positive integer")

    @staticmethod
    def dims(spec, args):
        """(heads, key dim, value dim) per head."""
        K = args.head_dim or spec.head_dim
        return spec.n_heads, K, int(K * args.expand_v)

    def __init__(self, spec, layer_idx, args):
        super().__init__(spec, layer_idx, args)
        d = spec.d_model
        H, K, V = self.dims(spec, args)
        self.n_heads, self.head_k, self.head_v = H, K, V
        self.q_proj = set_role(nn.Linear(d, H * K, bias=False), "qk")
        self.k_proj = set_role(nn.Linear(d, H * K, bias=False), "qk")
        self.v_proj = set_role(nn.Linear(d, H * V, bias=False), "vo")
        self.q_conv, self.k_conv = ShortConv(H * K, args.conv_size), ShortConv(H * K, args.conv_size)
        self.v_conv = ShortConv(H * V, args.conv_size)
        self.b_proj = set_role(nn.Linear(d, H, bias=False), "mixer_other")
        if self.gated:
            self.a_proj = set_role(nn.Linear(d, H, bias=False), "mixer_other")
            # Mamba-2 / fla init: decay rate A ~ U[1, 16], step dt log-uniform in [1e-3, 0.1]
            self.A_log = set_role(nn.Parameter(torch.empty(H).uniform_(1, 16).log()), "no_decay")
            dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
            self.dt_bias = set_role(nn.Parameter(dt + torch.log(-torch.expm1(-dt))), "no_decay")  # softplus^-1
        self.o_norm = OutputNorm(spec, H, V, args.use_gate)
        self.o_proj = set_role(nn.Linear(H * V, d, bias=False), "vo")

    def projections(self):
        return {"q": self.q_proj, "k": self.k_proj, "v": self.v_proj, "o": self.o_proj}

    def _mix(self, x, cache, doc_start):
        """The mixer over x [B, T, C], from `cache` (None: the start of a sequence, no new cache)."""
        B, T, _ = x.shape
        c = cache or {}
        q, q_tail = self.q_conv(self.q_proj(x), c.get("q_conv"), doc_start)
        k, k_tail = self.k_conv(self.k_proj(x), c.get("k_conv"), doc_start)
        v, v_tail = self.v_conv(self.v_proj(x), c.get("v_conv"), doc_start)
        q = l2norm(q.view(B, T, self.n_heads, self.head_k))
        k = l2norm(k.view(B, T, self.n_heads, self.head_k))
        v = v.view(B, T, self.n_heads, self.head_v)
        beta = self.b_proj(x).float().sigmoid() * (2.0 if self.args.allow_neg_eigval else 1.0)
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias) if self.gated else None
        kw = dict(beta=beta, g=g, initial_state=c.get("state"), output_final_state=cache is not None,
                  doc_start=doc_start, backend=self.kernels)
        if cache is not None and T == 1:  # decoding
            o, state = recurrent_delta_rule(q, k, v, **kw)
        else:
            o, state = chunk_delta_rule(q, k, v, chunk_size=self.args.chunk_size, **kw)
        y = self.o_proj(self.o_norm(o, x))
        return y, (None if cache is None else {"state": state, "q_conv": q_tail, "k_conv": k_tail, "v_conv": v_tail})

    def forward(self, x, doc_start=None):
        return self._mix(x, None, doc_start)[0]

    def init_cache(self, batch_size):
        w = self.q_proj.weight
        return {"state": w.new_zeros(batch_size, self.n_heads, self.head_k, self.head_v, dtype=torch.float32),
                "q_conv": self.q_conv.init_cache(batch_size), "k_conv": self.k_conv.init_cache(batch_size),
                "v_conv": self.v_conv.init_cache(batch_size)}

    def forward_step(self, x, cache, doc_start=None):
        return self._mix(x, cache, doc_start)

    @classmethod
    def flops_per_token(cls, spec, args, seq_len):
        H, K, V = cls.dims(spec, args)
        d, C = spec.d_model, min(args.chunk_size, seq_len)
        width = 2 * H * K + 2 * H * V + H + (H if cls.gated else 0) + (H * V if args.use_gate else 0)
        projections = 2 * d * width  # q, k, v, o, beta, [a], [gate]
        convs = 2 * args.conv_size * (2 * H * K + H * V)
        # per head and token, chunk form: k k^T and q k^T rows (2 C K), the triangular solve for
        # w and u (C (K + V) / 2), the intra-chunk readout (C V), and the state terms w S, q S and
        # the update k^T u (3 K V)
        mix = 2 * H * (2 * C * K + C * (K + V) / 2 + C * V + 3 * K * V)
        return projections + convs + mix


@register_mixer("gated_deltanet")
class GatedDeltaNet(DeltaNet):
    gated = True
