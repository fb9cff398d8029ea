"""Low-rank telemetry of attention's products W_Q^T W_K and W_O W_V, per layer and head.

Weight decay on the two factors of a product acts as a nuclear-norm penalty on the product
(min over factorizations W = A B of ||A||^2 + ||B||^2 is 2 ||W||_*), so it drives these products
towards low rank. At eval steps we record, for each head, the product's effective rank (Roy &
Vetterli: exp of the entropy of the normalized singular values) and nuclear norm, for every mixer
that declares per-head projections (`Mixer.projections()`: q, k for qk; v, o for vo); others
(PD-SSM) are skipped.
"""
import math
import os

import torch
from torch import nn

from llm.logs import JsonlLog


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(entropy of s / sum(s)): n for n equal singular values, 1 for rank one, 0 for zero."""
    s = singular_values.double()
    if s.sum() <= 0:
        return 0.0
    p = s[s > 0] / s.sum()
    return math.exp(-(p * p.log()).sum().item())


def product_singular_values(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Singular values of left @ right ([m, r] @ [r, n]) without an m x n SVD: with QRs
    left = Q_l R_l and right^T = Q_r R_r, left @ right = Q_l (R_l R_r^T) Q_r^T, and the Q's have
    orthonormal columns, so the small R_l R_r^T has the same nonzero singular values."""
    r_left = torch.linalg.qr(left.float()).R
    r_right = torch.linalg.qr(right.float().T).R
    return torch.linalg.svdvals(r_left @ r_right.T)


def projections(mixer) -> dict[str, nn.Parameter]:
    """The weights of the q/k/v/o projections the mixer declares (keys "q", "k", "v", "o")."""
    return {name: linear.weight for name, linear in mixer.projections().items()}


def head_factors(mixer, weights: dict):
    """Yield (product, head, left, right) with left @ right one head's [C, C] product:
    qk: W_Q_h^T W_K_h (x_i^T W_Q_h^T W_K_h x_j is the head's score before norms, RoPE, scaling);
    vo: W_O_h W_V_h (what the head writes for a value read at x). Query head h reads key/value
    head h // (n_heads / n_kv_heads) (GQA); the shapes give the head sizes and kv-head count."""
    sides = {}
    if "q" in weights and "k" in weights:
        sides["qk"] = weights["q"].T, weights["k"]
    if "o" in weights and "v" in weights:
        sides["vo"] = weights["o"], weights["v"]
    for product, (left, right) in sides.items():  # left [C, H * D], right [Hkv * D, C]
        n_heads = mixer.n_heads
        d = left.shape[1] // n_heads
        group = n_heads // (right.shape[0] // d)
        for h in range(n_heads):
            kv = h // group
            yield product, h, left[:, h * d:(h + 1) * d], right[kv * d:(kv + 1) * d]


@torch.no_grad()
def attention_ranks(model, step: int, compute: bool = True) -> list[dict]:
    """One record per layer, head and product. Under ZeRO-3 every rank must call this (each
    layer's weights are gathered collectively, one layer at a time); ranks with compute=False
    only take part in the gathers."""
    import deepspeed

    records = []
    for layer, block in enumerate(model.blocks):
        weights = projections(block.mixer)
        with deepspeed.zero.GatheredParameters(list(weights.values())):
            if not compute:
                continue
            for product, head, left, right in head_factors(block.mixer, weights):
                s = product_singular_values(left, right)
                records.append({"step": step, "layer": layer, "head": head, "mixer": block.mixer.name,
                                "product": product, "effective_rank": effective_rank(s),
                                "nuclear_norm": s.sum().item()})
    return records


def layer_summary(records: list[dict]) -> dict[str, float]:
    """Mean effective rank over heads, keyed erank_<product>/layer<i> (wandb groups by prefix)."""
    by_key = {}
    for r in records:
        by_key.setdefault(f"erank_{r['product']}/layer{r['layer']}", []).append(r["effective_rank"])
    return {k: sum(v) / len(v) for k, v in by_key.items()}


class TelemetryLog:
    """RUN_DIR/telemetry.jsonl, written by rank 0; all ranks call `write` (ZeRO-3 gathers)."""

    def __init__(self, out_dir: str, start_step: int, active: bool):
        self.active = active
        self.file = JsonlLog(os.path.join(out_dir, "telemetry.jsonl"), start_step, active)

    def write(self, model, step: int) -> dict[str, float]:
        """Append this step's records; return the per-layer summary for the metrics log."""
        records = attention_ranks(model, step, compute=self.active)
        self.file.append(records)
        return layer_summary(records)
