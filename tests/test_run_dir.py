"""A run directory stands alone: its config holds absolute paths and it keeps its own tokenizer, so
generate / eval / export work from any working directory even once the data directory is gone;
a resumed job continues the same wandb run (real wandb, offline), evaluations log to it too; in a
log file the console has plain lines, no progress-bar frames.

One real training run (one process, 6 steps), stopped at step 3 and resumed."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from llm.data.shards import file_sha256, read_meta
from multiproc import ROOT, clean_env, kill_all, metrics, train, write_config

STOP = 3
WANDB = ["logging.wandb=offline", "logging.progress=true"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    yield tmp_path_factory.mktemp("run_dir")
    kill_all()


@pytest.fixture(scope="module")
def trained(workdir, data_dir):
    """(run dir, its private data dir, the two jobs' console output). The config names the data
    relative to the jobs' working directory (the repository root)."""
    data = shutil.copytree(data_dir, workdir / "data")  # private: test_run_dir_alone moves it away
    config = write_config(workdir / "tiny.yaml", os.path.relpath(data, ROOT))
    run = workdir / "run"
    train(config, run, *WANDB, f"train.stop_at_step={STOP}", nproc=1)
    output = train(config, run, *WANDB, "train.resume=auto", nproc=1)
    return run, data, output


def offline_runs(run) -> list[str]:
    return sorted(glob.glob(str(run / "wandb" / "offline-run-*")))


def cli(*args, cwd) -> subprocess.CompletedProcess:
    """`python -m llm ARGS` from `cwd`, this checkout's llm on the path."""
    env = clean_env(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "llm", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_saved_config_is_absolute_and_the_tokenizer_is_copied(trained):
    run, data, _ = trained
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["path"] == str(data) and saved["train"]["out_dir"] == str(run)
    assert file_sha256(str(run / "tokenizer.model")) == read_meta(str(data))["tokenizer"]["sha256"]


def test_a_log_file_gets_plain_progress_lines(trained):
    _, _, output = trained
    assert "\r" not in output  # no tqdm frames although logging.progress is on
    for step in range(1, 7):
        assert f"step {step}/6 loss " in output


def test_the_resumed_job_continues_the_wandb_run(trained):
    run, _, _ = trained
    run_id = (run / "wandb" / "run_id").read_text()
    jobs = offline_runs(run)
    assert len(jobs) >= 2 and all(job.endswith("-" + run_id) for job in jobs)
    logged = b"".join(open(f, "rb").read() for job in jobs for f in glob.glob(job + "/*.wandb"))
    for key in (b"train/loss", b"train/grad_norm", b"val/loss", b"val/ppl"):
        assert key in logged
    assert {"loss", "grad_norm", "tokens_per_s", "mfu"} <= set(metrics(run)[6])  # the file keeps its keys
    assert "val_loss" in metrics(run)[6]


def test_run_dir_alone_generates_evaluates_and_exports_from_elsewhere(trained, tmp_path):
    run, data, _ = trained
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = data.with_name("data_moved")
    data.rename(moved)  # nothing but the run directory is left
    try:
        gen = cli("generate", run, "--prompt", "The function", "--max-new-tokens", 40, "--seed", 1, cwd=elsewhere)
        assert gen.returncode == 0, gen.stderr
        text = gen.stdout[gen.stdout.index("The function"):]  # after DeepSpeed's own lines
        assert len(text) > len("The function\n")
        assert "past the 32 tokens the model was trained on (data.seq_len)" in gen.stderr
        short = cli("generate", run, "--prompt", "The function", "--max-new-tokens", 3, cwd=elsewhere)
        assert short.returncode == 0 and "warning" not in short.stderr
        ev = cli("eval", run, "--icl", "--icl-k", "0,1", "--icl-episodes", 2, cwd=elsewhere)
        assert ev.returncode == 0, ev.stderr
        assert json.loads((run / "eval" / "icl.json").read_text())["ks"] == [0, 1]
        ex = cli("export", run, "--out", elsewhere / "export", cwd=elsewhere)
        assert ex.returncode == 0, ex.stderr
        assert (elsewhere / "export" / "tokenizer.model").read_bytes() == (run / "tokenizer.model").read_bytes()
    finally:
        moved.rename(data)
    run_id = (run / "wandb" / "run_id").read_text()
    evaluation = offline_runs(run)[-1]
    assert len(offline_runs(run)) == 3 and evaluation.endswith("-" + run_id)  # the eval joined the run
    assert b"eval/icl" in b"".join(open(f, "rb").read() for f in glob.glob(evaluation + "/*.wandb"))
