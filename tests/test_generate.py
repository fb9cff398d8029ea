"""The one decoding loop (`llm.generate.generate`): cached decoding agrees with full forwards."""
import pytest
import torch

from llm.generate import generate
from llm.model import build_model

V = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model({"vocab_size": V, "d_model": 32, "n_layers": 2, "n_heads": 4,
                        "layer_pattern": ["softmax", "gated_deltanet"], "tie_embeddings": False,
                        "init_std": 0.2}).eval()  # untied and large: greedy text does not repeat one token


@torch.no_grad()
def last_logits(model, ids):
    return model(torch.tensor([ids]))[0, -1]


def test_greedy_batch_equals_full_forward_argmax(model):
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6], [5, 5, 5, 5]]
    got = generate(model, prompts, 10, temperature=0)
    for prompt, new in zip(prompts, got):
        want = []
        for _ in range(10):
            want.append(int(last_logits(model, prompt + want).argmax()))
        assert new == want
    assert generate(model, prompts, 10, temperature=1.0, top_k=1, seed=5) == got  # top-k 1 is greedy


def test_eos_and_stop_end_their_row_only(model):
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6]]
    free = generate(model, prompts, 8)
    eos = free[0][3]
    first = free[0].index(eos)  # EOS is not returned; the row ends at its first occurrence
    cut = generate(model, prompts, 8, eos_id=eos)
    assert cut[0] == free[0][:first]
    assert cut[1] == (free[1][:free[1].index(eos)] if eos in free[1] else free[1])
    seen = []
    stopped = generate(model, prompts, 8, stop=lambda row, new: seen.append(row) or (row == 1 and len(new) == 2))
    assert stopped == [free[0], free[1][:2]] and seen.count(1) == 2


def test_sampling_is_seeded_and_stays_in_the_top_k(model):
    prompt = [3, 1, 4, 1, 5]
    a = generate(model, [prompt], 20, temperature=1.5, top_k=4, seed=1)[0]
    assert a == generate(model, [prompt], 20, temperature=1.5, top_k=4, seed=1)[0]
    assert a != generate(model, [prompt], 20, temperature=1.5, top_k=4, seed=2)[0]
    for t, token in enumerate(a):
        assert token in last_logits(model, prompt + a[:t]).topk(4).indices.tolist()


def test_bad_prompts_fail_early(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 4)
    with pytest.raises(ValueError, match="equal lengths"):
        generate(model, [[1, 2], [3]], 4)


@pytest.mark.parametrize("flag, value", [("--max-new-tokens", "-1"), ("--temperature", "-0.5"), ("--top-k", "-3"),
                                         ("--temperature", "nan"), ("--seed", "-1")])
def test_the_cli_refuses_negative_sampling_arguments(flag, value, capsys):
    from llm.generate import main

    with pytest.raises(SystemExit):  # before it looks for the run directory
        main(["no/such/run", "--prompt", "x", flag, value])
    assert f"argument {flag}: expected " in capsys.readouterr().err
