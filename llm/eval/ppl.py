"""Held-out perplexity, bits per byte and loss by position.

The windows are those of training's held-out evaluation (`llm.data.eval_windows`: consecutive,
sharing their edge token, so every token of the split after the first is predicted once). Bits per
byte divide the summed loss (in bits) by the UTF-8 bytes of the predicted tokens' text, decoded with
the run's tokenizer, so models with different tokenizers compare. Loss by position bucket (1-16,
17-64, 65-256, ...: how many tokens of context a prediction had) shows use of long context.
"""
import math

from llm.eval import decode_continuation, token_losses


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """(first, last) context lengths of each bucket: 1-16, 17-64, 65-256, ... cut at seq_len."""
    buckets, lo, hi = [], 1, 16
    while lo <= seq_len:
        buckets.append((lo, min(hi, seq_len)))
        lo, hi = hi + 1, hi * 4
    return buckets


def predicted_bytes(tokenizer, window) -> int:
    """UTF-8 bytes of the text of window[1:] (the predicted tokens), read after window[0]."""
    ids = window.tolist()
    return len(decode_continuation(tokenizer, ids[:1], ids[1:]).encode())


def perplexity(model, windows, tokenizer, batch_size: int = 16) -> dict:
    """Loss, perplexity, bits per byte and loss by position on windows [N, T + 1]."""
    losses = token_losses(model, windows, batch_size)  # column t: context of t + 1 tokens
    total = losses.sum().item()
    n_bytes = sum(predicted_bytes(tokenizer, w) for w in windows)
    loss = total / losses.numel()
    return {
        "windows": len(windows), "seq_len": losses.shape[1], "tokens": losses.numel(), "bytes": n_bytes,
        "loss": loss, "ppl": math.exp(loss), "bits_per_byte": total / math.log(2) / n_bytes,
        "by_position": [{"positions": f"{lo}-{hi}", "loss": losses[:, lo - 1:hi].mean().item()}
                        for lo, hi in position_buckets(losses.shape[1])],
    }
