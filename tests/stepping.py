"""Feeding a model its input in pieces through init_cache / forward_step."""
import torch


def run_in_pieces(model, ids, sizes):
    """(logits of ids fed in pieces of the given sizes, final cache)."""
    cache, outs, start = model.init_cache(ids.shape[0]), [], 0
    for n in sizes:
        logits, cache = model.forward_step(ids[:, start:start + n], cache)
        outs.append(logits)
        start += n
    assert start == ids.shape[1]
    return torch.cat(outs, 1), cache
