"""Model-level checks of the GPT itself (the per-mixer contract is tests/test_mixer_contract.py)."""
import pytest
import torch

from llm.model import build_model
from llm.model.roles import param_role

TINY = {"vocab_size": 97, "d_model": 32, "n_layers": 2, "n_heads": 4}


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
