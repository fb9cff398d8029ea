"""Bi-Induct (Sabry & Belz, "Induction Signatures Are Not Enough", arXiv 2509.22947): rewrite a
token stream so that a fraction of it is copy snippets.

A snippet is [S, SEP, S] (forward: induction) or [S, SEP, reverse(S)] (backward: anti-induction),
where S is the next L ~ U[lo, hi] tokens of the natural stream. S is consumed: the natural text
resumes after it, so the second half is the only repetition a snippet adds. The output has the
input's length (compute matched): snippets displace natural tokens, and the natural tokens a block
has no room left for are dropped. `rate` is the expected fraction of output tokens inside snippets;
`balanced` picks each snippet's direction with p = 0.5.

Windows. The loader's window w is tokens [w*T, w*T + T + 1): its inputs are block w = [w*T, (w+1)*T)
and its last target is the first token of block w + 1, the one token two windows share. Each block
is rewritten on its own, from an RNG seeded by (seed, block index), and a snippet lies inside its
block, so every snippet is whole in one window (inputs and targets). A block's first token is
always natural (a snippet starts with S), so the shared token is the same whether a window is
rewritten alone (the loader's online mode) or as part of the whole stream (prep): online == prep
window by window. The price: a block's natural text skips the dropped tokens just before the next
block starts, one discontinuity per window, like a document boundary.

The draws happen in a fixed order (spans, positions, then directions), so forward, backward and
balanced rewrites with one seed put the snippets at the same places and differ only in direction.
"""
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

MODES = ("forward", "backward", "balanced")


@dataclass
class RewriteStats:
    tokens: int = 0  # output tokens seen
    snippets: int = 0
    snippet_tokens: int = 0  # output tokens inside snippets (both halves and separators)
    forward: int = 0
    backward: int = 0
    spans: Counter = field(default_factory=Counter)  # half length L -> count

    def add(self, other: "RewriteStats") -> None:
        self.tokens += other.tokens
        self.snippets += other.snippets
        self.snippet_tokens += other.snippet_tokens
        self.forward += other.forward
        self.backward += other.backward
        self.spans.update(other.spans)

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "snippets": self.snippets, "snippet_tokens": self.snippet_tokens,
                "token_fraction": self.snippet_tokens / self.tokens if self.tokens else 0.0,
                "directions": {"forward": self.forward, "backward": self.backward},
                "span_hist": {str(k): v for k, v in sorted(self.spans.items())}}


class Rewrite(NamedTuple):
    tokens: np.ndarray  # same length and dtype as the input
    snippets: np.ndarray  # int64 [k, 3]: output start, half length L, 1 if backward
    stats: RewriteStats


def rewrite(tokens, mode: str, rate: float, span=(20, 20), seed: int = 0, sep=None, window=None,
            offset: int = 0) -> Rewrite:
    """Rewrite `tokens` block by block (blocks of `window` tokens, or one block if None).

    `offset`: the stream position of tokens[0], a multiple of `window`; block indices (and so the
    RNG seeds) count from the stream's start, which lets a window be rewritten alone.
    `sep`: the separator's token id, or None for snippets [S, S'] without one.
    """
    check_args(mode, rate, span, sep, window)
    tokens = np.asarray(tokens)
    lo, hi = (int(x) for x in span)
    has_sep = int(sep is not None)
    block = window or max(len(tokens), 1)
    if offset % block:
        raise ValueError(f"offset={offset} is not a multiple of the window ({block})")
    out = tokens.copy()
    stats = RewriteStats(tokens=len(tokens))
    snippets = []
    for start in range(0, len(tokens), block):
        rng = np.random.default_rng([seed, (offset + start) // block])
        for pos, half, backward in _rewrite_block(tokens[start:start + block], out[start:start + block],
                                                  rng, mode, rate, lo, hi, sep):
            snippets.append((start + pos, half, backward))
            stats.snippets += 1
            stats.snippet_tokens += 2 * half + has_sep
            stats.backward += backward
            stats.forward += not backward
            stats.spans[half] += 1
    return Rewrite(out, np.array(snippets, dtype=np.int64).reshape(-1, 3), stats)


def check_args(mode: str, rate: float, span, sep=None, window=None) -> None:
    """Raise ValueError naming the argument that `rewrite` cannot work with."""
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}, expected one of {', '.join(MODES)}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate: expected 0 <= rate < 1, got {rate}")
    if len(span) != 2 or not 1 <= span[0] <= span[1]:
        raise ValueError(f"span: expected [lo, hi] with 1 <= lo <= hi, got {list(span)}")
    longest = 2 * span[1] + (sep is not None)
    if window is not None and window < longest:
        raise ValueError(f"window={window} cannot hold a snippet of up to {longest} tokens "
                         f"(span hi={span[1]}): use a longer window or a shorter span")


def _rewrite_block(src, dst, rng, mode, rate, lo, hi, sep):
    """Write the rewrite of `src` into `dst` (same length); returns (start, L, backward) per snippet."""
    n, has_sep = len(src), int(sep is not None)
    halves = _draw_halves(rng, n, rate, lo, hi, has_sep)
    k = len(halves)
    if not k:
        dst[:] = src
        return []
    sizes = [2 * h + has_sep for h in halves]
    free = n - sum(sizes)  # natural tokens outside snippets
    # Uniform interleaving of k snippets among `free` natural tokens: item slots of the snippets.
    slots = np.sort(rng.choice(free + k, size=k, replace=False))
    backward = np.full(k, mode == "backward") if mode != "balanced" else rng.random(k) < 0.5
    placed = []
    out_pos = in_pos = snippet_tokens = 0
    for i, (half, size) in enumerate(zip(halves, sizes)):
        start = int(slots[i]) - i + snippet_tokens  # natural tokens before it + earlier snippets
        gap = start - out_pos
        dst[out_pos:start] = src[in_pos:in_pos + gap]
        s = src[in_pos + gap:in_pos + gap + half]
        dst[start:start + half] = s
        if has_sep:
            dst[start + half] = sep
        dst[start + half + has_sep:start + size] = s[::-1] if backward[i] else s
        placed.append((start, half, int(backward[i])))
        out_pos, in_pos, snippet_tokens = start + size, in_pos + gap + half, snippet_tokens + size
    dst[out_pos:] = src[in_pos:in_pos + n - out_pos]
    return placed


def _draw_halves(rng, n: int, rate: float, lo: int, hi: int, has_sep: int) -> list[int]:
    """Snippet half lengths whose total size is rate * n in expectation: draw snippets while they
    fit the budget, and take the one that overshoots with probability (budget left) / size."""
    budget, room, halves = rate * n, n, []
    while budget > 0:
        half = int(rng.integers(lo, hi + 1))
        size = 2 * half + has_sep
        if size > room or (size > budget and rng.random() * size >= budget):
            break
        halves.append(half)
        budget, room = budget - size, room - size
    return halves
