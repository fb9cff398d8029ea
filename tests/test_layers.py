"""RMSNorm and Rotary keep the numbers of their direct fp32 formulas."""
import pytest
import torch

from llm.model.layers import RMSNorm, Rotary


def rms_reference(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_the_fp32_upcast_formula(dtype, weight_dtype):
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
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)


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
        assert torch.equal(rotary(x[:, :T], start), rotary_reference(rotary, x[:, :T], start))
    table = rotary.table(101)
    assert rotary.table(50) is table  # no recomputation for a shorter sequence
    xb = x.bfloat16()
    assert torch.equal(rotary(xb, 3), rotary_reference(rotary, xb, 3))


def test_rotary_table_made_without_grad_serves_training():
    rotary = Rotary(8)
    with torch.inference_mode():
        rotary(torch.randn(1, 4, 1, 8))
    x = torch.randn(1, 4, 1, 8, requires_grad=True)
    rotary(x).sum().backward()
    assert x.grad is not None
