"""The mixer interface and registry.

A mixer maps [B, T, d_model] -> [B, T, d_model] causally. It has a parallel form (`forward`, used
in training, positions 0..T-1) and a step form (`forward_step`, continuing from a cache over t >= 1
new tokens) that agree to float tolerance. Options live in a nested `Args` dataclass, filled from
`model.mixer_args.<name>` and validated at config load (`Args.check(model_cfg)` may raise
ValueError for impossible combinations).
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

    @dataclass
    class Args:
        pass

    def __init__(self, cfg, layer_idx: int, args):
        super().__init__()
        self.cfg, self.layer_idx, self.args = cfg, layer_idx, args

    def forward(self, x):  # [B, T, C] -> [B, T, C]
        raise NotImplementedError

    def init_cache(self, batch_size: int) -> dict:
        raise NotImplementedError

    def forward_step(self, x, cache: dict):  # ([B, t, C], cache) -> ([B, t, C], cache)
        raise NotImplementedError

    @classmethod
    def flops_per_token(cls, cfg, args, seq_len: int) -> float:
        """Forward FLOPs (2 per multiply-add) of this mixer per token, averaged over the positions
        of a training window of `seq_len` tokens (so attention's T-dependent term is included)."""
        raise NotImplementedError
