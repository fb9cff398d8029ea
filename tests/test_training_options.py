"""train.compile and train.activation_checkpointing: same numbers, same parameter names."""
import pytest
import torch

from llm.model import build_model
from llm.model.wrap import apply_training_options, checkpointed_blocks

SHAPE = {"vocab_size": 64, "d_model": 32, "n_layers": 4, "n_heads": 2}


def model_and_batch(**model):
    torch.manual_seed(0)
    m = build_model({**SHAPE, **model})
    x = torch.randint(64, (2, 24))
    return m, x, torch.roll(x, -1, dims=1)


def loss_and_grads(model, x, y):
    loss, _ = model(x, targets=y)
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("mode, expected", [
    ("none", set()), ("full", {0, 1, 2, 3, 4}), ("every:1", {0, 1, 2, 3, 4}), ("every:2", {0, 2, 4}),
    ("every:3", {0, 3}), ("every:9", {0}),
])
def test_checkpointed_blocks(mode, expected):
    assert checkpointed_blocks(mode, 5) == expected


@pytest.mark.parametrize("mode", ["half", "every:", "every:0", "every:-1", "every:2x", "Full"])
def test_bad_checkpointing_mode(mode):
    with pytest.raises(ValueError, match="expected none, full or every:N"):
        checkpointed_blocks(mode, 4)


@pytest.mark.parametrize("model", [
    {"mixer": "softmax"}, {"mixer": "gated_deltanet"}, {"mixer": "mesa"},
    {"mixer": "pdssm", "layer_pattern": ["pdssm", "momentum"]},
], ids=lambda m: "-".join(m.get("layer_pattern", [m["mixer"]])))
@pytest.mark.parametrize("mode", ["full", "every:2"])
def test_activation_checkpointing_keeps_loss_and_gradients(model, mode):
    m, x, y = model_and_batch(**model)
    want_loss, want = loss_and_grads(m, x, y)
    apply_training_options(m, activation_checkpointing=mode)
    assert m.checkpointed == checkpointed_blocks(mode, 4)
    got_loss, got = loss_and_grads(m, x, y)
    assert torch.equal(got_loss, want_loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_compiled_blocks_keep_loss_gradients_and_parameter_names():
    m, x, y = model_and_batch(mixer="softmax", layer_pattern=["softmax", "gated_deltanet"], n_layers=2)
    names = list(m.state_dict())
    want_loss, want = loss_and_grads(m, x, y)
    apply_training_options(m, compile=True, activation_checkpointing="every:2")
    got_loss, got = loss_and_grads(m, x, y)
    assert list(m.state_dict()) == names
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    cache = m.init_cache(2)  # the step form (not compiled) still agrees
    logits, _ = m.forward_step(x, cache)
    torch.testing.assert_close(logits, m(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage, wrapping", [(1, ["train.compile=true", "train.activation_checkpointing=full"]),
                                             (3, ["train.activation_checkpointing=full"])])
def test_compile_and_checkpointing_through_the_trainer(tmp_path, data_dir, stage, wrapping):
    """The real DeepSpeed step with train.compile and full activation checkpointing gives the plain
    run's losses (to compile's rounding) at ZeRO-1; checkpointing alone at ZeRO-3 (its parameters
    gathered per block; compile is refused there, see test_config)."""
    from multiproc import metrics, train, write_config

    config = write_config(tmp_path / "tiny.yaml", data_dir)
    options = {"plain": [], "wrapped": wrapping}
    runs = {name: tmp_path / name for name in options}
    for name, overrides in options.items():
        train(config, runs[name], "train.max_steps=3", f"train.zero_stage={stage}", *overrides, nproc=1)
    plain, wrapped = metrics(runs["plain"]), metrics(runs["wrapped"])
    assert list(plain) == list(wrapped) == [1, 2, 3]
    for step in plain:
        assert wrapped[step]["loss"] == pytest.approx(plain[step]["loss"], rel=1e-4), step
    assert wrapped[3]["val_loss"] == pytest.approx(plain[3]["val_loss"], rel=1e-4)
