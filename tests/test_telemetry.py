"""Low-rank telemetry: effective rank, per-head attention products, the telemetry.jsonl records."""
import json

import pytest
import torch

from llm.config import build_config
from llm.model import build_model
from llm.telemetry import (TelemetryLog, attention_ranks, effective_rank, head_factors, layer_summary,
                           product_singular_values, projections)
from test_optim import MODELS, TINY, deepspeed_engine, in_fresh_process

RECORD = {"step": int, "layer": int, "head": int, "mixer": str, "product": str, "effective_rank": float,
          "nuclear_norm": float}


def test_effective_rank_of_known_matrices():
    n = 6
    assert effective_rank(torch.linalg.svdvals(torch.eye(n))) == pytest.approx(n)
    assert effective_rank(product_singular_values(torch.eye(n), torch.eye(n))) == pytest.approx(n)
    rank_one = product_singular_values(torch.randn(n, 1), torch.randn(1, n))
    assert effective_rank(rank_one) == pytest.approx(1.0)
    assert effective_rank(torch.linalg.svdvals(torch.randn(n, 1) @ torch.randn(1, n))) == pytest.approx(1.0, rel=1e-4)
    assert effective_rank(torch.tensor([3.0, 3.0, 0.0])) == pytest.approx(2.0)
    assert effective_rank(torch.zeros(4)) == 0.0


@pytest.mark.parametrize("m, r, n", [(32, 8, 32), (5, 8, 7), (20, 3, 9)])
def test_product_singular_values_match_the_full_svd(m, r, n):
    left, right = torch.randn(m, r), torch.randn(r, n)
    ours = product_singular_values(left, right)
    full = torch.linalg.svdvals(left @ right)
    k = min(m, n, r)
    torch.testing.assert_close(ours[:k], full[:k], rtol=1e-4, atol=1e-5)
    assert torch.all(full[k:] < 1e-4) and torch.all(ours[k:] < 1e-4)


def test_head_products_are_each_heads_score_and_output_maps_with_gqa():
    torch.manual_seed(0)
    mixer = build_model({**TINY, "n_kv_heads": 2}).blocks[0].mixer
    x = torch.randn(1, 5, TINY["d_model"])
    with torch.no_grad():
        q, k, v = mixer.project(x)  # before RoPE; no QK-norm here
        seen = set()
        for product, h, left, right in head_factors(mixer, projections(mixer)):
            seen.add((product, h))
            if product == "qk":  # x_i^T W_Q_h^T W_K_h x_j is query head h against key head h // 2
                torch.testing.assert_close(x[0] @ left @ right @ x[0].T, q[0, :, h] @ k[0, :, h // 2].T)
            else:  # W_O_h W_V_h x is what o_proj writes when head h outputs its value v_{h // 2}
                heads = torch.zeros_like(q)
                heads[:, :, h] = v[:, :, h // 2]
                torch.testing.assert_close(x @ (left @ right).T, mixer.out(heads))
    assert seen == {(p, h) for p in ("qk", "vo") for h in range(TINY["n_heads"])}


@pytest.mark.parametrize("name", list(MODELS))
def test_records_for_every_mixer(name):
    model = build_model(MODELS[name])
    records = attention_ranks(model, step=7)
    for r in records:
        assert {k: type(v) for k, v in json.loads(json.dumps(r)).items()} == RECORD
        assert r["step"] == 7 and r["product"] in ("qk", "vo")
        assert r["mixer"] == model.blocks[r["layer"]].mixer.name
    for layer, block in enumerate(model.blocks):
        mine = [r for r in records if r["layer"] == layer]
        for product, h, left, right in head_factors(block.mixer, projections(block.mixer)):
            (r,) = [r for r in mine if (r["product"], r["head"]) == (product, h)]
            s = torch.linalg.svdvals(left @ right)
            assert r["nuclear_norm"] == pytest.approx(s.sum().item(), rel=1e-4)
            assert 1.0 <= r["effective_rank"] <= left.shape[1]  # rank <= head dim
    if name == "softmax":
        assert len(records) == TINY["n_layers"] * TINY["n_heads"] * 2


def test_telemetry_log_file_summary_and_resume(tmp_path):
    model = build_model(TINY)
    log = TelemetryLog(str(tmp_path), start_step=0, active=True)
    summary = log.write(model, 5)
    log.write(model, 10)
    lines = [json.loads(line) for line in (tmp_path / "telemetry.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * TINY["n_layers"] * TINY["n_heads"] * 2
    assert all(set(r) == set(RECORD) for r in lines)
    expected = {f"erank_{p}/layer{i}" for p in ("qk", "vo") for i in range(TINY["n_layers"])}
    assert set(summary) == expected
    qk0 = [r["effective_rank"] for r in lines if (r["step"], r["product"], r["layer"]) == (5, "qk", 0)]
    assert summary["erank_qk/layer0"] == pytest.approx(sum(qk0) / len(qk0))
    assert layer_summary([]) == {}

    TelemetryLog(str(tmp_path), start_step=5, active=True)  # resumed from the step-5 checkpoint
    assert TelemetryLog(str(tmp_path), start_step=5, active=False).write(model, 15) == {}  # not rank 0
    steps = {json.loads(line)["step"] for line in (tmp_path / "telemetry.jsonl").read_text().splitlines()}
    assert steps == {5}
    TelemetryLog(str(tmp_path), start_step=0, active=True)  # a fresh run starts over
    assert (tmp_path / "telemetry.jsonl").read_text() == ""


def zero3_records_match_plain_model():
    cfg = build_config({"model": {**TINY, "n_kv_heads": 2},
                        "train": {"global_batch_size": 1, "micro_batch_size": 1, "zero_stage": 3}})
    model = build_model(cfg.model)
    plain = attention_ranks(model, 3)
    deepspeed_engine(cfg, model)
    assert model.blocks[0].mixer.q_proj.weight.numel() == 0  # partitioned away
    sharded = attention_ranks(model, 3)
    assert len(sharded) == len(plain) > 0
    numbers = ("effective_rank", "nuclear_norm")
    for a, b in zip(sharded, plain):
        assert {k: a[k] for k in a if k not in numbers} == {k: b[k] for k in b if k not in numbers}
        assert [a[k] for k in numbers] == pytest.approx([b[k] for k in numbers], rel=1e-5)


@pytest.mark.slow
def test_zero3_partitioned_weights_are_gathered():
    in_fresh_process(zero3_records_match_plain_model)
