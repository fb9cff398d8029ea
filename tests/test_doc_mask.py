"""Document starts (`doc_start`) in the ops: each op with doc_start equals the op run on every
document separately (from a zero state; a row's given initial state carries into its first
document unless the row opens with a start), in the torch references and through the varlen
layout the fla / flash-attn dispatch builds (checked on CPU with stand-in kernels of that
contract); and the trainer's `doc_starts`. Model-level checks: tests/test_mixer_contract.py."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import llm.ops.attention
import llm.ops.utils
from llm.config import load_config
from llm.data import doc_starts
from llm.ops.attention import attention, sdpa
from llm.ops.delta_rule import chunk_delta_rule, chunk_reference, recurrent_delta_rule
from llm.ops.mesa import chunk_mesa, recurrent_mesa
from llm.ops.pd_ssm import pd_recurrent, pd_scan
from llm.ops.utils import Segments

B, T, H, K, V = 2, 13, 2, 4, 5
C = 4  # chunk size: starts at chunk starts (4, 8), inside a chunk (6), in a row (9, 10), at 0
STARTS = torch.zeros(B, T, dtype=torch.bool)
STARTS[0, [4, 6, 9, 10]] = True
STARTS[1, [0, 8, 12]] = True


def documents(doc_start):
    """[(row, start, end)] of every document of every row."""
    out = []
    for b in range(doc_start.shape[0]):
        cuts = sorted({0, *doc_start[b].nonzero().flatten().tolist(), doc_start.shape[1]})
        out += [(b, s, e) for s, e in zip(cuts, cuts[1:])]
    return out


def by_documents(op, per_token, initial_state, doc_start, **kw):
    """op run on each document alone: (o [B, T, ...], each row's final state or None)."""
    outs, finals = [[] for _ in range(B)], [None] * B
    for b, s, e in documents(doc_start):
        carried = initial_state is not None and s == 0 and not doc_start[b, 0]
        state = None if not carried else (tuple(x[b:b + 1] for x in initial_state)
                                          if isinstance(initial_state, tuple) else initial_state[b:b + 1])
        o, finals[b] = op(*(x[b:b + 1, s:e] for x in per_token), initial_state=state, output_final_state=True, **kw)
        outs[b].append(o)
    return torch.cat([torch.cat(row, 1) for row in outs]), finals


def assert_matches(op, per_token, initial_state, **kw):
    o, final = op(*per_token, initial_state=initial_state, output_final_state=True, doc_start=STARTS, **kw)
    o_docs, finals = by_documents(op, per_token, initial_state, STARTS, **kw)
    torch.testing.assert_close(o, o_docs, atol=1e-5, rtol=1e-5)
    for b in range(B):
        for mine, ref in zip(*(x if isinstance(x, tuple) else (x,) for x in (final, finals[b]))):
            torch.testing.assert_close(mine[b:b + 1], ref, atol=1e-5, rtol=1e-5)


def delta_inputs(gated, seed=0):
    torch.manual_seed(seed)
    q, k = (F.normalize(torch.randn(B, T, H, K), dim=-1) for _ in "qk")
    v = torch.randn(B, T, H, V)
    beta = torch.rand(B, T, H)
    g = F.logsigmoid(torch.randn(B, T, H)) if gated else None
    return q, k, v, beta, g, torch.randn(B, H, K, V)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_delta_rule_restarts_at_document_starts(gated, form):
    q, k, v, beta, g, h0 = delta_inputs(gated)
    op = chunk_delta_rule if form == "chunk" else recurrent_delta_rule
    kw = {"chunk_size": C} if form == "chunk" else {}

    def run(q, k, v, beta, *g, **rest):
        return op(q, k, v, beta=beta, g=g[0] if g else None, **kw, **rest)

    assert_matches(run, (q, k, v, beta) + ((g,) if gated else ()), h0)


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_mesa_restarts_at_document_starts(form):
    torch.manual_seed(0)
    q, k = (F.normalize(torch.randn(B, T, H, K), dim=-1) for _ in "qk")
    v = torch.randn(B, T, H, K)
    g, beta = F.logsigmoid(torch.randn(B, T, H)), torch.rand(B, T, H)
    lamb = torch.rand(H, K) + 0.25
    state = (torch.eye(K).expand(B, H, K, K) * 0.5, torch.randn(B, H, K, K))
    op = (lambda *x, **kw: chunk_mesa(*x[:3], g=x[3], beta=x[4], lamb=lamb, chunk_size=C, **kw)) if form == "chunk" \
        else (lambda *x, **kw: recurrent_mesa(*x[:3], g=x[3], beta=x[4], lamb=lamb, **kw))
    assert_matches(op, (q, k, v, g, beta), state)


@pytest.mark.parametrize("op", [pd_scan, pd_recurrent])
def test_pd_ssm_drops_the_state_at_document_starts(op):
    torch.manual_seed(0)
    N = 5
    perm = torch.randint(0, N, (B, T, H, N))
    d = torch.polar(torch.rand(B, T, H, N), torch.rand(B, T, H, N) * 6)
    u = torch.randn(B, T, H, N, dtype=torch.complex64)
    kw = {"chunk_size": 4} if op is pd_scan else {}  # T = 13: several chunks and the recursion over them
    assert_matches(lambda *x, **rest: op(*x, **kw, **rest), (perm, d, u), torch.randn(B, H, N, dtype=torch.complex64))


def test_attention_masks_each_document():
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, 4, 8) for _ in "qkv")
    o = attention(q, k, v, doc_start=STARTS)
    for b, s, e in documents(STARTS):
        torch.testing.assert_close(o[b:b + 1, s:e], sdpa(q[b:b + 1, s:e], k[b:b + 1, s:e], v[b:b + 1, s:e]))
    # continuing from a cache (S > T): the last queries see the same keys
    torch.testing.assert_close(attention(q[:, 5:], k, v, doc_start=STARTS), o[:, 5:])
    # grouped-query heads
    o_gqa = attention(q, k[:, :, :2], v[:, :, :2], doc_start=STARTS)
    torch.testing.assert_close(o_gqa, attention(q, *(x[:, :, :2].repeat_interleave(2, 2) for x in (k, v)),
                                                doc_start=STARTS))


def test_segments_lay_the_batch_out_as_one_row():
    doc_start = torch.tensor([[False, False, True, False], [True, False, False, True]])
    seg = Segments.of(doc_start)
    assert seg.cu_seqlens.tolist() == [0, 2, 4, 7, 8] and seg.cu_seqlens.dtype == torch.long
    assert seg.first.tolist() == [0, 2] and seg.last.tolist() == [1, 3] and seg.opens.tolist() == [False, True]
    state = torch.arange(1.0, 3.0)[:, None].expand(2, 3)  # row b's state: b + 1
    assert seg.initial_states(state)[:, 0].tolist() == [1, 0, 0, 0]  # row 1 opens with a start
    assert seg.final_states(torch.arange(4.0)).tolist() == [1, 3]
    assert seg.initial_states(None) is None and seg.final_states(None) is None
    assert Segments.flat(torch.zeros(2, 4, 3)).shape == (1, 8, 3)


def varlen(run, q, cu_seqlens, states, output_final_state):
    """A varlen kernel's contract on one row: `run(segment slice, its states) -> (o, finals)`."""
    assert q.shape[0] == 1 and cu_seqlens.dtype == torch.long and cu_seqlens[-1] == q.shape[1]
    n = len(cu_seqlens) - 1
    assert all(s is None or s.shape[0] == n for s in states)
    outs, finals = [], []
    for i, (s, e) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        o, final = run(slice(s, e), [None if x is None else x[i:i + 1] for x in states])
        outs.append(o)
        finals.append(final)
    finals = [torch.cat(x) for x in zip(*finals)] if output_final_state else [None] * len(states)
    return torch.cat(outs, 1), finals


@pytest.fixture
def fast_path(monkeypatch):
    """The fla / flash-attn dispatch taken on CPU, into stand-ins that keep the kernels' contracts."""
    monkeypatch.setattr(llm.ops.utils, "kernel_inputs_ok", lambda *t: True)
    monkeypatch.setattr(llm.ops.utils, "kernel_available", lambda m: True)
    monkeypatch.setattr(llm.ops.attention, "kernel_available", lambda m: True)
    calls = []

    def delta(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, g=None):
        calls.append("delta")

        def run(t, states):
            o, final = chunk_reference(q[:, t], k[:, t], v[:, t], beta[:, t], None if g is None else g[:, t],
                                       scale, states[0], True, C)
            return o, [final]

        o, (final,) = varlen(run, q, cu_seqlens, [initial_state], output_final_state)
        return o, final

    def mesa(q, k, v, g, beta, lamb, h_kk_init, h_kv_init, output_final_state, max_CG_iteration, cu_seqlens):
        calls.append("mesa")

        def run(t, states):
            return chunk_mesa(q[:, t], k[:, t], v[:, t], g=g[:, t], beta=beta[:, t], lamb=lamb, chunk_size=C,
                              cg_steps=max_CG_iteration, initial_state=None if states[0] is None else tuple(states),
                              output_final_state=True, backend="torch")

        o, (h_kk, h_kv) = varlen(run, q, cu_seqlens, [h_kk_init, h_kv_init], output_final_state)
        return o, h_kk, h_kv

    def flash(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        calls.append("flash")
        assert causal and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == int(cu_q.diff().max())
        cuts = cu_q.tolist()
        return torch.cat([sdpa(*(x[None, s:e] for x in (q, k, v)))[0] for s, e in zip(cuts, cuts[1:])])

    modules = {"fla.ops.delta_rule": {"chunk_delta_rule": delta},
               "fla.ops.gated_delta_rule": {"chunk_gated_delta_rule": delta},
               "fla.ops.mesa_net": {"chunk_mesa_net": mesa}, "flash_attn": {"flash_attn_varlen_func": flash}}
    for name, attrs in modules.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))
    return calls


@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_kernel_path_gets_the_documents_as_segments(fast_path, gated):
    q, k, v, beta, g, h0 = delta_inputs(gated)
    o, final = chunk_delta_rule(q, k, v, beta=beta, g=g, initial_state=h0, output_final_state=True,
                                doc_start=STARTS, backend="fla")
    assert fast_path == ["delta"]
    ref_o, ref_final = chunk_delta_rule(q, k, v, beta=beta, g=g, initial_state=h0, output_final_state=True,
                                        doc_start=STARTS, chunk_size=C, backend="torch")
    torch.testing.assert_close(o, ref_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, ref_final, atol=1e-5, rtol=1e-5)


def test_mesa_kernel_path_gets_the_documents_as_segments(fast_path):
    torch.manual_seed(0)
    q, k, v = (F.normalize(torch.randn(B, T, H, K), dim=-1) for _ in "qkv")
    g, beta, lamb = F.logsigmoid(torch.randn(B, T, H)), torch.rand(B, T, H), torch.rand(H, K) + 0.25
    state = (torch.eye(K).expand(B, H, K, K) * 0.5, torch.randn(B, H, K, K))
    kw = dict(g=g, beta=beta, lamb=lamb, initial_state=state, output_final_state=True, doc_start=STARTS)
    o, final = chunk_mesa(q, k, v, backend="fla", **kw)
    assert fast_path == ["mesa"]
    ref_o, ref_final = chunk_mesa(q, k, v, chunk_size=C, backend="torch", **kw)
    torch.testing.assert_close(o, ref_o, atol=1e-5, rtol=1e-5)
    for mine, ref in zip(final, ref_final):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)


def test_attention_kernel_path_gets_the_documents_as_segments(fast_path):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, 4, 8) for _ in "qkv")
    o = attention(q, k, v, doc_start=STARTS, backend="auto")
    assert fast_path == ["flash"]
    torch.testing.assert_close(o, sdpa(q, k, v, doc_start=STARTS))


def test_doc_starts_marks_the_token_after_each_eos():
    tokens = torch.tensor([[5, 2, 7, 2, 2, 9], [2, 4, 4, 4, 4, 2]])
    assert doc_starts(tokens, eos_id=2).tolist() == [[False, False, True, False, True, True],
                                                     [False, True, False, False, False, False]]
    with pytest.raises(ValueError, match="tokens"):
        doc_starts(tokens[0], eos_id=2)


def test_doc_mask_config_key():
    assert load_config("configs/quickstart.yaml").data.doc_mask is False
    assert load_config("configs/quickstart.yaml", ["data.doc_mask=true"]).data.doc_mask is True
