"""The mixer interface and registry.

A mixer maps [B, T, d_model] -> [B, T, d_model] causally. It has a parallel form (`forward`, used
in training, positions 0..T-1) and a step form (`forward_step`, continuing from a cache over t >= 1
new tokens) that agree to float tolerance. It is built from plain values: the model's `ModelSpec`,
its layer index and its options, a frozen `Args` dataclass filled from `model.mixer_args.<name>`
and validated when the spec is resolved (`Args.check(model_cfg)` may raise ValueError for
impossible combinations).

Both forms take `doc_start` (bool [B, T] over the new tokens, None: no document starts; the step
form's cache remembers earlier ones): a position sees nothing before the latest document start at
or before it. Attention masks the earlier keys; recurrent mixers reset their state (and short
convs their window), momentum restarts its shear, PD-SSM returns to its start state.

What the rest of the framework may rely on besides the forward forms:
- `o_proj`: the nn.Linear that writes into the residual stream (the model initializes it with
  std / sqrt(2 n_layers)); `reset_parameters()` runs after the model's generic init, for what a
  mixer starts differently.
- `n_heads`; `projections()`: the per-head q/k/v/o projections it has, for the low-rank telemetry.
- `has_attention_heads`: softmax attention weights exist (`attention_qk`) and heads can be zeroed
  (`set_head_mask`), for the induction probes and head ablation.
"""
from dataclasses import dataclass

from torch import nn

MIXERS: dict[str, type] = {}


def register_mixer(name: str):
    def wrap(cls):
        if name in MIXERS:
            raise ValueError(f"mixer {name!r} registered twice")
        cls.name = name
        MIXERS[name] = cls
        return cls
    return wrap


class Mixer(nn.Module):
    name: str
    n_heads: int
    o_proj: nn.Linear
    has_attention_heads = False

    @dataclass(frozen=True)
    class Args:
        def check(self, model_cfg) -> None:
            """Raise ValueError for options that cannot go together (or with the model's shape)."""

    def __init__(self, spec, layer_idx: int, args):
        super().__init__()
        self.layer_idx, self.args, self.kernels = layer_idx, args, spec.kernels

    def forward(self, x, doc_start=None):  # [B, T, C] -> [B, T, C]
        raise NotImplementedError

    def init_cache(self, batch_size: int) -> dict:
        raise NotImplementedError

    def forward_step(self, x, cache: dict, doc_start=None):  # ([B, t, C], cache) -> ([B, t, C], cache)
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Called once after the model's generic init (normal weights, zero biases); default: nothing."""

    def projections(self) -> dict[str, nn.Linear]:
        """The per-head projections that exist, keyed "q", "k" ([H * K or Hkv * K, C]), "v"
        ([Hkv * V, C]) and "o" ([C, H * V]): telemetry factors W_Q^T W_K and W_O W_V per head."""
        return {}

    def attention_qk(self, x):
        """(q [B, T, H, D], k [B, T, Hkv, D]) as the attention scores use them (has_attention_heads only)."""
        raise TypeError(f"mixer {self.name!r} has no softmax attention weights")

    def set_head_mask(self, mask) -> None:
        """Multiply head h's output by mask[h] ([n_heads]; None: no mask) (has_attention_heads only)."""
        raise TypeError(f"mixer {self.name!r} has no attention heads to mask")

    @classmethod
    def flops_per_token(cls, spec, args, seq_len: int) -> float:
        """Forward FLOPs (2 per multiply-add) of this mixer per token, averaged over the positions
        of a training window of `seq_len` tokens (so attention's T-dependent term is included)."""
        raise NotImplementedError
