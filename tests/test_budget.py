import json
from pathlib import Path

import pytest

from llm import bench
from llm.budget import resolve_max_steps
from llm.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QUICK = CONFIGS / "quickstart.yaml"  # softmax, vocab 4096, d_model 256, 4 layers, 4 heads, G = 16


def _train_flops_per_token(seq_len):
    """By hand from llm/flops.py for the quickstart model: 3 x forward, forward = head + 4 layers x
    (softmax projections q,k,v,o + scores and weighted sum over (T+1)/2 keys + SwiGLU with hidden 704)."""
    head = 2 * 256 * 4096
    attention = 2 * 256 * (2 * 256 + 2 * 256) + 2 * 2 * 4 * 64 * (seq_len + 1) / 2
    mlp = 2 * 3 * 256 * 704
    return 3 * (head + 4 * (attention + mlp))


def test_no_budget_keeps_max_steps():
    assert resolve_max_steps(load_config(QUICK)) == (300, {})


def test_token_budget():
    steps, info = resolve_max_steps(load_config(QUICK, ["train.budget.tokens=1e6"]))
    assert steps == 1_000_000 // (16 * 128) == 488
    assert info["kind"] == "tokens" and info["tokens"] == 488 * 2048 and info["max_steps"] == 488


@pytest.mark.parametrize("seq_len", [128, 1024])
def test_flops_budget_counts_attention_at_its_seq_len(seq_len):
    f = _train_flops_per_token(seq_len)
    assert f == {128: 26_351_616, 1024: 31_856_640}[seq_len]
    cfg = load_config(QUICK, ["train.budget.flops=1e15", f"data.seq_len={seq_len}"])
    steps, info = resolve_max_steps(cfg)
    assert steps == 10 ** 15 // (16 * seq_len * f) == {128: 18529, 1024: 1915}[seq_len]
    assert info["flops_per_token"] == f and info["tokens"] == steps * 16 * seq_len
    assert info["flops"] == steps * 16 * seq_len * f <= 1e15 < (steps + 1) * 16 * seq_len * f
    # A budget of exactly k steps buys k steps.
    exact = load_config(QUICK, [f"train.budget.flops={296 * 16 * seq_len * f}", f"data.seq_len={seq_len}"])
    assert resolve_max_steps(exact)[0] == 296


def test_flops_budget_softmax_vs_linear_mixer():
    # Softmax pays 3 x 4 layers x 2 x 2 x 4 heads x 64 x (T + 1) / 2 FLOPs per token for attention,
    # so going from T=128 to 1024 costs it 3 * 4 * 512 * 896 more per token; DeltaNet's chunked
    # form costs the same per token once T >= its chunk size (64): its steps scale as 1 / T.
    from llm.flops import train_flops_per_token

    def budget(mixer, seq_len):
        cfg = load_config(QUICK, ["train.budget.flops=1e15", f"model.mixer={mixer}", f"data.seq_len={seq_len}"])
        return cfg, resolve_max_steps(cfg)

    (sm_short, (s1, _)), (sm_long, (s2, _)) = budget("softmax", 128), budget("softmax", 1024)
    (dn_short, (d1, i1)), (_, (d2, i2)) = budget("deltanet", 128), budget("deltanet", 1024)
    assert train_flops_per_token(sm_long.model, 1024) - train_flops_per_token(sm_short.model, 128) == 3 * 4 * 512 * 896
    assert i1["flops_per_token"] == i2["flops_per_token"] == train_flops_per_token(dn_short.model, 128)
    assert (d1, d2) == (10 ** 15 // (2048 * i1["flops_per_token"]), 10 ** 15 // (16384 * i1["flops_per_token"]))
    assert (s1, s2) == (18529, 1915)
    assert d1 // 8 - 1 <= d2 <= d1 // 8 and s2 < s1 // 8  # softmax loses steps to attention at long T


def test_accelerator_hours_through_a_bench_record(tmp_path):
    results = tmp_path / "results.json"
    tiny = ["model.d_model=64", "model.n_layers=1", "data.seq_len=32", "train.micro_batch_size=2",
            "train.global_batch_size=4"]
    for _ in range(2):  # records append
        assert bench.main([str(QUICK), *tiny, "--steps", "2", "--device-name", "testbox", "--out", str(results)]) == 0
    records = json.loads(results.read_text())
    assert len(records) == 2 and records[-1]["tokens_per_s"] > 0 and records[-1]["model"]["layers"] == ["softmax"]
    cfg = load_config(QUICK, tiny + ["train.budget.accelerator_hours=0.01", "train.budget.reference_device=testbox"])
    steps, info = resolve_max_steps(cfg, results)
    assert steps == int(0.01 * 3600 * records[-1]["tokens_per_s"] // (4 * 32))
    assert info["tokens_per_s"] == records[-1]["tokens_per_s"] and info["reference_device"] == "testbox"
    other = load_config(QUICK, tiny + ["model.n_layers=2", "train.budget.accelerator_hours=1",
                                       "train.budget.reference_device=testbox"])
    with pytest.raises(ConfigError, match=r"no throughput for device 'testbox'.*python -m llm bench"):
        resolve_max_steps(other, results)  # another model: its throughput was never measured
    with pytest.raises(ConfigError, match="needs train.budget.reference_device"):
        resolve_max_steps(load_config(QUICK, tiny + ["train.budget.accelerator_hours=1"]), results)


def test_budget_errors():
    both = r"at most one of .*; got train.budget.tokens=1e\+06, train.budget.flops=1e\+15"
    with pytest.raises(ConfigError, match=both):
        resolve_max_steps(load_config(QUICK, ["train.budget.tokens=1e6", "train.budget.flops=1e15"]))
    with pytest.raises(ConfigError, match="less than one step"):
        resolve_max_steps(load_config(QUICK, ["train.budget.tokens=100"]))
    with pytest.raises(ConfigError, match="train.stop_at_step=200 is beyond the 48 steps"):
        resolve_max_steps(load_config(QUICK, ["train.budget.tokens=1e5", "train.stop_at_step=200"]))


def test_bi_induct_experiments_are_compute_matched():
    runs = {m: load_config(CONFIGS / "exp" / "bi_induct" / f"{m}.yaml")
            for m in ("natural", "forward", "backward", "balanced")}
    assert {m: c.data.bi_induct.mode for m, c in runs.items()} == {
        "natural": "none", "forward": "forward", "backward": "backward", "balanced": "balanced"}
    budgets = [resolve_max_steps(c) for c in runs.values()]
    assert all(b == budgets[0] for b in budgets) and budgets[0][1]["kind"] == "flops"
    for c in runs.values():
        assert c.model == runs["natural"].model and c.train.seed == runs["natural"].train.seed
        bi = c.data.bi_induct
        assert (bi.rate, bi.anneal, list(bi.span), bi.seed, bi.apply) == (0.5, "linear", [20, 20], 0, "online")
    assert len({c.train.out_dir for c in runs.values()}) == 4
