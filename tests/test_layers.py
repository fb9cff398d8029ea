"""RMSNorm and Rotary keep the numbers of their direct fp32 formulas (to rounding)."""
import pytest
import torch

from llm.model.layers import RMSNorm, Rotary


def rms_reference(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_the_fp32_upcast_formula(dtype, weight_dtype):
    """The forward equals the formula; the gradients equal its autograd in fp32, and in bf16 are
    at least as close to the exact (fp64) gradients as autograd of the formula is (the hand-written
    backward stays in fp32 where autograd rounds grad * weight to bf16 first)."""
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5).to(weight_dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = (3 * torch.randn(4, 7, 48)).to(dtype).requires_grad_()
    got = norm(x)
    want = rms_reference(x, norm.weight, 1e-5)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    g = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (x, norm.weight), g)
    want_grads = torch.autograd.grad(want, (x, norm.weight), g)
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    exact = torch.autograd.grad(rms_reference(x64, w64, 1e-5), (x64, w64), g.double())
    for a, b, e in zip(got_grads, want_grads, exact):
        assert a.dtype == b.dtype
        if dtype == torch.float32 and weight_dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert (a.double() - e).abs().max() <= (b.double() - e).abs().max() * 1.01 + 1e-6


def rotary_reference(rotary, x, start):
    pos = torch.arange(start, start + x.shape[1], dtype=torch.float32)
    freqs = torch.outer(pos, rotary.inv_freq)
    cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def test_rotary_table_is_cached_and_bit_identical_at_any_offset():
    torch.manual_seed(0)
    rotary = Rotary(16)
    x = torch.randn(2, 40, 3, 16)
    for start, T in [(0, 8), (5, 40), (0, 40), (17, 3), (100, 1)]:  # grows, then slices
        got = rotary(x[:, :T], start)
        assert torch.equal(got, Rotary(16)(x[:, :T], start))  # a table made for exactly this length
        torch.testing.assert_close(got, rotary_reference(rotary, x[:, :T], start), rtol=1e-6, atol=1e-6)
    table = rotary.table(101)
    assert rotary.table(50) is table  # no recomputation for a shorter sequence
    xb = x.bfloat16()
    torch.testing.assert_close(rotary(xb, 3), rotary_reference(rotary, xb, 3), rtol=0, atol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_gradient_is_the_formulas(dtype):
    torch.manual_seed(0)
    rotary = Rotary(16)
    x = torch.randn(2, 9, 3, 16).to(dtype).requires_grad_()
    g = torch.randn(2, 9, 3, 16).to(dtype)
    got, = torch.autograd.grad(rotary(x, 4), x, g)
    want, = torch.autograd.grad(rotary_reference(rotary, x, 4), x, g)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **({} if dtype == torch.float32 else dict(rtol=0, atol=0.02)))


def test_rotary_table_made_without_grad_serves_training():
    rotary = Rotary(8)
    with torch.inference_mode():
        rotary(torch.randn(1, 4, 1, 8))
    x = torch.randn(1, 4, 1, 8, requires_grad=True)
    rotary(x).sum().backward()
    assert x.grad is not None
