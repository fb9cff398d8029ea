import math

import pytest
import torch
import torch.nn.functional as F

from llm.data import TokenShards, eval_windows
from llm.eval.ppl import perplexity, position_buckets
from llm.model import build_model


def test_position_buckets():
    assert position_buckets(300) == [(1, 16), (17, 64), (65, 256), (257, 300)]
    assert position_buckets(64) == [(1, 16), (17, 64)]
    assert position_buckets(10) == [(1, 10)]


def test_perplexity_equals_direct_computation(data_dir):
    from llm.data import load_tokenizer

    tok = load_tokenizer(data_dir)
    shards = TokenShards(data_dir, "val")
    windows = eval_windows(shards, 80, 12)
    torch.manual_seed(0)
    model = build_model({"vocab_size": tok.vocab_size, "d_model": 32, "n_layers": 2, "n_heads": 4}).eval()
    res = perplexity(model, windows, tok, batch_size=5)

    with torch.no_grad():
        logits = model(windows[:, :-1])
    losses = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")
    assert res["tokens"] == 12 * 80
    assert res["loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(losses.mean().item()), rel=1e-5)
    assert [b["loss"] for b in res["by_position"]] == pytest.approx(
        [losses[:, :16].mean().item(), losses[:, 16:64].mean().item(), losses[:, 64:].mean().item()], rel=1e-5)
    # The windows share edge tokens, so their predicted bytes are the text of the stream after token 0.
    stream = shards.slice(0, 12 * 80 + 1).tolist()
    text_bytes = len(tok.decode(stream).encode()) - len(tok.decode(stream[:1]).encode())
    assert res["bytes"] == text_bytes
    assert res["bits_per_byte"] == pytest.approx(losses.sum().item() / math.log(2) / text_bytes, rel=1e-5)
