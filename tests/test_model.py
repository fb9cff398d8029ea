import pytest
import torch

from llm.model import build_model
from llm.model.roles import param_role
from stepping import run_in_pieces

TINY = {"vocab_size": 97, "d_model": 32, "n_layers": 2, "n_heads": 4}


def pieces_match(model, ids, sizes):
    """forward_step fed in pieces of the given sizes reproduces one forward over the sequence."""
    torch.testing.assert_close(run_in_pieces(model, ids, sizes)[0], model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extra", [{}, {"qk_norm": True}, {"n_kv_heads": 2}, {"tie_embeddings": False}])
def test_shapes_causality_and_step_form(extra):
    torch.manual_seed(0)
    model = build_model({**TINY, **extra}).eval()
    ids = torch.randint(0, 97, (2, 19))
    logits = model(ids)
    assert logits.shape == (2, 19, 97)
    changed = ids.clone()
    changed[:, 11] = (changed[:, 11] + 1) % 97
    other = model(changed)
    torch.testing.assert_close(other[:, :11], logits[:, :11], atol=0, rtol=0)
    assert (other[:, 11:] - logits[:, 11:]).abs().max() > 1e-4
    pieces_match(model, ids, [1, 6, 3, 9])


def test_every_parameter_has_a_role_and_init_is_scaled():
    model = build_model({**TINY, "n_layers": 8})
    assert all(param_role(p) is not None for p in model.parameters())
    o_std = model.blocks[0].mixer.o_proj.weight.std().item()
    q_std = model.blocks[0].mixer.q_proj.weight.std().item()
    assert o_std == pytest.approx(q_std / 4, rel=0.2)  # residual outputs: std / sqrt(2 * 8)


def test_tied_head_shares_the_embedding():
    model = build_model(TINY)
    assert model.head is None
    ids = torch.randint(0, 97, (1, 5))
    model(ids).sum().backward()
    assert model.embed.weight.grad is not None
