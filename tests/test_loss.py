"""The chunked loss over the head equals the trainer's full-logits `lm_loss` in value and gradient."""
import pytest
import torch

from llm.model import build_model
from llm.model.loss import chunked_lm_loss
from llm.engine import lm_loss


def inputs(n_tokens=(3, 10), dim=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n_tokens, dim, generator=g, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=g, requires_grad=True)
    targets = torch.randint(vocab, n_tokens, generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("chunk", [1, 7, 30, 4096])  # one token, uneven, exact, one chunk
def test_equals_full_logits_loss_in_value_and_gradient(z_loss, chunk):
    hidden, weight, targets = inputs()
    ref_loss, ref_ce = lm_loss(hidden @ weight.t(), targets, z_loss)
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight))
    loss, ce = chunked_lm_loss(hidden, weight, targets, z_loss=z_loss, chunk=chunk)
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(ce, ref_ce, rtol=0, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not ce.requires_grad and loss.requires_grad


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_unlabelled_targets_are_left_out_as_cross_entropy_does(chunk):
    hidden, weight, targets = inputs()
    targets = torch.where(torch.rand(targets.shape, generator=torch.Generator().manual_seed(1)) < 0.3, -100, targets)
    ref_ce = lm_loss(hidden @ weight.t(), targets)[0]
    ref_grads = torch.autograd.grad(ref_ce, (hidden, weight))
    loss, ce = chunked_lm_loss(hidden, weight, targets, chunk=chunk)
    torch.testing.assert_close(ce, ref_ce, rtol=0, atol=1e-6)
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight)), ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_backward_scales_by_the_incoming_gradient():
    """Gradient accumulation scales the loss (engine.backward(loss / accum)): the saved gradients
    must be scaled, and a second use of the loss adds up like any other tensor."""
    hidden, weight, targets = inputs()
    loss, _ = chunked_lm_loss(hidden, weight, targets, z_loss=1e-2, chunk=8)
    (0.25 * loss + loss).backward()
    ref_loss, _ = lm_loss(hidden @ weight.t(), targets, 1e-2)
    want = torch.autograd.grad(1.25 * ref_loss, (hidden, weight))
    torch.testing.assert_close(hidden.grad, want[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(weight.grad, want[1], rtol=0, atol=1e-6)


def test_without_grad_only_the_values():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        loss, ce = chunked_lm_loss(hidden, weight, targets, z_loss=1e-2, chunk=8)
        ref_loss, ref_ce = lm_loss(hidden @ weight.t(), targets, 1e-2)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(ce, ref_ce, rtol=0, atol=1e-6)


def test_bf16_gradients_keep_the_parameter_dtype():
    hidden, weight, targets = inputs()
    hidden, weight = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    loss, ce = chunked_lm_loss(hidden, weight, targets, chunk=8)
    loss.backward()
    assert loss.dtype == ce.dtype == torch.float32
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    ref_loss, _ = lm_loss(hidden.detach() @ weight.detach().t(), targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)  # fp32 sums in another order


def test_bad_targets_name_the_shape():
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match=r"targets: expected shape \[3, 10\]"):
        chunked_lm_loss(hidden, weight, targets[:, :-1])


@pytest.mark.parametrize("tie", [True, False])
def test_gpt_forward_with_targets_equals_lm_loss_of_its_logits(tie):
    torch.manual_seed(0)
    model = build_model({"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "tie_embeddings": tie})
    x = torch.randint(64, (2, 24))
    y = torch.roll(x, -1, dims=1)
    params = list(model.parameters())
    ref_loss, ref_ce = lm_loss(model(x), y, 1e-3)
    ref_grads = torch.autograd.grad(ref_loss, params)
    loss, ce = model(x, targets=y, z_loss=1e-3, loss_chunk=10)
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(ce, ref_ce, rtol=0, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
