"""MesaNet (fla's layer recipe) on the Mesa ops.

q, k: projection -> short causal conv + SiLU -> L2 norm per head; v: projection (V = K);
decay gamma = sigmoid(W_a x + b) used as g = log gamma; beta = sigmoid(W_b x + b);
lamb = softplus(param) + lamb_lower_bound per head and key dim (no weight decay), starting at
lower bound + 0.75 (1.0 by default, as fla); output: per-head RMSNorm (gated with `use_gate`), o_proj.
CG runs a fixed `cg_steps` when gradients are on; without them (evaluation, generation) it stops
early once every residual is below `cg_tol` relative to |q|, if cg_tol is set.
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
from llm.ops.mesa import chunk_mesa, recurrent_mesa


@register_mixer("mesa")
class Mesa(Mixer):
    @dataclass(frozen=True)
    class Args:
        head_dim: Optional[int] = None  # key = value dim per head; None = d_model / n_heads
        conv_size: int = 4
        chunk_size: int = 64  # torch path only
        cg_steps: int = 30  # fixed in training
        cg_tol: Optional[float] = None  # relative residual for early stop without gradients
        lamb_lower_bound: float = 0.25
        use_gate: bool = False

        def check(self, m):
            head_dim = self.head_dim or m.d_model // m.n_heads
            if min(head_dim, self.conv_size, self.chunk_size, self.cg_steps) < 1:
                raise ValueError("head_dim, conv_size, chunk_size and cg_steps must be positive integers")
            if self.lamb_lower_bound <= 0 or (self.cg_tol is not None and self.cg_tol <= 0):
                raise ValueError("lamb_lower_bound and cg_tol (when set) must be > 0")

    @staticmethod
    def dims(spec, args):
        return spec.n_heads, args.head_dim or spec.head_dim

    def __init__(self, spec, layer_idx, args):
        super().__init__(spec, layer_idx, args)
        d = spec.d_model
        H, K = self.dims(spec, args)
        self.n_heads, self.head_dim = H, K
        self.q_proj = set_role(nn.Linear(d, H * K, bias=False), "qk")
        self.k_proj = set_role(nn.Linear(d, H * K, bias=False), "qk")
        self.v_proj = set_role(nn.Linear(d, H * K, bias=False), "vo")
        self.q_conv, self.k_conv = ShortConv(H * K, args.conv_size), ShortConv(H * K, args.conv_size)
        self.a_proj = set_role(nn.Linear(d, H, bias=True), "mixer_other")
        self.b_proj = set_role(nn.Linear(d, H, bias=True), "mixer_other")
        self.lamb_param = set_role(nn.Parameter(torch.full((H, K), math.log(math.expm1(0.75)))), "no_decay")
        self.o_norm = OutputNorm(spec, H, K, args.use_gate)
        self.o_proj = set_role(nn.Linear(H * K, d, bias=False), "vo")

    def projections(self):
        return {"q": self.q_proj, "k": self.k_proj, "v": self.v_proj, "o": self.o_proj}

    def lamb(self):
        return F.softplus(self.lamb_param.float()) + self.args.lamb_lower_bound

    def _mix(self, x, cache, doc_start):
        """The mixer over x [B, T, C], from `cache` (None: the start of a sequence, no new cache)."""
        B, T, _ = x.shape
        c = cache or {}
        q, q_tail = self.q_conv(self.q_proj(x), c.get("q_conv"), doc_start)
        k, k_tail = self.k_conv(self.k_proj(x), c.get("k_conv"), doc_start)
        q = l2norm(q.view(B, T, self.n_heads, self.head_dim))
        k = l2norm(k.view(B, T, self.n_heads, self.head_dim))
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim)
        g = F.logsigmoid(self.a_proj(x).float())
        beta = self.b_proj(x).float().sigmoid()
        a = self.args
        kw = dict(g=g, beta=beta, lamb=self.lamb(), initial_state=c.get("state"),
                  output_final_state=cache is not None, cg_steps=a.cg_steps,
                  cg_tol=None if torch.is_grad_enabled() else a.cg_tol, doc_start=doc_start)
        if cache is not None and T == 1:  # decoding
            o, state = recurrent_mesa(q, k, v, **kw)
        else:
            o, state = chunk_mesa(q, k, v, chunk_size=a.chunk_size, backend=self.kernels, **kw)
        y = self.o_proj(self.o_norm(o, x))
        return y, (None if cache is None else {"state": state, "q_conv": q_tail, "k_conv": k_tail})

    def forward(self, x, doc_start=None):
        return self._mix(x, None, doc_start)[0]

    def init_cache(self, batch_size):
        H, K = self.n_heads, self.head_dim
        w = self.q_proj.weight
        state = tuple(w.new_zeros(batch_size, H, K, K, dtype=torch.float32) for _ in "HG")
        return {"state": state, "q_conv": self.q_conv.init_cache(batch_size),
                "k_conv": self.k_conv.init_cache(batch_size)}

    def forward_step(self, x, cache, doc_start=None):
        return self._mix(x, cache, doc_start)

    @classmethod
    def flops_per_token(cls, spec, args, seq_len):
        H, K = cls.dims(spec, args)
        d, C = spec.d_model, min(args.chunk_size, seq_len)
        projections = 2 * d * (4 * H * K + 2 * H + (H * K if args.use_gate else 0))  # q, k, v, o, a, b, [gate]
        convs = 2 * args.conv_size * 2 * H * K
        # per head and token, chunk form: every CG step applies H_t + diag(lamb) as the chunk-start
        # state (K^2) plus the chunk's keys (2 C K); the readout x G_start plus the intra-chunk
        # terms (K^2 + 2 C K); the chunk-end state updates of H and G (2 K^2)
        mix = 2 * H * (args.cg_steps * (K * K + 2 * C * K) + 3 * K * K + 2 * C * K)
        return projections + convs + mix
