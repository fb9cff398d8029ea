"""`llm.sweep`: a real grid of two tiny runs (each its own `python -m llm train` process), the table
read back from their metrics, the rerun that skips finished runs and resumes an unfinished one, and
the same grid as a job array on the local two-node Slurm cluster of tests/test_slurm.py."""
import json
import os
import shutil

import pytest
from multiproc import clean_env, metrics, write_config
from test_slurm import slurm  # noqa: F401  (the module-scoped local cluster fixture)

from llm import checkpoint
from llm.config import ConfigError
from llm.sweep import Axis, finished, plan, read_jsonl, sweep

# tiny runs: 3 steps of one 6-sequence forward, checkpoints at steps 2 and 3
STEPS = ("train.max_steps=3", "train.micro_batch_size=6", "train.ckpt_every=2")
GRID = [Axis.parse("optim.lr=1e-3,1e-2")]


@pytest.fixture(scope="module")
def config(tmp_path_factory, data_dir):
    return write_config(tmp_path_factory.mktemp("sweep") / "tiny.yaml", data_dir)


@pytest.fixture(scope="module")
def local(config, tmp_path_factory):
    """The 2-run grid trained here once: (sweep dir, its result)."""
    out = tmp_path_factory.mktemp("local") / "sweep"
    return out, sweep(str(config), GRID, str(out), overrides=STEPS, env=clean_env())


def test_plan_names_seeds_and_overrides(config, tmp_path):
    points = plan(str(config), GRID + [Axis.of("model.mixer", ["softmax", "gated_deltanet"])], 2, str(tmp_path))
    assert [p.name for p in points][:3] == ["lr=1e-3,mixer=softmax,seed=1234", "lr=1e-3,mixer=softmax,seed=1235",
                                            "lr=1e-3,mixer=gated_deltanet,seed=1234"]
    assert len(points) == 8
    assert points[2].overrides == ("train.resume=auto", "optim.lr=1e-3", "model.mixer=gated_deltanet",
                                   "train.seed=1234", f"train.out_dir={tmp_path}/{points[2].name}")


def test_bad_grid_fails_early_naming_the_key(config, tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        plan(str(config), [Axis.parse("optim.lrr=1,2")], 1, str(tmp_path))
    with pytest.raises(ConfigError, match="expected KEY=V1,V2"):
        Axis.parse("optim.lr")
    with pytest.raises(ConfigError, match="optim.lr"):  # a value of the wrong type
        plan(str(config), [Axis.parse("optim.lr=fast")], 1, str(tmp_path))


def _check_table(out, result):
    runs = {r["name"]: r for r in result["runs"]}
    assert sorted(runs) == ["lr=1e-2,seed=1234", "lr=1e-3,seed=1234"]
    for name, row in runs.items():
        records = read_jsonl(out / name / "metrics.jsonl")
        val = [r["val_loss"] for r in records if "val_loss" in r]
        assert row["status"] == "finished" and row["steps"] == 3 and row["tokens"] == 3 * 6 * 32
        assert row["final_val_loss"] == metrics(out / name)[3]["val_loss"] == val[-1]
        assert row["best_val_loss"] == min(val) and len(val) == 3  # step 0, step 2 (a checkpoint: keep_best), step 3 (eval.final)
        assert row["train_s"] > 0
        assert name.startswith(f"lr={row['lr']},")
    cfg_lr = {name: float(next(line for line in (out / name / "config.yaml").read_text().splitlines()
                               if line.strip().startswith("lr:")).split(":")[1]) for name in runs}
    assert cfg_lr == {"lr=1e-2,seed=1234": 1e-2, "lr=1e-3,seed=1234": 1e-3}
    assert {g["lr"]: g["seeds"] for g in result["groups"]} == {"1e-3": 1, "1e-2": 1}
    md = (out / "sweep.md").read_text()
    assert all(f"| {name} | finished | 3 |" in md for name in runs)
    assert json.loads((out / "sweep.json").read_text())["runs"] == result["runs"]
    assert result["markdown"] == md
    assert (out / "sweep.png").stat().st_size > 10_000


def test_grid_trains_every_run_and_tabulates(local):
    out, result = local
    assert result["status"] == {"lr=1e-3,seed=1234": "finished", "lr=1e-2,seed=1234": "finished"}
    _check_table(out, result)
    # different learning rates really trained differently
    losses = [r["final_train_loss"] for r in result["runs"]]
    assert losses[0] != losses[1]


def test_rerun_skips_finished_and_resumes_unfinished(local, config):
    out, _ = local
    done, cut = out / "lr=1e-3,seed=1234", out / "lr=1e-2,seed=1234"
    before = (done / "metrics.jsonl").read_bytes()
    # make the second run unfinished, as a job preempted after step 2 leaves it: the step-3 record
    # and checkpoint gone
    lines = (cut / "metrics.jsonl").read_text().splitlines(keepends=True)
    (cut / "metrics.jsonl").write_text("".join(line for line in lines if json.loads(line)["step"] < 3))
    shutil.rmtree(cut / "checkpoints" / checkpoint.tag_for(3))
    assert not finished(cut) and finished(done)
    result = sweep(str(config), GRID, str(out), overrides=STEPS, env=clean_env())
    assert result["status"] == {"lr=1e-3,seed=1234": "skipped", "lr=1e-2,seed=1234": "finished"}
    assert (done / "metrics.jsonl").read_bytes() == before
    log = (out / "logs" / "lr=1e-2,seed=1234.log").read_text()
    assert f"resumed from {cut}/checkpoints/{checkpoint.tag_for(2)} at step 2" in log
    _check_table(out, result)
    again = sweep(str(config), GRID, str(out), overrides=STEPS, env=clean_env())
    assert set(again["status"].values()) == {"skipped"}


@pytest.mark.slow
def test_slurm_job_array(slurm, config, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    result = sweep(str(config), GRID, str(out), overrides=(*STEPS, "logging.progress=false"), slurm=True,
                   sbatch_args=["--time=10"], env=slurm)
    logs = sorted(os.listdir(out / "logs"))
    assert logs == [f"slurm-{result['job']}_0.out", f"slurm-{result['job']}_1.out"], logs
    task0 = (out / "logs" / logs[0]).read_text()
    assert "1 rank(s), grad accumulation 1, ZeRO-1" in task0 and f"{out}/lr=1e-3,seed=1234" in task0
    _check_table(out, result)
    again = sweep(str(config), GRID, str(out), overrides=STEPS, slurm=True, env=slurm)
    assert again["job"] is None  # everything finished: nothing submitted
