"""Head-level induction telemetry and head ablation.

The probe input is random tokens repeated twice (each token once per copy). In the second copy an
induction head attends from position i to the token *after* the previous occurrence of token i
(the one to predict next); an anti-induction head attends to the token *before* it. Scores are the
mean attention mass on that target; they need attention weights, so they exist for mixers with
`has_attention_heads` (softmax, momentum). For every layer, whatever its mixer, the behavioural copy score
(loss on the first copy minus loss on the second) is measured with and without that layer's mixer
output zeroed.
"""
import os
import random
from contextlib import contextmanager

import torch

from llm.checkpoint import commit_record, complete_tags, load_model
from llm.eval import device_of, token_losses
from llm.ops.attention import attention_probs


def previous_occurrence(tokens):
    """tokens [B, T] -> [B, T]: the latest earlier position holding the same token, or -1."""
    T = tokens.shape[1]
    earlier = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril(-1)
    same = (tokens[:, :, None] == tokens[:, None, :]) & earlier
    pos = torch.arange(T, device=tokens.device).expand_as(same)
    return torch.where(same, pos, -1).max(-1).values


def score(probs, tokens, shift: int = 1):
    """Mean attention mass [H] from each query on (previous occurrence of its token) + shift.

    probs [B, H, T, T] (rows: queries), tokens [B, T]. shift=1 is the induction score, shift=-1 the
    anti-induction score. Only queries whose token occurred before (and whose target exists) count.
    """
    T = tokens.shape[1]
    prev = previous_occurrence(tokens)
    target = prev + shift
    valid = (prev >= 0) & (target >= 0) & (target <= torch.arange(T, device=tokens.device))
    if not valid.any():
        raise ValueError("score: no position repeats an earlier token; expected repeated sequences")
    idx = target.clamp(min=0)[:, None, :, None].expand(-1, probs.shape[1], -1, 1)
    mass = probs.gather(-1, idx).squeeze(-1)  # [B, H, T]
    return (mass * valid[:, None]).sum((0, 2)) / valid.sum()


def repeated_tokens(candidates, batch: int, length: int, seed: int = 0):
    """[batch, 2 * length]: `length` distinct tokens drawn from `candidates`, then the same again."""
    candidates = torch.as_tensor(candidates)
    if len(candidates) < length:
        raise ValueError(f"repeated_tokens: {length} distinct tokens needed, only {len(candidates)} candidates")
    g = torch.Generator().manual_seed(seed)
    half = torch.stack([candidates[torch.randperm(len(candidates), generator=g)[:length]] for _ in range(batch)])
    return torch.cat([half, half], dim=1)


@contextmanager
def zero_mixer(model, layer: int):
    """Zero-ablate one layer's mixer output (the residual stream skips the mixer)."""
    handle = model.blocks[layer].mixer.register_forward_hook(lambda m, args, out: torch.zeros_like(out))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def mask_heads(model, heads: dict):
    """Zero the outputs of the given heads ({layer: [head, ...]}) through the mixers' head masks."""
    saved = {layer: model.blocks[layer].mixer.head_mask for layer in heads}
    for layer, hs in heads.items():
        mixer = model.blocks[layer].mixer
        mask = torch.ones(mixer.n_heads, device=device_of(model))
        mask[list(hs)] = 0.0
        mixer.set_head_mask(mask)
    try:
        yield
    finally:
        for layer, mask in saved.items():
            model.blocks[layer].mixer.set_head_mask(mask)


def head_layers(model) -> list[int]:
    """Layers whose mixer exposes attention weights (and heads to ablate)."""
    return [i for i, b in enumerate(model.blocks) if b.mixer.has_attention_heads]


@torch.no_grad()
def head_scores(model, tokens, batch_size: int = 16) -> dict:
    """{layer: [2, H] (induction, anti-induction scores)} for the layers with attention heads, from the mixer
    inputs (the normed hidden states) captured by forward pre-hooks."""
    layers = head_layers(model)
    inputs = {}
    hooks = [model.blocks[i].mixer.register_forward_pre_hook(
        lambda m, args, i=i: inputs.__setitem__(i, args[0])) for i in layers]
    sums = {i: torch.zeros(2, model.blocks[i].mixer.n_heads) for i in layers}
    try:
        for chunk in tokens.split(batch_size):
            chunk = chunk.to(device_of(model))
            model(chunk)
            for i in layers:
                probs = attention_probs(*model.blocks[i].mixer.attention_qk(inputs[i]))
                both = torch.stack([score(probs, chunk, 1), score(probs, chunk, -1)]).cpu()
                sums[i] += len(chunk) / len(tokens) * both
    finally:
        for h in hooks:
            h.remove()
    return sums


def copy_losses(model, tokens, batch_size: int = 16) -> tuple[float, float]:
    """Mean loss on the first copy and on the second (its first token, not predictable, excluded)."""
    L = tokens.shape[1] // 2
    losses = token_losses(model, tokens, batch_size)  # target of column t is token t + 1
    return losses[:, :L - 1].mean().item(), losses[:, L:].mean().item()


def induction_report(model, tokens, batch_size: int = 16) -> dict:
    """Per layer: head scores (where the mixer has attention heads) and the copy score with that layer ablated."""
    first, second = copy_losses(model, tokens, batch_size)
    heads = head_scores(model, tokens, batch_size)
    layers = []
    for i, block in enumerate(model.blocks):
        with zero_mixer(model, i):
            a_first, a_second = copy_losses(model, tokens, batch_size)
        entry = {"layer": i, "mixer": block.mixer.name,
                 "copy_loss_first_ablated": a_first, "copy_loss_second_ablated": a_second,
                 "copy_score_ablated": a_first - a_second,
                 "copy_score_change": (a_first - a_second) - (first - second)}
        if i in heads:
            entry["induction"], entry["anti_induction"] = heads[i].tolist()
        layers.append(entry)
    return {"copy_loss_first": first, "copy_loss_second": second, "copy_score": first - second,
            "layers": layers}


def choose_heads(report: dict, fraction: float, seed: int) -> tuple[dict, dict]:
    """(top induction heads, random heads): per layer with heads, max(1, round(fraction * H)) of
    each. Random heads come from the other heads of the layer where there are enough of them."""
    rng = random.Random(seed)
    top, rand = {}, {}
    for entry in report["layers"]:
        if "induction" not in entry:
            continue
        scores = entry["induction"]
        n = max(1, round(fraction * len(scores)))
        ranked = sorted(range(len(scores)), key=lambda h: -scores[h])
        top[entry["layer"]] = sorted(ranked[:n])
        others = ranked[n:] if len(ranked) - n >= n else ranked
        rand[entry["layer"]] = sorted(rng.sample(others, n))
    return top, rand


def head_ablation(model, report: dict, metrics, fraction: float = 0.02, seeds: int = 3) -> dict:
    """Change of `metrics()` (a dict of floats) when the top induction heads are zeroed, against the
    same number of random heads per layer over several seeds."""
    top, _ = choose_heads(report, fraction, 0)
    if not top:
        raise ValueError("head ablation needs layers with attention heads (softmax or momentum mixers)")
    base = metrics()
    with mask_heads(model, top):
        induction = metrics()
    randoms = []
    for s in range(seeds):
        _, rand = choose_heads(report, fraction, s)
        with mask_heads(model, rand):
            randoms.append({"heads": rand, **metrics()})
    keys = list(base)
    random_mean = {k: sum(r[k] for r in randoms) / seeds for k in keys}
    random_std = {k: (sum((r[k] - random_mean[k]) ** 2 for r in randoms) / seeds) ** 0.5 for k in keys}
    return {"fraction": fraction, "induction_heads": top, "baseline": base,
            "induction_ablated": induction, "random_ablated": randoms,
            "random_mean": random_mean, "random_std": random_std,
            "change_induction": {k: induction[k] - base[k] for k in keys},
            "change_random": {k: random_mean[k] - base[k] for k in keys}}


def checkpoint_scores(run_dir: str, tokens, batch_size: int = 16, device: str = "cpu") -> list[dict]:
    """Induction and anti-induction scores ([layer][head], None for layers without heads) of every
    complete checkpoint of a run, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    out = []
    for tag in complete_tags(root):
        model, _ = load_model(run_dir, tag)
        scores = head_scores(model.to(device), tokens, batch_size)
        step = commit_record(root, tag)["step"]
        out.append({"tag": tag, "step": step, **{
            key: [scores[i][row].tolist() if i in scores else None for i in range(len(model.blocks))]
            for row, key in enumerate(("induction", "anti_induction"))}})
    return out
