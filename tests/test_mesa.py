"""The Mesa ops: CG against the exact solve, chunk form == recurrence, implicit gradients."""
import pytest
import torch
import torch.nn.functional as F

from llm.ops.mesa import chunk_mesa, conjugate_gradient, recurrent_mesa


def inputs(B=2, T=37, H=2, K=8, V=6, init=True, seed=0, decay_logit=2.0, lamb_min=0.25):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    keys = rand(B, H, K, 3)
    return dict(
        q=F.normalize(rand(B, T, H, K), dim=-1), k=F.normalize(rand(B, T, H, K), dim=-1), v=rand(B, T, H, V),
        g=F.logsigmoid(rand(B, T, H) + decay_logit), beta=torch.rand(B, T, H, generator=gen),
        lamb=F.softplus(rand(H, K)) + lamb_min,
        initial_state=(keys @ keys.mT, rand(B, H, K, V)) if init else None)


def test_conjugate_gradient_solves_spd_systems_and_stops_at_tolerance():
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(5, 12, 12, generator=gen)
    A = M @ M.mT + 0.5 * torch.eye(12)
    b = torch.randn(5, 12, generator=gen)
    exact = torch.linalg.solve(A, b)
    calls = []

    def matvec(p):
        calls.append(1)
        return (A @ p[..., None]).squeeze(-1)

    torch.testing.assert_close(conjugate_gradient(matvec, b, steps=60), exact, atol=1e-4, rtol=1e-4)
    calls.clear()
    x = conjugate_gradient(matvec, b, steps=60, tol=1e-2)
    assert 0 < len(calls) < 60
    residual = (b - matvec(x)).norm(dim=-1) / b.norm(dim=-1)
    assert (residual <= 1e-2).all()
    zero = conjugate_gradient(matvec, torch.zeros_like(b), steps=5)  # b = 0 (padding): x = 0, no NaN
    assert torch.equal(zero, torch.zeros_like(b))


@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("T,chunk_size", [(37, 1), (37, 8), (37, 16), (5, 64)])
def test_chunk_matches_recurrent_at_every_cg_step_count(init, T, chunk_size):
    """Both forms run the same CG from x = 0, so they agree even before CG has converged."""
    x = inputs(T=T, init=init)
    for steps in (2, 30):
        o1, (h1, g1) = chunk_mesa(**x, output_final_state=True, cg_steps=steps, chunk_size=chunk_size)
        o2, (h2, g2) = recurrent_mesa(**x, output_final_state=True, cg_steps=steps)
        assert o1.shape == (2, T, 2, 6) and h1.shape == (2, 2, 8, 8) and g1.shape == (2, 2, 8, 6)
        torch.testing.assert_close(o1, o2, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(h1, h2, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(g1, g2, atol=2e-5, rtol=1e-5)


def test_cg_converges_to_the_exact_solve():
    x = inputs(T=20, K=16, V=16, decay_logit=4.0, lamb_min=0.05)
    exact, _ = recurrent_mesa(**x, cg_steps=None)
    errors = [(chunk_mesa(**x, cg_steps=n, chunk_size=8)[0] - exact).abs().max().item() for n in (1, 3, 9, 40)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-2 and errors[-1] < 1e-4, errors


def test_implicit_gradients_match_the_exact_solve():
    x = inputs(T=21)
    w = torch.randn(2, 21, 2, 6)

    def grads(op, **kw):
        leaves = {n: t.clone().requires_grad_() for n, t in x.items() if n != "initial_state"}
        state = tuple(s.clone().requires_grad_() for s in x["initial_state"])
        o, (h, g) = op(**leaves, initial_state=state, output_final_state=True, **kw)
        ((o * w).sum() + h.sum() + (g ** 2).sum()).backward()
        return {**{n: t.grad for n, t in leaves.items()}, "H0": state[0].grad, "G0": state[1].grad}

    exact = grads(recurrent_mesa, cg_steps=None)
    for name, got in (("chunk", grads(chunk_mesa, cg_steps=30, chunk_size=8)),
                      ("recurrent", grads(recurrent_mesa, cg_steps=30))):
        for n in exact:
            torch.testing.assert_close(got[n], exact[n], atol=5e-5, rtol=1e-4, msg=f"{name}: d{n}")


def test_tolerance_stops_early_without_gradients():
    x = inputs(T=16, init=False)
    exact, _ = recurrent_mesa(**x, cg_steps=None)
    with torch.no_grad():
        loose, _ = chunk_mesa(**x, cg_steps=50, cg_tol=0.1, chunk_size=8)
        full, _ = chunk_mesa(**x, cg_steps=50, chunk_size=8)
    err_loose, err_full = ((o - exact).abs().max().item() for o in (loose, full))
    assert err_full < 1e-5 < err_loose < 0.5


def test_long_sequence_with_strong_decay_is_stable():
    x = inputs(B=1, T=2048, H=1, K=8, V=8, init=False, decay_logit=-3.0, seed=3)  # gamma ~ 0.05
    o, (h, g) = chunk_mesa(**x, output_final_state=True, cg_steps=20)
    ref, (h_ref, g_ref) = recurrent_mesa(**x, output_final_state=True, cg_steps=None)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)


def test_bad_arguments_name_what_was_expected():
    x = inputs()
    with pytest.raises(ValueError, match=r"lamb \[H, K\]: expected shape \[2, 8\]"):
        chunk_mesa(**{**x, "lamb": x["lamb"][0]})
    with pytest.raises(ValueError, match="initial_state: expected a pair"):
        recurrent_mesa(**{**x, "initial_state": x["initial_state"][:1]})
    with pytest.raises(ValueError, match=r"initial_state\[1\] \[B, H, K, V\]: expected shape \[2, 2, 8, 6\]"):
        chunk_mesa(**{**x, "initial_state": (x["initial_state"][0], x["initial_state"][0])})
    with pytest.raises(ValueError, match=r"V == K <= 128"):  # fla's MesaNet kernel needs V == K
        chunk_mesa(**x, backend="fla")
    with pytest.raises(RuntimeError, match="fla"):
        chunk_mesa(**inputs(V=8), backend="fla")
