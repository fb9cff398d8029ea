"""Feeding a model its input in pieces through init_cache / forward_step."""
import torch


def run_in_pieces(model, ids, sizes, doc_start=None):
    """(logits of ids fed in pieces of the given sizes, final cache); doc_start [B, T] is cut the same way."""
    cache, outs, start = model.init_cache(ids.shape[0]), [], 0
    for n in sizes:
        piece = None if doc_start is None else doc_start[:, start:start + n]
        logits, cache = model.forward_step(ids[:, start:start + n], cache, doc_start=piece)
        outs.append(logits)
        start += n
    assert start == ids.shape[1]
    return torch.cat(outs, 1), cache
