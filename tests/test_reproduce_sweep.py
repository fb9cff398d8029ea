"""The sweep-based reproductions (llm/reproduce/): the contract every claim module keeps, and one
module's --quick end to end (weight_decay_rank: 2 tiny runs, uniform vs decoupled decay at wd 1.0)."""
import importlib
import inspect
import json

import pytest

from llm.sweep import read_jsonl

MODULES = ["weight_decay_rank", "bi_induct", "mixer_loss", "instability"]


@pytest.mark.parametrize("name", MODULES)
def test_claim_module_contract(name):
    module = importlib.import_module(f"llm.reproduce.{name}")
    assert isinstance(module.DESCRIPTION, str) and module.DESCRIPTION
    assert {"title", "authors", "arxiv", "claim"} <= set(module.PAPER)
    assert list(inspect.signature(module.run).parameters)[:3] == ["out_dir", "quick", "seeds"]


def test_weight_decay_rank_quick(tmp_path, data_dir):
    from llm.reproduce import weight_decay_rank

    report = weight_decay_rank.run(str(tmp_path), quick=True, seeds=1, overrides=[f"data.path={data_dir}"])
    assert json.loads((tmp_path / "weight_decay_rank.json").read_text()) == json.loads(json.dumps(report))
    assert (tmp_path / "weight_decay_rank.png").stat().st_size > 10_000
    assert report["budget"] == "quick" and report["command"] == "python -m llm reproduce weight_decay_rank --quick --seeds 1"
    rows = {r["decay"]: r for r in report["rows"]}
    assert set(rows) == {"uniform", "decoupled"}
    run_dirs = {d: tmp_path / "weight_decay_rank" / f"decay={d},weight_decay=1.0,seed=1234" for d in rows}
    groups = {d: {g["name"]: g["weight_decay"] for g in json.loads((run_dirs[d] / "param_groups.json").read_text())}
              for d in rows}
    assert groups["uniform"]["qk"] == groups["uniform"]["vo"] == 1.0
    assert groups["decoupled"]["qk"] == groups["decoupled"]["vo"] == 0.0
    for row in rows.values():
        assert list(row["erank"]["qk"]) == ["0", "2", "4", "6"]  # every eval step (train.eval_every=2)
    # same seed, same start; decay on the factors shrinks the products (and their rank) faster
    assert rows["uniform"]["start_erank_qk"] == rows["decoupled"]["start_erank_qk"]
    nuclear = {d: sum(r["nuclear_norm"] for r in read_jsonl(run_dirs[d] / "telemetry.jsonl") if r["step"] == 6)
               for d in rows}
    assert nuclear["uniform"] < nuclear["decoupled"]
    assert report["holds"], report["erank_gap_decoupled_minus_uniform"]
    # a rerun trains nothing: the finished runs are skipped
    before = {d: (run_dirs[d] / "metrics.jsonl").read_bytes() for d in rows}
    again = weight_decay_rank.run(str(tmp_path), quick=True, seeds=1, overrides=[f"data.path={data_dir}"])
    assert again["rows"] == report["rows"]
    assert {d: (run_dirs[d] / "metrics.jsonl").read_bytes() for d in rows} == before
