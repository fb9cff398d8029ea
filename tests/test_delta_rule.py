"""The delta-rule ops: chunk form == recurrence (values, final states, gradients), stability."""
import pytest
import torch
import torch.nn.functional as F

from llm.ops.delta_rule import chunk_delta_rule, recurrent_delta_rule


def inputs(B=2, T=37, H=2, K=8, V=6, gated=True, init=True, seed=0, decay=(0.0, 1.0), beta_max=1.0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    lo, hi = decay
    return dict(
        q=rand(B, T, H, K), k=F.normalize(rand(B, T, H, K), dim=-1), v=rand(B, T, H, V),
        beta=beta_max * torch.rand(B, T, H, generator=gen),
        g=-(lo + (hi - lo) * torch.rand(B, T, H, generator=gen)) if gated else None,
        initial_state=rand(B, H, K, V) if init else None)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("T,chunk_size", [(37, 1), (37, 8), (37, 16), (5, 64), (32, 16)])
def test_chunk_matches_recurrent(gated, init, T, chunk_size):
    x = inputs(T=T, gated=gated, init=init)
    o1, s1 = chunk_delta_rule(**x, output_final_state=True, chunk_size=chunk_size)
    o2, s2 = recurrent_delta_rule(**x, output_final_state=True)
    assert o1.shape == (2, T, 2, 6) and s1.shape == (2, 2, 8, 6)
    torch.testing.assert_close(o1, o2, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(s1, s2, atol=2e-5, rtol=1e-5)


def test_negative_eigenvalues_and_custom_scale():
    x = inputs(beta_max=2.0)
    o1, _ = chunk_delta_rule(**x, scale=0.7, chunk_size=8)
    o2, _ = recurrent_delta_rule(**x, scale=0.7)
    torch.testing.assert_close(o1, o2, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_gradients_match(gated):
    x = inputs(T=21, gated=gated)
    w = torch.randn(2, 21, 2, 6)
    w_state = torch.randn(2, 2, 8, 6)

    def grads(op, **kw):
        leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
        o, s = op(**leaves, output_final_state=True, **kw)
        ((o * w).sum() + (s * w_state).sum()).backward()
        return {n: t.grad for n, t in leaves.items()}

    chunk, rec = grads(chunk_delta_rule, chunk_size=8), grads(recurrent_delta_rule)
    assert set(chunk) == {"q", "k", "v", "beta", "initial_state"} | ({"g"} if gated else set())
    for name in chunk:
        torch.testing.assert_close(chunk[name], rec[name], atol=5e-5, rtol=1e-4, msg=name)


def test_the_rule_overwrites_and_decays():
    """beta = 1 replaces the value stored under a key; g decays the state by exp(g)."""
    K = V = 4
    e = torch.eye(K)
    k = e[[0, 1, 0]].view(1, 3, 1, K)  # write key e0, then e1, then e0 again
    v = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 5.0, 0]]).view(1, 3, 1, V)
    q = e[[0, 1, 0]].view(1, 3, 1, K)
    beta = torch.ones(1, 3, 1)
    for op in (recurrent_delta_rule, lambda *a, **kw: chunk_delta_rule(*a, chunk_size=2, **kw)):
        o, _ = op(q, k, v, beta=beta, scale=1.0)
        torch.testing.assert_close(o[0, :, 0], torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 5.0, 0]]))
        g = torch.full((1, 3, 1), -1.0)
        o, _ = op(q, k, v * 0, beta=beta * 0, g=g, scale=1.0, initial_state=torch.eye(K).view(1, 1, K, V))
        torch.testing.assert_close(o[0, :, 0], e[[0, 1, 0]] * torch.exp(torch.tensor([-1.0, -2, -3]))[:, None])


@pytest.mark.parametrize("T,decay", [(2048, None), (2048, (2.0, 30.0)), (8192, (0.0, 0.05))])
def test_long_sequences_are_stable(T, decay):
    """fp32: no decay; decay so strong that a chunk's cumulative log-decay reaches about -1000
    (its exp underflows, the exp of its negation would overflow); slow decay over 8192 tokens."""
    x = inputs(B=1, T=T, H=1, K=16, V=16, init=False, gated=decay is not None, decay=decay or (0, 0), seed=1)
    o1, s1 = chunk_delta_rule(**x, output_final_state=True)
    o2, s2 = recurrent_delta_rule(**x, output_final_state=True)
    assert torch.isfinite(o1).all() and torch.isfinite(s1).all()
    torch.testing.assert_close(o1, o2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-4)


def test_half_precision_inputs_on_cpu_use_the_reference():
    x = inputs(gated=True, init=False)
    xb = {n: t.bfloat16() for n, t in x.items() if t is not None}
    o, s = chunk_delta_rule(**xb, output_final_state=True, chunk_size=8)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    ref, _ = chunk_delta_rule(**{n: t.float() for n, t in xb.items()}, chunk_size=8)
    torch.testing.assert_close(o.float(), ref, atol=2e-2, rtol=2e-2)


def test_bad_arguments_name_what_was_expected():
    x = inputs()
    with pytest.raises(ValueError, match=r"beta: expected shape \[B, T, H\]"):
        chunk_delta_rule(**{**x, "beta": x["beta"][:, :5]})
    with pytest.raises(ValueError, match=r"q, k \[B, T, H, K\]"):
        recurrent_delta_rule(**{**x, "k": x["k"][..., :4]})
    with pytest.raises(ValueError, match=r"initial_state .* expected shape \[2, 2, 8, 6\]"):
        chunk_delta_rule(**{**x, "initial_state": x["initial_state"][:1]})
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_delta_rule(**x, chunk_size=0)
    with pytest.raises(RuntimeError, match="fla"):  # the kernel can't run on CPU fp32: say so
        chunk_delta_rule(**x, backend="fla")
