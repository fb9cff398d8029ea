"""MesaNet's mixer: at every step, the optimal linear regression of values on keys, solved by CG.

State (H [B, H, K, K], G [B, H, K, V]). Per token t:
    H_t = exp(g_t) H_{t-1} + beta_t k_t k_t^T,   G_t = exp(g_t) G_{t-1} + beta_t k_t v_t^T,
    o_t = G_t^T x_t   with   (H_t + diag(lamb)) x_t = q_t,   lamb [H, K] > 0.
The solve is conjugate gradient (CG) from x = 0 with a fixed number of steps (`cg_steps`), or,
where `cg_tol` is given, until every residual is below cg_tol * |q_t| (meant for evaluation).

`chunk_mesa` never forms H_t: within a chunk, H_t x = exp(G_t) H_start x + sum_{j<=t in chunk}
exp(G_t - G_j) beta_j k_j (k_j . x), so one batched CG serves all positions, with only the
chunk-start states [B, H, T / C, K, K] stored. `recurrent_mesa` steps token by token (decoding);
with `cg_steps=None` it solves exactly with torch.linalg.solve (the reference for tests).
`chunk_mesa` checks its inputs and dispatches to fla's kernel or to the torch `chunk_reference`;
`recurrent_mesa` is torch only. Arguments after q, k, v are keyword-only.

`doc_start` (bool [B, T], None: one document per row) resets both states to zero before a token
that begins a document (as `llm.ops.delta_rule` does; fla gets cu_seqlens).

Gradients of the CG solve are implicit (`SPDSolve`): one more CG solve with the same symmetric
matrix, as fla does, rather than autograd through the unrolled iterations.
"""
import torch
from torch.autograd.function import once_differentiable

from llm.ops.utils import ChunkDecays, Segments, check_doc_start, check_shapes, check_state, to_chunks, use_kernel


def conjugate_gradient(matvec, b, steps, tol=None):
    """Solve A x = b for symmetric positive-definite A, batched over b [..., K], from x = 0.

    matvec(p) = A p on [..., K]. Runs `steps` iterations, or fewer once every residual satisfies
    |r| <= tol * |b| (tol checks cost a host sync per step)."""
    x = torch.zeros_like(b)
    r = b
    p = r
    rr = (r * r).sum(-1, keepdim=True)
    stop = None if tol is None else tol ** 2 * rr
    for _ in range(steps):
        if stop is not None and bool((rr <= stop).all()):
            break
        Ap = matvec(p)
        alpha = _ratio(rr, (p * Ap).sum(-1, keepdim=True))
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = (r * r).sum(-1, keepdim=True)
        p = r + _ratio(rr_new, rr) * p
        rr = rr_new
    return x


def _ratio(a, b):
    """a / b, and 0 where b == 0: a system that has converged exactly (or has b = 0, as padding
    does) stops moving instead of turning into NaN."""
    return torch.where(b > 0, a / b.clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(a))


class SPDSolve(torch.autograd.Function):
    """x = A(params)^{-1} b by CG, A symmetric positive-definite given as matvec(x, *params).

    Backward by the implicit function theorem: with y = A^{-1} dL/dx (one more CG solve, same
    matrix since A = A^T), dL/db = y and dL/dparams = -y^T (dA/dparams) x, which autograd gives
    through a single matvec. Memory does not grow with the number of CG steps, and the gradient
    is that of the solution rather than of a particular truncated iteration."""

    @staticmethod
    def forward(ctx, matvec, steps, tol, b, *params):
        ctx.matvec, ctx.steps = matvec, steps
        x = conjugate_gradient(lambda p: matvec(p, *params), b, steps, tol)
        ctx.save_for_backward(x, *params)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, dx):
        x, *params = ctx.saved_tensors
        y = conjugate_gradient(lambda p: ctx.matvec(p, *params), dx, ctx.steps)
        needs = ctx.needs_input_grad[4:]
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(n) for p, n in zip(params, needs)]
            wanted = [p for p in leaves if p.requires_grad]
            grads = iter(torch.autograd.grad(-(y * ctx.matvec(x, *leaves)).sum(), wanted) if wanted else ())
        return (None, None, None, y, *(next(grads) if n else None for n in needs))


def _check(q, k, v, g, beta, lamb, initial_state, doc_start):
    B, T, H, K, V = check_shapes(q, k, v, g=g, beta=beta)
    check_doc_start(doc_start, B, T)
    check_state("lamb [H, K]", lamb, (H, K))
    if initial_state is not None:
        if len(initial_state) != 2:
            raise ValueError("initial_state: expected a pair (H [B, H, K, K], G [B, H, K, V])")
        check_state("initial_state[0] [B, H, K, K]", initial_state[0], (B, H, K, K))
        check_state("initial_state[1] [B, H, K, V]", initial_state[1], (B, H, K, V))
    return B, H, K, V


def _zero_state(q, B, H, K, V):
    return q.new_zeros(B, H, K, K, dtype=torch.float32), q.new_zeros(B, H, K, V, dtype=torch.float32)


def chunk_mesa(q, k, v, *, g, beta, lamb, initial_state=None, output_final_state=False, cg_steps=30,
               chunk_size=64, cg_tol=None, doc_start=None, backend="auto"):
    """Chunkwise Mesa. Returns (o [B, T, H, V], (H, G) final state or None).

    On CUDA half-precision inputs with fla installed and V == K <= 128 this calls fla's
    chunk_mesa_net (fixed `cg_steps`; it has no tolerance, so `cg_tol` only applies to the
    torch path). fla expects L2-normalized keys."""
    B, H, K, V = _check(q, k, v, g, beta, lamb, initial_state, doc_start)
    if cg_steps < 1 or chunk_size < 1:
        raise ValueError(f"cg_steps and chunk_size: expected positive integers, got {cg_steps}, {chunk_size}")
    fits = V == K <= 128
    if backend == "fla" and not fits:
        raise ValueError(f"fla's chunk_mesa_net needs V == K <= 128, got K={K}, V={V}")
    if fits and use_kernel(backend, "fla", q, k, v):
        return _fla(q, k, v, g, beta, lamb, initial_state, output_final_state, cg_steps, doc_start)
    state = _zero_state(q, B, H, K, V) if initial_state is None else tuple(s.float() for s in initial_state)
    return chunk_reference(q, k, v, g, beta, lamb, state, output_final_state, cg_steps, chunk_size, cg_tol, doc_start)


@torch.compiler.disable  # a graph break under train.compile, as the delta rule's
def _fla(q, k, v, g, beta, lamb, initial_state, output_final_state, cg_steps, doc_start):
    """fla's chunk_mesa_net; document starts as its variable-length batch (one row, cu_seqlens)."""
    from fla.ops.mesa_net import chunk_mesa_net
    h_kk, h_kv = (None, None) if initial_state is None else (s.float() for s in initial_state)
    g, beta = g.float(), beta.float()
    if doc_start is None:
        o, h_kk, h_kv = chunk_mesa_net(q=q, k=k, v=v, g=g, beta=beta, lamb=lamb.float(), h_kk_init=h_kk,
                                       h_kv_init=h_kv, output_final_state=output_final_state,
                                       max_CG_iteration=cg_steps)
        return o, ((h_kk, h_kv) if output_final_state else None)
    seg = Segments.of(doc_start)
    o, h_kk, h_kv = chunk_mesa_net(*(seg.flat(t) for t in (q, k, v, g, beta)), lamb=lamb.float(),
                                   h_kk_init=seg.initial_states(h_kk), h_kv_init=seg.initial_states(h_kv),
                                   output_final_state=output_final_state, max_CG_iteration=cg_steps,
                                   cu_seqlens=seg.cu_seqlens)
    final = (seg.final_states(h_kk), seg.final_states(h_kv)) if output_final_state else None
    return o.view(v.shape), final


def chunk_reference(q, k, v, g, beta, lamb, state, output_final_state, cg_steps, C, cg_tol, doc_start=None):
    """The torch chunk form from the fp32 state (H, G): chunk-start states, then one batched CG
    (the `ChunkDecays`: 0 across a document start)."""
    T, out_dtype = q.shape[1], q.dtype
    q, k, v, beta = (to_chunks(x, C) for x in (q, k, v, beta))
    decays = ChunkDecays(g, q, doc_start)
    gamma = decays.within
    decay = gamma * beta[..., None, :]  # weight of key j in H_i within the chunk: exp(G_i - G_j) beta_j
    k_end = k * (decays.end * beta)[..., None]  # weight of each key in the chunk-end state
    h_kk, h_kv = state
    starts_kk, starts_kv = [], []
    # unbind, not x[:, :, n]: the backward of N slices would write N full-size gradients (O(N^2))
    for a_n, ke_n, k_n, v_n in zip(*(x.unbind(2) for x in (decays.whole, k_end, k, v))):
        starts_kk.append(h_kk)
        starts_kv.append(h_kv)
        h_kk = a_n[..., None, None] * h_kk + ke_n.mT @ k_n
        h_kv = a_n[..., None, None] * h_kv + ke_n.mT @ v_n
    start_kk, start_kv = torch.stack(starts_kk, 2), torch.stack(starts_kv, 2)
    eG = decays.start[..., None]
    x = SPDSolve.apply(_chunk_matvec, cg_steps, cg_tol, q, start_kk, eG, k, decay, lamb.float()[:, None, None])
    o = eG * (x @ start_kv) + ((x @ k.mT) * decay) @ v
    o = o.flatten(2, 3)[:, :, :T].transpose(1, 2).to(out_dtype)
    return o, ((h_kk, h_kv) if output_final_state else None)


def _chunk_matvec(x, start_kk, eG, k, decay, lamb):
    """(H_t + diag(lamb)) x_t at every position of every chunk, x [B, H, N, C, K]: the decayed
    chunk-start state plus the chunk's own keys. Written as H x (not x H, equal for symmetric H)
    so that the implicit gradient of a given, possibly asymmetric, initial H matches
    torch.linalg.solve's."""
    return eG * (x @ start_kk.mT) + ((x @ k.mT) * decay) @ k + lamb * x


def _step_matvec(x, h_kk, lamb):
    return (h_kk @ x[..., None]).squeeze(-1) + lamb * x


def recurrent_mesa(q, k, v, *, g, beta, lamb, initial_state=None, output_final_state=False, cg_steps=30,
                   cg_tol=None, doc_start=None):
    """Token-by-token Mesa (torch only). cg_steps=None solves each step exactly with
    torch.linalg.solve and differentiates through it: the reference. Returns as `chunk_mesa`."""
    B, H, K, V = _check(q, k, v, g, beta, lamb, initial_state, doc_start)
    if cg_steps is not None and cg_steps < 1:
        raise ValueError(f"cg_steps: expected a positive integer or None (exact solve), got {cg_steps}")
    lf = lamb.float()
    h_kk, h_kv = _zero_state(q, B, H, K, V) if initial_state is None else (s.float() for s in initial_state)
    outs = []
    kept = [None] * q.shape[1] if doc_start is None else (~doc_start).float().unbind(1)  # 0: a document starts
    # unbind, not x[:, t]: the backward of T slices would write T full-size gradients (O(T^2))
    for q_t, k_t, v_t, g_t, b_t, kept_t in zip(*(x.float().unbind(1) for x in (q, k, v, g, beta)), kept):
        a = g_t.exp()[..., None, None]
        if kept_t is not None:
            a = a * kept_t[:, None, None, None]
        kb = (b_t[..., None] * k_t)[..., :, None]
        h_kk = a * h_kk + kb * k_t[..., None, :]
        h_kv = a * h_kv + kb * v_t[..., None, :]
        if cg_steps is None:
            x = torch.linalg.solve(h_kk + torch.diag_embed(lf), q_t)
        else:
            x = SPDSolve.apply(_step_matvec, cg_steps, cg_tol, q_t, h_kk, lf)
        outs.append((x[..., None, :] @ h_kv).squeeze(-2))
    return torch.stack(outs, 1).to(q.dtype), ((h_kk, h_kv) if output_final_state else None)
