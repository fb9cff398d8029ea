"""Momentum attention: softmax attention on sheared queries and keys (a high-pass filter in time).

q'_t = q_t + gamma (q_t - q_{t-1}), likewise k. The score q'_t . k'_s then contains the term
-gamma (1 + gamma) q_t . k_{s-1}: the current token can match the token *before* a key, which is
the previous-token half of an induction head, so one layer can copy what followed an earlier
occurrence of the current token (two layers are needed without the shear).
"""
from dataclasses import dataclass

import torch
from torch import nn

from llm.model.mixers.base import register_mixer
from llm.model.mixers.softmax import SoftmaxAttention
from llm.model.roles import set_role


@register_mixer("momentum")
class MomentumAttention(SoftmaxAttention):
    @dataclass(frozen=True)
    class Args:
        # 0 is plain softmax attention. 0.5: the paper's recall optimum 4.17 N^-0.74 is ~0.45 for
        # N ~ 20 items; in our 1-layer induction probe every gamma in 0.25-8 forms an induction
        # head (copy accuracy 0.57 at 0.25, 0.65 at 0.5, peak 0.72 at 2-4, 0.58 at 8), but a larger
        # shear perturbs every other head of an LM more (|q'| grows up to (1 + 2 gamma) |q|).
        # learn_gamma lets each head move from here.
        gamma: float = 0.5
        learn_gamma: bool = False  # one gamma per (kv) head, trained, no weight decay
        apply: str = "post_rope"  # post_rope | pre_rope: shear the rotated or the raw q/k
        first: str = "repeat"  # repeat (q_{-1} = q_0: no shear at t=0) | zero (q_{-1} = 0)

        def check(self, model_cfg):
            if self.apply not in ("post_rope", "pre_rope"):
                raise ValueError(f"apply: got {self.apply!r}, expected post_rope or pre_rope")
            if self.first not in ("repeat", "zero"):
                raise ValueError(f"first: got {self.first!r}, expected repeat or zero")

    def __init__(self, spec, layer_idx, args):
        super().__init__(spec, layer_idx, args)
        # One gamma per kv head; the query heads of a GQA group share their key's gamma.
        gamma = torch.full((self.n_kv_heads,), float(args.gamma))
        if args.learn_gamma:
            self.gamma = set_role(nn.Parameter(gamma), "no_decay")
        else:
            self.register_buffer("gamma", gamma, persistent=False)

    def qkv(self, x, cache=None, doc_start=None):
        start = 0 if cache is None else cache["pos"]
        q, k, v = self.project(x)
        post = self.args.apply == "post_rope"
        if post:
            q, k = self.rotary(q, start), self.rotary(k, start)
        prev_q, prev_k = (None, None) if start == 0 else (cache["q_prev"], cache["k_prev"])
        q_sh = self.shear(q, prev_q, self.gamma.repeat_interleave(self.n_heads // self.n_kv_heads), doc_start)
        k_sh = self.shear(k, prev_k, self.gamma, doc_start)
        if cache is not None:  # forward_step's own copy: the next piece shears against these
            cache["q_prev"], cache["k_prev"] = q[:, -1:], k[:, -1:]
        if not post:
            q_sh, k_sh = self.rotary(q_sh, start), self.rotary(k_sh, start)
        return q_sh, k_sh, v

    def shear(self, x, prev, gamma, doc_start=None):
        """x [B, T, H, D] -> x + gamma (x - x shifted by one step); prev [B, 1, H, D] is the vector
        before x[:, 0], or None at position 0 (then `first` decides, as at every document start)."""
        before = torch.cat([self.before_first(x[:, :1]) if prev is None else prev, x[:, :-1]], 1)
        if doc_start is not None:
            before = torch.where(doc_start[..., None, None], self.before_first(x), before)
        return x + gamma.to(x.dtype)[:, None] * (x - before)

    def before_first(self, x):
        """What stands before the first vector of a document (`first`): itself (no shear) or zero."""
        return x if self.args.first == "repeat" else torch.zeros_like(x)

    def init_cache(self, batch_size):
        cache = super().init_cache(batch_size)  # q_prev, k_prev are read only after position 0
        w = self.q_proj.weight
        return {**cache, "q_prev": w.new_zeros(batch_size, 1, self.n_heads, self.head_dim),
                "k_prev": w.new_zeros(batch_size, 1, self.n_kv_heads, self.head_dim)}

    def forward_step(self, x, cache, doc_start=None):
        return super().forward_step(x, dict(cache), doc_start)  # a copy, so qkv can record the last q/k in it

    @classmethod
    def flops_per_token(cls, spec, args, seq_len):
        kv = spec.n_kv_heads * spec.head_dim
        return super().flops_per_token(spec, args, seq_len) + 3 * (spec.d_model + kv)  # sub, mul, add
