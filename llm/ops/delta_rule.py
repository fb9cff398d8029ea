"""The delta rule (DeltaNet) and its gated form (Gated DeltaNet), in fla's conventions.

State S [B, H, K, V]. Per token t:  S = exp(g_t) S;  S += k_t (beta_t (v_t - S^T k_t))^T;
o_t = scale * S^T q_t.  g=None is DeltaNet; g given ([B, T, H], a log-decay) is Gated DeltaNet.

`recurrent_delta_rule` runs that loop as written (the decoding path); `chunk_delta_rule` is the
chunkwise-parallel form used in training: inside a chunk of C tokens the C sequential rank-one
updates collapse into one unit-triangular solve (the WY / UT transform), so only the state is
carried across chunks. Both check their inputs and dispatch (`backend` as in
`llm.ops.utils.use_kernel`): to fla's kernels, or to the torch references below them
(`recurrent_reference`, `chunk_reference`), which compute in fp32 and return o in q's dtype and
the final state in fp32 (as fla). Arguments after q, k, v are keyword-only.

`doc_start` (bool [B, T], None: one document per row) marks where documents begin: the state is
reset to zero before such a token (the given initial state too, at a start at position 0). The
torch references mask by document inside a chunk and drop the carried state at a start; fla gets
the batch as one row cut at the starts (`llm.ops.utils.Segments`).
"""
import importlib

import torch

from llm.ops.utils import ChunkDecays, Segments, check_doc_start, check_shapes, check_state, to_chunks, use_kernel


def _check(q, k, v, beta, g, initial_state, doc_start):
    B, T, H, K, V = check_shapes(q, k, v, beta=beta, g=g)
    check_state("initial_state [B, H, K, V]", initial_state, (B, H, K, V))
    check_doc_start(doc_start, B, T)


@torch.compiler.disable  # a graph break under train.compile: dynamo cannot trace fla's own checks
def _fla(kind, q, k, v, beta, g, scale, initial_state, output_final_state, doc_start):
    """fla's `{kind}_delta_rule` or `{kind}_gated_delta_rule`; keyword names shared by fla 0.2-0.6
    ([B, T, H, D] is the default layout in all of them; `head_first` is left alone). Document
    starts go in as fla's variable-length batch: one row, `cu_seqlens`, a state per segment."""
    gated = g is not None
    module = importlib.import_module("fla.ops.gated_delta_rule" if gated else "fla.ops.delta_rule")
    kernel = getattr(module, f"{kind}_{'gated_' if gated else ''}delta_rule")
    extra = {"g": g.float()} if gated else {}
    beta = beta.to(q.dtype)
    if doc_start is None:
        return kernel(q=q, k=k, v=v, beta=beta, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, **extra)
    seg = Segments.of(doc_start)
    o, final = kernel(q=seg.flat(q), k=seg.flat(k), v=seg.flat(v), beta=seg.flat(beta), scale=scale,
                      initial_state=seg.initial_states(initial_state), output_final_state=output_final_state,
                      cu_seqlens=seg.cu_seqlens, **{name: seg.flat(t) for name, t in extra.items()})
    return o.view(*v.shape[:3], o.shape[-1]), seg.final_states(final)


def chunk_delta_rule(q, k, v, *, beta, g=None, scale=None, initial_state=None, output_final_state=False,
                     chunk_size=64, doc_start=None, backend="auto"):
    """Chunkwise-parallel delta rule. Returns (o [B, T, H, V], final state [B, H, K, V] or None).

    `chunk_size` shapes the torch path only (fla picks its own); T need not be a multiple of it.
    fla expects L2-normalized keys (as the delta rule itself does for stability)."""
    _check(q, k, v, beta, g, initial_state, doc_start)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if use_kernel(backend, "fla", q, k, v):
        return _fla("chunk", q, k, v, beta, g, scale, initial_state, output_final_state, doc_start)
    return chunk_reference(q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size, doc_start)


def recurrent_delta_rule(q, k, v, *, beta, g=None, scale=None, initial_state=None, output_final_state=False,
                         doc_start=None, backend="auto"):
    """The token-by-token recurrence (decoding). Same returns as `chunk_delta_rule`."""
    _check(q, k, v, beta, g, initial_state, doc_start)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if use_kernel(backend, "fla", q, k, v):
        return _fla("fused_recurrent", q, k, v, beta, g, scale, initial_state, output_final_state, doc_start)
    return recurrent_reference(q, k, v, beta, g, scale, initial_state, output_final_state, doc_start)


# --- torch references (inputs already checked; fp32 inside, o in q's dtype, state in fp32) ---------

def recurrent_reference(q, k, v, beta, g, scale, initial_state, output_final_state, doc_start=None):
    """The recurrence as written, one token at a time; a document start decays the state by 0."""
    B, _, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float()
    decay = (torch.zeros_like(beta) if g is None else g).float().exp()
    if doc_start is not None:
        decay = decay * ~doc_start[..., None]
    outs = []
    # unbind, not x[:, t]: the backward of T slices would write T full-size gradients (O(T^2))
    for q_t, k_t, v_t, b_t, a_t in zip(*(x.float().unbind(1) for x in (q, k, v, beta, decay))):
        S = a_t[..., None, None] * S
        u = b_t[..., None] * (v_t - torch.einsum("bhk,bhkv->bhv", k_t, S))
        S = S + k_t[..., :, None] * u[..., None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q_t, S))
    return torch.stack(outs, 1).to(q.dtype), (S if output_final_state else None)


def chunk_reference(q, k, v, beta, g, scale, initial_state, output_final_state, C, doc_start=None):
    """The chunkwise form: one unit-triangular solve per chunk, the state carried across chunks
    (the `ChunkDecays`: 0 across a document start)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = q.dtype
    q, k, v, beta = (to_chunks(x, C) for x in (q, k, v, beta))
    decays = ChunkDecays(g, q, doc_start)
    gamma = decays.within
    eG = decays.start[..., None]
    # With S0 the chunk-start state, u_i = beta_i (v_i - exp(G_i) S0^T k_i
    #   - sum_{j<i} exp(G_i - G_j) (k_i . k_j) u_j), i.e. (I + A) u = beta (v - exp(G) k S0)
    # with A strictly lower triangular: one solve per chunk gives u = u0 - w S0.
    A = (beta[..., None] * (k @ k.mT) * gamma).tril(-1)
    rhs = torch.cat([beta[..., None] * eG * k, beta[..., None] * v], dim=-1)
    eye = torch.eye(C, device=q.device)
    w, u0 = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True).split([K, V], -1)
    qk = (q @ k.mT) * gamma  # intra-chunk readout weights, diagonal included
    q_dec = q * eG  # reads the decayed chunk-start state
    k_dec = k * decays.end[..., None]  # each key's decay to the chunk end
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    outs = []
    # unbind, not x[:, :, n]: the backward of N slices would write N full-size gradients (O(N^2))
    steps = (u0, w, q_dec, qk, k_dec, decays.whole)
    for u0_n, w_n, q_n, qk_n, k_n, a_n in zip(*(x.unbind(2) for x in steps)):
        u = u0_n - w_n @ S
        outs.append(q_n @ S + qk_n @ u)
        S = a_n[..., None, None] * S + k_n.mT @ u
    o = scale * torch.stack(outs, 2).flatten(2, 3)[:, :, :T]
    return o.transpose(1, 2).to(out_dtype), (S if output_final_state else None)
