"""The PD-SSM recurrence h_t = P_t diag(d_t) h_{t-1} + u_t with column-one-hot P_t.

P_t is given as `perm` [B, T, H, N] (long): column j of P_t has its 1 in row perm[..., j], so
h_t[i] = sum_{j: perm_t[j] = i} d_t[j] h_{t-1}[j] + u_t[i]. Two columns may share a row (P_t need
not be a permutation); their terms add. A step (perm, d, u) is the affine map h -> P diag(d) h + u,
and two steps compose in O(N):

    (p2, d2, u2) o (p1, d1, u1) = (p2[p1], d2[p1] * d1, P2 diag(d2) u1 + u2)

because column j goes to row p1[j] with weight d1[j], then to p2[p1[j]] with weight d2[p1[j]]: the
composition is again column-one-hot, collisions included. So a log-depth associative scan applies.

Both are torch (no GPU kernel): `pd_recurrent` the sequential reference, `pd_scan` the parallel
form. Arguments after perm, d, u are keyword-only.

`doc_start` (bool [B, T], None: one document per row) drops the state before a token that begins a
document: d_t = 0 there, so h_t = u_t (a caller that restarts from another state adds its image,
P_t diag(d_t) h_start, to u_t).
"""
import torch

from llm.ops.utils import check_doc_start


def pd_matvec(perm, x):
    """P x for the column-one-hot P given by `perm` (same shape as x): out[i] = sum_{perm[j]=i} x[j]."""
    return torch.zeros_like(x).scatter_add(-1, perm, x)


def pd_recurrent(perm, d, u, *, initial_state=None, output_final_state=False, doc_start=None):
    """Sequential reference. perm [B, T, H, N] long, d, u [B, T, H, N], initial_state [B, H, N].
    Returns (h [B, T, H, N], final state [B, H, N] or None)."""
    _check(perm, d, u, initial_state, doc_start)
    d = _drop_at_starts(d, doc_start)
    h = u.new_zeros(u[:, 0].shape) if initial_state is None else initial_state
    out = []
    for t in range(u.shape[1]):
        h = pd_matvec(perm[:, t], d[:, t] * h) + u[:, t]
        out.append(h)
    return torch.stack(out, 1), (h if output_final_state else None)


def pd_scan(perm, d, u, *, initial_state=None, output_final_state=False, chunk_size=64, doc_start=None):
    """The same recurrence by a parallel scan: log-depth within chunks of `chunk_size` steps, then
    the same scan, recursively, over the chunks' composed maps to get each chunk's start state.
    Autograd keeps O(log chunk_size) tensors of size [B, T, H, N]: memory O(T N), not O(T N^2)."""
    _check(perm, d, u, initial_state, doc_start)
    d = _drop_at_starts(d, doc_start)
    if chunk_size < 2:
        raise ValueError(f"pd_scan: chunk_size must be >= 2, got {chunk_size}")
    h = _scan(perm, d, u, initial_state, chunk_size)
    return h, (h[:, -1] if output_final_state else None)


def _scan(perm, d, u, h0, chunk):
    B, T, H, N = u.shape
    if T <= chunk:
        p, dd, b = _prefix(perm, d, u)
        return b if h0 is None else b + pd_matvec(p, dd * h0[:, None])
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:  # identity steps: perm = arange, d = 1, u = 0
        ident = torch.arange(N, device=perm.device).expand(B, pad, H, N)
        perm = torch.cat([perm, ident], 1)
        d = torch.cat([d, d.new_ones(B, pad, H, N)], 1)
        u = torch.cat([u, u.new_zeros(B, pad, H, N)], 1)
    chunks = (t.reshape(B * n, chunk, H, N) for t in (perm, d, u))
    p, dd, b = (t.reshape(B, n, chunk, H, N) for t in _prefix(*chunks))
    ends = _scan(p[:, :, -1], dd[:, :, -1], b[:, :, -1], h0, chunk)  # state after each chunk
    first = u.new_zeros(B, 1, H, N) if h0 is None else h0[:, None]
    starts = torch.cat([first, ends[:, :-1]], 1)[:, :, None]  # [B, n, 1, H, N]
    h = b + pd_matvec(p, dd * starts)
    return h.reshape(B, n * chunk, H, N)[:, :T]


def _prefix(perm, d, u):
    """Inclusive Hillis-Steele scan along dim 1: step t becomes the composition of steps 0..t."""
    T, s = u.shape[1], 1
    while s < T:
        p1, d1, u1 = perm[:, :-s], d[:, :-s], u[:, :-s]  # earlier: steps up to t - s
        p2, d2, u2 = perm[:, s:], d[:, s:], u[:, s:]  # later: steps t - s + 1 .. t
        perm, d, u = (torch.cat([perm[:, :s], p2.gather(-1, p1)], 1),
                      torch.cat([d[:, :s], d2.gather(-1, p1) * d1], 1),
                      torch.cat([u[:, :s], pd_matvec(p2, d2 * u1) + u2], 1))
        s *= 2
    return perm, d, u


def _check(perm, d, u, h0, doc_start):
    if perm.dtype != torch.long:
        raise TypeError(f"pd_ssm: perm must be a long tensor of row indices, got {perm.dtype}")
    if not (perm.ndim == 4 and perm.shape == d.shape == u.shape):
        raise ValueError(f"pd_ssm: expected perm, d, u of one shape [B, T, H, N], got "
                         f"{tuple(perm.shape)}, {tuple(d.shape)}, {tuple(u.shape)}")
    if u.shape[1] == 0:
        raise ValueError("pd_ssm: expected at least one time step")
    if h0 is not None and h0.shape != u[:, 0].shape:
        raise ValueError(f"pd_ssm: initial_state must be [B, H, N] = {tuple(u[:, 0].shape)}, got {tuple(h0.shape)}")
    check_doc_start(doc_start, *u.shape[:2])


def _drop_at_starts(d, doc_start):
    """d with 0 where a document starts: h_t = u_t there."""
    return d if doc_start is None else torch.where(doc_start[..., None, None], 0, d)
