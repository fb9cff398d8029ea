"""`python -m llm reproduce`: every claim module runs its quick budget and writes sane results."""
import json
import os

import pytest

from llm.reproduce import claims, main

MINE = ("pdssm_state_tracking", "momentum_induction", "mesa_cg", "mqar")


def _run_quick(tmp_path, name):
    results = main([name, "--quick", "--seeds", "1", "--out", str(tmp_path)])
    with open(os.path.join(tmp_path, f"{name}.json")) as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(results))
    with open(os.path.join(tmp_path, f"{name}.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert written["quick"] is True and written["seeds"] == 1 and written["paper"]
    return written


def test_every_claim_module_has_the_interface(capsys):
    found = claims()
    assert set(MINE) <= set(found)
    for module in found.values():
        assert isinstance(module.DESCRIPTION, str) and isinstance(module.PAPER, dict) and callable(module.run)
    main(["--list"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in found)


def test_unknown_claim_is_an_error_naming_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["no_such_claim"])
    assert "mesa_cg" in capsys.readouterr().err


def _accuracy_in_unit_interval(stat):
    assert 0 <= stat["mean"] <= 1 and stat["std"] >= 0 and len(stat["values"]) == 1


def test_pdssm_state_tracking(tmp_path):
    r = _run_quick(tmp_path, "pdssm_state_tracking")
    assert {(row["task"], row["model"]) for row in r["rows"]} == {
        (t, m) for t in r["budget"]["tasks"] for m in r["budget"]["models"]}
    for row in r["rows"]:
        assert set(row["accuracy"]) == {str(L) for L in r["budget"]["test_lengths"]}
        for stat in row["accuracy"].values():
            _accuracy_in_unit_interval(stat)


def test_momentum_induction(tmp_path):
    r = _run_quick(tmp_path, "momentum_induction")
    names = [row["model"] for row in r["rows"]]
    assert names[:2] == ["softmax 1 layer", "softmax 2 layers"] and any(n.startswith("momentum") for n in names)
    for row in r["rows"]:
        _accuracy_in_unit_interval(row["copy_acc"])


def test_mesa_cg_error_falls_with_cg_steps(tmp_path):
    r = _run_quick(tmp_path, "mesa_cg")
    for row in r["rows"]:
        errors = [row["rel_error"][str(n)]["mean"] for n in r["cg_steps"]]
        assert errors[0] > 1e-2 and errors[-1] < 1e-5, errors  # a real gap to close, then closed
        assert all(b < a or b < 1e-5 for a, b in zip(errors, errors[1:])), errors  # down to float32's floor
        assert row["kappa_max"] >= 1


def test_mqar_budget_changes(tmp_path):
    r = main(["mqar", "--quick", "--seeds", "1", "--out", str(tmp_path), "--budget", "models=[softmax]",
              "--budget", "widths=[16]", "--budget", "steps=3", "--budget", "lr=1e-2"])  # YAML 1.1 reads 1e-2 as text
    assert [(row["model"], row["d_model"]) for row in r["rows"]] == [("softmax", 16)]
    assert (r["budget"]["steps"], r["budget"]["lr"]) == (3, 0.01)
    with pytest.raises(ValueError, match="unknown models"):
        main(["mqar", "--quick", "--out", str(tmp_path), "--budget", "models=[nosuch]"])


def test_mqar(tmp_path):
    r = _run_quick(tmp_path, "mqar")
    assert {row["d_model"] for row in r["rows"]} == set(r["budget"]["widths"])
    assert "softmax" in {row["model"] for row in r["rows"]}
    for row in r["rows"]:
        _accuracy_in_unit_interval(row["accuracy"])


def test_budget_changes_reach_the_claim_and_are_checked(tmp_path, capsys):
    r = main(["pdssm_state_tracking", "--quick", "--seeds", "2", "--out", str(tmp_path), "--budget", "tasks=[parity]",
              "--budget", "models=[pdssm_diag]", "--budget", "first_seed=3", "--budget", "steps=5"])
    assert [(row["task"], row["model"], row["seeds"], row["steps"]) for row in r["rows"]] == [
        ("parity", "pdssm_diag", [3, 4], [5, 5])]
    timed = main(["pdssm_state_tracking", "--quick", "--seeds", "1", "--out", str(tmp_path), "--budget",
                  "tasks=[parity]", "--budget", "models=[pdssm_diag]", "--budget", "train_seconds=0.5"])
    assert timed["rows"][0]["steps"][0] >= 1  # as many as fit in half a second, timed on this machine
    for bad, says in ((["mesa_cg", "--budget", "steps=5"], "mesa_cg takes no budget changes"),
                      (["pdssm_state_tracking", "--budget", "steps"], "expected KEY=VALUE")):
        with pytest.raises(SystemExit):
            main(bad)
        assert says in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown keys"):
        main(["pdssm_state_tracking", "--quick", "--out", str(tmp_path), "--budget", "step=5"])
    with pytest.raises(ValueError, match=r"steps: expected int \(like 600\), got 'many'"):
        main(["pdssm_state_tracking", "--out", str(tmp_path), "--budget", "steps=many"])
    with pytest.raises(ValueError, match="magnitude_init"):  # pdssm_args reach every PD-SSM variant's mixer
        main(["pdssm_state_tracking", "--quick", "--out", str(tmp_path), "--budget", "pdssm_args={magnitude_init: 2}"])


def test_cells_run_in_parallel_and_pool_their_seeds(tmp_path):
    """benchmarks/reproduce_cells.py: one process per cell, the seeds of a (task, model) pooled."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tiny = ["steps=3", "batch=4", "d_model=16", "layers=1", "state_size=4", "test_lengths=[8]", "eval_batch=8"]
    cmd = [sys.executable, "benchmarks/reproduce_cells.py", "--out", str(tmp_path), "--deadline-s", "300",
           *(arg for item in tiny for arg in ("--budget", item)), "parity:pdssm_diag", "parity:pdssm_diag:2",
           "cycle_nav:pdssm"]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr
    assert "3 of 3 cells finished" in done.stdout
    with open(tmp_path / "pdssm_state_tracking.json") as f:
        r = json.load(f)
    assert [(row["task"], row["model"], row["seeds"]) for row in r["rows"]] == [
        ("parity", "pdssm_diag", [0, 2]), ("cycle_nav", "pdssm", [0])]
    assert len(r["rows"][0]["accuracy"]["8"]["values"]) == 2 and r["seeds"] == 2 and r["unfinished"] == []
    assert r["budget"]["tasks"] == ["parity", "cycle_nav"] and (tmp_path / "pdssm_state_tracking.png").exists()
