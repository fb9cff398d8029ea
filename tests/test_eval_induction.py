import pytest
import torch

from llm.eval.induction import (choose_heads, head_ablation, head_scores, induction_report, mask_heads,
                                previous_occurrence, repeated_tokens, score, zero_mixer)
from llm.model import build_model
from llm.ops.attention import attention, attention_probs

TINY = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4}


def pattern(tokens, shift):
    """Attention that puts all mass on previous occurrence + shift where it exists, else on self."""
    B, T = tokens.shape
    prev = previous_occurrence(tokens)
    target = torch.where((prev >= 0) & (prev + shift >= 0), prev + shift, torch.arange(T))
    return torch.nn.functional.one_hot(target, T).float()  # [B, T, T]


def test_previous_occurrence():
    tokens = torch.tensor([[5, 6, 5, 7, 6, 5]])
    assert previous_occurrence(tokens).tolist() == [[-1, -1, 0, -1, 1, 2]]


def test_scores_of_hand_built_patterns():
    L = 32
    tokens = repeated_tokens(range(100), batch=3, length=L, seed=1)
    assert torch.equal(tokens[:, :L], tokens[:, L:]) and len(set(tokens[0, :L].tolist())) == L
    T = 2 * L
    uniform = torch.ones(T, T).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(3, T, T)
    probs = torch.stack([pattern(tokens, 1), pattern(tokens, -1), uniform], dim=1)  # heads: ind, anti, uniform
    ind, anti = score(probs, tokens, 1), score(probs, tokens, -1)
    torch.testing.assert_close(ind[:2], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(anti[:2], torch.tensor([0.0, 1.0]))
    # uniform attention gives 1 / (i + 1) to any one key: about ln 2 / L over the second copy
    torch.testing.assert_close(ind[2], torch.tensor([1 / (i + 1) for i in range(L, T)]).mean())
    torch.testing.assert_close(anti[2], torch.tensor([1 / (i + 1) for i in range(L + 1, T)]).mean())
    assert ind[2] < 0.05 and anti[2] < 0.05


def test_score_needs_repeats():
    with pytest.raises(ValueError, match="repeat"):
        score(torch.ones(1, 1, 4, 4), torch.arange(4)[None])


@pytest.mark.parametrize("mixer", ["softmax", "momentum"])
def test_head_scores_use_each_layers_mixer_input(mixer):
    torch.manual_seed(0)
    model = build_model({**TINY, "mixer": mixer}).eval()
    tokens = repeated_tokens(range(64), batch=4, length=12, seed=0)
    got = head_scores(model, tokens, batch_size=3)  # two chunks: weighted means must combine right
    h = model.embed(tokens)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            q, k, _ = block.mixer.qkv(block.mixer_norm(h))
            probs = attention_probs(q, k)
            torch.testing.assert_close(got[i][0], score(probs, tokens, 1))
            torch.testing.assert_close(got[i][1], score(probs, tokens, -1))
            h = block(h)


def test_mask_heads_zeroes_exactly_the_chosen_heads():
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    mixer = model.blocks[1].mixer
    x = torch.randn(2, 9, 32)
    seen = []
    hook = mixer.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].view(2, 9, 4, 8)))
    with torch.no_grad():
        full = mixer(x)
        with mask_heads(model, {1: [0, 2]}):
            masked = mixer(x)
    hook.remove()
    assert mixer.head_mask is None  # restored
    per_head_full, per_head_masked = seen
    assert per_head_masked[:, :, [0, 2]].abs().max() == 0
    torch.testing.assert_close(per_head_masked[:, :, [1, 3]], per_head_full[:, :, [1, 3]], atol=0, rtol=0)
    q, k, v = mixer.qkv(x)
    o = attention(q, k, v)
    o[:, :, [0, 2]] = 0
    torch.testing.assert_close(masked, mixer.o_proj(o.flatten(2)))
    assert (masked - full).abs().max() > 1e-4


def test_zero_mixer_removes_only_that_mixer():
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad(), zero_mixer(model, 0):
        h = model.embed(ids)
        assert model.blocks[0].mixer(model.blocks[0].mixer_norm(h)).abs().max() == 0
        ablated = model(ids)
        b0 = model.blocks[0]
        expected = model.logits(model.blocks[1](h + b0.mlp(b0.mlp_norm(h))))
    torch.testing.assert_close(ablated, expected)
    assert (model(ids) - ablated).abs().max() > 1e-4  # hook removed


def test_report_covers_linear_layers_and_ablation_uses_masks():
    torch.manual_seed(0)
    model = build_model({**TINY, "n_layers": 3, "layer_pattern": ["gated_deltanet", "softmax"]}).eval()
    tokens = repeated_tokens(range(64), batch=2, length=16, seed=0)
    report = induction_report(model, tokens)
    assert [e["mixer"] for e in report["layers"]] == ["gated_deltanet", "softmax", "gated_deltanet"]
    assert "induction" not in report["layers"][0] and len(report["layers"][1]["induction"]) == 4
    assert all(e["copy_loss_second_ablated"] > 0 for e in report["layers"])
    assert report["copy_score"] == pytest.approx(report["copy_loss_first"] - report["copy_loss_second"])

    report["layers"][1]["induction"] = [0.1, 0.7, 0.3, 0.2]
    top, rand = choose_heads(report, fraction=0.02, seed=0)
    assert top == {1: [1]} and len(rand[1]) == 1 and rand[1] != [1]
    top, _ = choose_heads(report, fraction=0.5, seed=0)
    assert top == {1: [1, 2]}

    def zeroed_heads():
        mask = model.blocks[1].mixer.head_mask
        return {"zeroed": 0.0 if mask is None else float((mask == 0).sum())}

    ab = head_ablation(model, report, zeroed_heads, fraction=0.02, seeds=3)
    assert ab["baseline"] == {"zeroed": 0.0} and ab["induction_ablated"] == {"zeroed": 1.0}
    assert ab["random_mean"] == {"zeroed": 1.0} and ab["change_induction"] == {"zeroed": 1.0}
    assert all(1 not in r["heads"][1] for r in ab["random_ablated"])
    assert model.blocks[1].mixer.head_mask is None
