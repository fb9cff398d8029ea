import json

import numpy as np
import pytest
import torch

from data_prep.cli import main
from llm.data import DataError, TokenShards, WindowLoader, eval_windows
from llm.data.bi_induct import rewrite

SEP = 60001
# A stream of distinct tokens, so a copied token can only come from its snippet's first half.
STREAM = np.arange(300_000, dtype=np.uint32)


def _halves(r):
    for start, half, backward in r.snippets:
        first = r.tokens[start:start + half]
        middle = r.tokens[start + half]
        second = r.tokens[start + half + 1:start + 2 * half + 1]
        yield first, middle, second, bool(backward)


@pytest.mark.parametrize("rate", [0.25, 0.5])
def test_length_rate_and_snippet_shape(rate):
    r = rewrite(STREAM, "forward", rate, span=(10, 30), seed=3, sep=SEP, window=256)
    assert r.tokens.shape == STREAM.shape and r.tokens.dtype == STREAM.dtype
    s = r.stats.as_dict()
    assert abs(s["token_fraction"] - rate) < 0.02
    inside = np.zeros(len(STREAM), bool)
    for start, half, _ in r.snippets:
        inside[start:start + 2 * half + 1] = True
    assert s["snippet_tokens"] == inside.sum() == sum(2 * h + 1 for h in r.snippets[:, 1])
    assert set(map(int, s["span_hist"])) <= set(range(10, 31)) and len(s["span_hist"]) > 15
    assert s["directions"] == {"forward": len(r.snippets), "backward": 0}
    for first, middle, second, backward in _halves(r):
        assert middle == SEP and not backward and np.array_equal(first, second)
        assert np.all(np.diff(first.astype(np.int64)) == 1)  # S is a run of the natural stream


def test_natural_text_resumes_after_each_snippet():
    # Per block, the natural tokens (outside snippets, plus each snippet's first half) are one
    # contiguous run of the input from the block's start: S is consumed, nothing else is skipped.
    r = rewrite(STREAM[:20_000], "backward", 0.5, span=(5, 15), seed=0, sep=SEP, window=128)
    second = np.zeros(len(r.tokens), bool)
    for start, half, _ in r.snippets:
        second[start + half:start + 2 * half + 1] = True
    for b in range(0, len(r.tokens), 128):
        natural = r.tokens[b:b + 128][~second[b:b + 128]]
        assert np.array_equal(natural, STREAM[b:b + len(natural)])


def test_backward_and_balanced_directions():
    back = rewrite(STREAM, "backward", 0.5, span=(20, 20), seed=1, sep=SEP, window=512)
    for first, middle, second, backward in _halves(back):
        assert backward and middle == SEP and np.array_equal(second, first[::-1])
    bal = rewrite(STREAM, "balanced", 0.5, span=(20, 20), seed=1, sep=SEP, window=512)
    d = bal.stats.as_dict()["directions"]
    assert 0.45 < d["forward"] / (d["forward"] + d["backward"]) < 0.55
    for first, _, second, backward in _halves(bal):
        assert np.array_equal(second, first[::-1] if backward else first)
    # One seed, one placement: the modes differ only in direction.
    assert np.array_equal(bal.snippets[:, :2], back.snippets[:, :2])


def test_no_separator_and_no_window():
    r = rewrite(STREAM[:10_000], "forward", 0.3, span=(8, 8), seed=0)
    assert len(r.tokens) == 10_000 and abs(r.stats.as_dict()["token_fraction"] - 0.3) < 0.02
    for start, half, _ in r.snippets:
        assert np.array_equal(r.tokens[start:start + half], r.tokens[start + half:start + 2 * half])


def test_deterministic_per_seed():
    a = rewrite(STREAM[:50_000], "balanced", 0.5, (20, 20), seed=5, sep=SEP, window=256)
    b = rewrite(STREAM[:50_000], "balanced", 0.5, (20, 20), seed=5, sep=SEP, window=256)
    c = rewrite(STREAM[:50_000], "balanced", 0.5, (20, 20), seed=6, sep=SEP, window=256)
    assert np.array_equal(a.tokens, b.tokens) and not np.array_equal(a.tokens, c.tokens)


def test_snippets_never_cross_a_window_and_windows_rewrite_alone():
    T = 100
    r = rewrite(STREAM[:40_000], "balanced", 0.6, span=(10, 24), seed=2, sep=SEP, window=T)
    starts, ends = r.snippets[:, 0], r.snippets[:, 0] + 2 * r.snippets[:, 1] + 1
    assert np.array_equal(starts // T, (ends - 1) // T)
    # The token two windows share (each block's first) stays natural...
    assert np.array_equal(r.tokens[::T], STREAM[:40_000:T])
    # ...so rewriting any one block alone, at its offset, gives the same tokens.
    for w in (0, 17, 399):
        alone = rewrite(STREAM[w * T:(w + 1) * T], "balanced", 0.6, (10, 24), 2, SEP, window=T, offset=w * T)
        assert np.array_equal(alone.tokens, r.tokens[w * T:(w + 1) * T])


def test_rewrite_argument_errors():
    with pytest.raises(ValueError, match="window=30 cannot hold a snippet of up to 41 tokens"):
        rewrite(STREAM[:100], "forward", 0.5, (20, 20), sep=SEP, window=30)
    with pytest.raises(ValueError, match="mode: got 'sideways'"):
        rewrite(STREAM[:100], "sideways", 0.5)
    with pytest.raises(ValueError, match="offset=5 is not a multiple"):
        rewrite(STREAM[:100], "forward", 0.1, (2, 2), window=50, offset=5)


def _bi(mode="forward", anneal="none", apply="online", seed=4, rate=0.5, span=(12, 20)):
    return {"mode": mode, "rate": rate, "anneal": anneal, "span": list(span), "seed": seed, "apply": apply}


def test_online_equals_prep_window_by_window(tmp_path, data_dir):
    T = 64
    out = tmp_path / "rewritten"
    assert main(["bi-induct", "--in", str(data_dir), "--out", str(out), "--mode", "balanced",
                 "--rate", "0.5", "--span", "12", "20", "--seed", "4", "--seq-len", str(T)]) == 0
    natural, prepped = TokenShards(data_dir, "train"), TokenShards(out, "train")
    assert prepped.num_tokens == natural.num_tokens and prepped.bi_induct["mode"] == "balanced"
    online = WindowLoader(natural, T, seed=9, global_batch_size=8, bi_induct=_bi("balanced"))
    prep = WindowLoader(prepped, T, seed=9, global_batch_size=8, bi_induct=_bi("balanced", apply="prep"))
    for g in range(0, 2 * online.num_windows, 7):  # two epochs
        assert torch.equal(online.sample(g), prep.sample(g))
    assert not np.array_equal(prepped.slice(0, natural.num_tokens), natural.slice(0, natural.num_tokens))
    stats = json.loads((out / "bi_induct_stats.json").read_text())["stats"]
    assert abs(stats["token_fraction"] - 0.5) < 0.03 and stats["directions"]["backward"] > 0
    # The loader logs the stats of the windows it rewrote: one epoch = every whole window once.
    logged = WindowLoader(natural, T, 9, 8, bi_induct=_bi("balanced"))
    for g in range(logged.num_windows):
        logged.sample(g)
    whole = rewrite(natural.slice(0, logged.num_windows * T), "balanced", 0.5, (12, 20), 4, natural.sep_id, T)
    assert logged.rewrite_stats() == whole.stats.as_dict()
    assert logged.rewrite_stats()["snippets"] == 0  # reset after reading
    # The held-out split is never rewritten.
    assert torch.equal(eval_windows(TokenShards(out, "val"), T, 0), eval_windows(TokenShards(data_dir, "val"), T, 0))


def test_online_rate_anneals_and_prep_mismatch_is_refused(tmp_path, data_dir):
    T, G = 64, 8
    natural = TokenShards(data_dir, "train")
    loader = WindowLoader(natural, T, 0, G, max_steps=100, bi_induct=_bi(anneal="linear"))
    assert [loader.rate(g) for g in (0, 7, 50 * G, 99 * G + 7)] == pytest.approx([0.5, 0.5, 0.25, 0.005])
    early = [loader.sample(g) for g in range(64)]
    assert abs(loader.rewrite_stats()["token_fraction"] - 0.5) < 0.1
    late = [loader.sample(g) for g in range(99 * G, 99 * G + 64)]
    assert loader.rewrite_stats()["token_fraction"] < 0.05
    assert len(early) == len(late) == 64
    with pytest.raises(DataError, match="anneal=linear needs max_steps"):
        WindowLoader(natural, T, 0, G, bi_induct=_bi(anneal="linear"))
    with pytest.raises(DataError, match="python -m data_prep bi-induct --in"):
        WindowLoader(natural, T, 0, G, bi_induct=_bi(apply="prep"))
    out = tmp_path / "rewritten"
    assert main(["bi-induct", "--in", str(data_dir), "--out", str(out), "--mode", "forward",
                 "--span", "12", "20", "--seed", "4", "--seq-len", str(T)]) == 0
    with pytest.raises(DataError, match="seq_len"):  # prep for another window length
        WindowLoader(TokenShards(out, "train"), 2 * T, 0, G, bi_induct=_bi(apply="prep"))
    with pytest.raises(DataError, match="holds Bi-Induct-rewritten shards"):
        WindowLoader(TokenShards(out, "train"), T, 0, G)
