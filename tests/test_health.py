"""A run that goes wrong, with real DeepSpeed runs of a tiny model (one rank, a few seconds each):
divergence keeps the best checkpoint; a non-finite step stops the run without checkpointing it
(after train.skip_nonfinite skipped ones); a resume applies the config's optimizer settings and
refuses a max_steps before its step; a second trainer on a run directory is refused by its lock;
a first Ctrl-C checkpoints and exits, a second aborts. Plus the pure parts: spike detection,
strict JSON, pruning, the lock's stale / foreign holders."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from llm import checkpoint
from llm.health import SpikeDetector
from llm.logs import JsonlLog
from llm.runlock import LOCK, RunDirLocked, RunLock
from multiproc import copy_run, kill_all, launch, logged_steps, metrics, train, wait_for, write_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    yield tmp_path_factory.mktemp("health")
    kill_all()


@pytest.fixture(scope="module")
def config(workdir, data_dir):
    return write_config(workdir / "tiny.yaml", data_dir)


def failed(config, run_dir, *overrides, log=None) -> str:
    """Run one rank; it must exit non-zero. Its output."""
    job = launch(config, run_dir, *overrides, nproc=1, log=log)
    code = job.wait()
    assert code != 0, job.output()[-3000:]
    return job.output()


def strict_records(run_dir):
    """metrics.jsonl, parsed as strict JSON (NaN / Infinity refused)."""
    def refuse(constant):
        raise AssertionError(f"metrics.jsonl holds a bare {constant}")
    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- 1. divergence and non-finite steps --------------------------------------------------------

@pytest.mark.slow
def test_divergence_keeps_the_best_checkpoint(workdir, config):
    run = workdir / "diverge"  # the LR warms up to 3.0: the held-out loss climbs after the start
    out = train(config, run, "optim.lr=3.0", "optim.warmup_steps=24", "train.max_steps=24", "train.ckpt_every=4",
                "train.eval_every=4", "train.keep_last=2", "train.spike_window=5", "train.spike_zscore=3", nproc=1)
    # the loss jumps as the LR grows: the steps flagged are exactly those whose loss is over 3 std
    # above the 5 before it (replayed from the logged losses; one rank, so each is that step's loss)
    records = metrics(run)
    replay = SpikeDetector(window=5, zscore=3.0)
    expected = {s for s, r in records.items() if replay.observe(r["loss"]) is not None}
    assert expected and {s for s, r in records.items() if r.get("loss_spikes")} == expected
    first = min(expected)
    assert f"loss spike at step {first}: loss {records[first]['loss']:.4f}" in out
    assert "std above the mean of the previous 5 steps" in out
    val = {s: r["val_loss"] for s, r in metrics(run).items() if s % 4 == 0}
    best = min(val, key=val.get)
    print("held-out loss at the checkpoints:", val)
    assert val[24] > val[best] + 1 and best < 20  # it diverged, and the best is older than keep_last's
    ckpts = run / "checkpoints"
    assert checkpoint.complete_tags(ckpts) == [checkpoint.tag_for(s) for s in (best, 20, 24)]
    assert checkpoint.commit_record(ckpts, checkpoint.tag_for(best))["val_loss"] == val[best]
    assert checkpoint.best_tag(ckpts) == checkpoint.tag_for(best)


@pytest.mark.slow
def test_a_non_finite_step_stops_the_run_without_a_checkpoint_of_it(workdir, config):
    run = workdir / "overflow"  # lr 1e30: step 1's update blows the weights up, step 2's gradient is inf
    out = failed(config, run, "optim.lr=1e30", "train.ckpt_every=1")
    assert "stopping at step 2: non-finite loss or gradient norm (loss 6.238 on this rank, grad_norm inf)" in out
    assert f"no checkpoint of this state was saved; the newest is {run}/checkpoints/{checkpoint.tag_for(1)}" in out
    assert "llm.health.Diverged: step 2: non-finite" in out and "final held-out loss" not in out
    ckpts = run / "checkpoints"
    assert checkpoint.complete_tags(ckpts) == [checkpoint.tag_for(1)]  # step 1, finite, kept; nothing after
    records = strict_records(run)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[2]["grad_norm"] is None and records[2]["nonfinite"] == {"grad_norm": "inf"}


@pytest.mark.slow
def test_skip_nonfinite_tolerates_that_many_steps_then_stops(workdir, config):
    run = workdir / "skipping"
    out = failed(config, run, "optim.lr=1e30", "train.ckpt_every=1", "train.skip_nonfinite=2")
    for i, step in enumerate((2, 3), 1):  # DeepSpeed skips their updates: the weights stay those of step 1
        assert f"step {step}: non-finite loss 6.238 on this rank, grad_norm inf: its update was skipped " \
               f"({i} of train.skip_nonfinite=2)" in out
    assert "stopping at step 4: non-finite loss or gradient norm" in out
    assert "after skipping steps [2, 3]" in out
    # a skipped step's state (step 1's weights, the data past its batch) is a fine checkpoint; step 4's is not
    assert checkpoint.complete_tags(run / "checkpoints") == [checkpoint.tag_for(2), checkpoint.tag_for(3)]


@pytest.mark.slow
def test_nan_from_the_first_step_commits_nothing(workdir, config):
    run = workdir / "nan"
    # a valid but absurd RoPE base: the rotary frequencies overflow, NaN from the first forward
    out = failed(config, run, "model.rope_theta=1e-300")
    assert "stopping at step 1: non-finite loss or gradient norm (loss nan on this rank, grad_norm inf)" in out
    assert "no checkpoint of this run was committed" in out
    assert checkpoint.complete_tags(run / "checkpoints") == []
    assert strict_records(run)[0]["nonfinite"]["val_loss"] == "nan"  # the step-0 evaluation


def test_spike_detector_flags_a_jump_over_the_window():
    spikes = SpikeDetector(window=5, zscore=3.0)
    losses = [5.0, 4.9, 5.1, 5.0, 4.95, 4.9, 9.0, 9.1, 9.0, 4.8, float("nan")]
    z = [spikes.observe(x) for x in losses]
    assert z[:6] == [None] * 6 and z[6] > 3  # no verdict before a full window; the jump is a spike
    assert z[7] is None  # once in the window, a lasting jump is the new normal
    assert z[10] is None and len(spikes.history) == 5  # NaN is the guard's, not kept
    assert all(v is None for v in map(SpikeDetector(5, 0.0).observe, losses))  # zscore 0: off


def test_jsonl_is_strict_json(tmp_path):
    log = JsonlLog(str(tmp_path / "m.jsonl"), 0)
    log.append([{"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "eranks": {"l0": float("-inf")},
                 "lr": 0.1}])
    line = (tmp_path / "m.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"step": 1, "loss": None, "grad_norm": None, "eranks": {"l0": None}, "lr": 0.1,
                                "nonfinite": {"loss": "nan", "grad_norm": "inf", "eranks.l0": "-inf"}}


def test_prune_keeps_the_newest_and_the_best(tmp_path):
    root = tmp_path / "checkpoints"
    for step, val in [(2, 5.0), (4, 3.0), (6, 3.0), (8, None), (10, 7.0), (12, 9.0)]:
        (root / checkpoint.tag_for(step)).mkdir(parents=True)
        (root / checkpoint.tag_for(step) / checkpoint.COMPLETE).write_text(json.dumps({"step": step, "val_loss": val}))
    (root / (checkpoint.tag_for(2) + checkpoint.UNIVERSAL)).mkdir()
    assert checkpoint.best_tag(root) == checkpoint.tag_for(6)  # ties: the newest
    checkpoint.prune(str(root), keep_last=2, keep_best=True)
    assert checkpoint.complete_tags(root) == [checkpoint.tag_for(s) for s in (6, 10, 12)]
    assert sorted(os.listdir(root)) == [checkpoint.tag_for(s) for s in (6, 10, 12)]
    checkpoint.prune(str(root), keep_last=2, keep_best=False)
    assert checkpoint.complete_tags(root) == [checkpoint.tag_for(s) for s in (10, 12)]


# --- 3. resuming with other optimizer settings -------------------------------------------------

@pytest.fixture(scope="module")
def stopped(workdir, config):
    run = workdir / "stopped"
    train(config, run, "train.stop_at_step=3", nproc=1)
    return run


@pytest.mark.slow
def test_a_resume_trains_with_the_configs_learning_rate(workdir, config, stopped):
    same = copy_run(stopped, workdir / "same_lr")
    lower = copy_run(stopped, workdir / "lower_lr")
    train(config, same, "train.resume=auto", nproc=1)
    out = train(config, lower, "train.resume=auto", "optim.lr=1e-3", "optim.weight_decay=0.0", nproc=1)
    assert ("optimizer settings from the config, changed since the checkpoint: optim.lr 0.01 -> 0.001, "
            "optim.weight_decay 0.1 -> 0.0") in out
    ours, theirs = metrics(lower), metrics(same)
    assert ours[4]["loss"] == theirs[4]["loss"]  # step 4's loss is measured before its update
    for step in (5, 6):  # after it, the lower LR shows
        assert ours[step]["loss"] != theirs[step]["loss"], step
        assert ours[step]["lr"] == pytest.approx(theirs[step]["lr"] / 10)


@pytest.mark.slow
def test_a_resume_before_its_checkpoints_step_is_refused(workdir, config, stopped):
    run = copy_run(stopped, workdir / "short")
    before = (run / "metrics.jsonl").read_text()
    out = failed(config, run, "train.resume=auto", "train.max_steps=2")
    assert f"train.max_steps=2 is before the checkpoint's step 3 ({run}/checkpoints/{checkpoint.tag_for(3)})" in out
    out = failed(config, run, "train.resume=auto", "train.stop_at_step=3")
    assert "train.stop_at_step=3 is not after the checkpoint's step 3" in out
    assert (run / "metrics.jsonl").read_text() == before and not (run / LOCK).exists()
    assert checkpoint.complete_tags(run / "checkpoints") == [checkpoint.tag_for(3)]


# --- 6 and 7. one trainer per run directory; Ctrl-C --------------------------------------------

@pytest.mark.slow
def test_a_second_trainer_is_locked_out_and_ctrl_c_checkpoints(workdir, config):
    run = workdir / "locked"
    first = launch(config, run, "train.max_steps=5000", "eval.final=false", nproc=1)
    wait_for(lambda: logged_steps(run) >= 2, "two logged steps")
    holder = json.loads((run / LOCK).read_text())
    assert holder["pid"] == first.proc.pid and holder["host"] == socket.gethostname()
    out = failed(config, run, "train.resume=auto", "train.max_steps=5000", "eval.final=false",
                 log=workdir / "locked_out.log")
    assert f"train.out_dir={run} is in use by another trainer: pid {first.proc.pid} on {socket.gethostname()}" in out
    assert first.proc.poll() is None  # the first one never noticed
    first.proc.send_signal(signal.SIGINT)  # a first Ctrl-C: checkpoint at the next step boundary, exit 0
    assert first.wait() == 0, first.output()[-3000:]
    step = int(checkpoint.find_latest(run / "checkpoints").removeprefix("step_"))
    assert f"stopping at step {step}: signal SIGINT" in first.output()
    assert list(metrics(run)) == list(range(1, step + 1))  # one record per step: no interleaving
    assert not (run / LOCK).exists()


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_and_keeps_what_was_committed(workdir, config):
    run = workdir / "aborted"  # 48 sequences a step: long enough steps to press Ctrl-C twice within one
    job = launch(config, run, "train.max_steps=5000", "train.global_batch_size=48", "train.ckpt_every=2",
                 "eval.final=false", nproc=1)
    wait_for(lambda: logged_steps(run) >= 3, "a step after the checkpoint of step 2")
    job.proc.send_signal(signal.SIGINT)
    wait_for(lambda: "Ctrl-C: checkpointing at the next step boundary" in job.output(), "the first Ctrl-C", every=0.02)
    job.proc.send_signal(signal.SIGINT)
    assert job.wait() != 0, job.output()[-3000:]
    assert "KeyboardInterrupt: a second Ctrl-C: aborted" in job.output()
    assert checkpoint.tag_for(2) in checkpoint.complete_tags(run / "checkpoints")
    assert list(metrics(run)) == list(range(1, logged_steps(run) + 1))
    assert not (run / LOCK).exists()


def test_lock_refuses_a_live_or_foreign_holder_and_takes_over_a_dead_ones(tmp_path, capsys):
    run = tmp_path / "run"
    with RunLock(str(run)):
        with pytest.raises(RunDirLocked, match=f"in use by another trainer: pid {os.getpid()} on "):
            RunLock(str(run)).acquire()
    assert not run.exists()  # the lock made the directory; released, nothing is left

    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "then"}))
    with RunLock(str(run)):
        assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock {run / LOCK} of pid {dead.pid}" in capsys.readouterr().out
    assert run.is_dir() and not (run / LOCK).exists()

    (run / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": dead.pid, "started": "then"}))
    with pytest.raises(RunDirLocked, match=f"pid {dead.pid} on elsewhere"):
        RunLock(str(run)).acquire()
    assert json.loads((run / LOCK).read_text())["host"] == "elsewhere"  # not ours to remove


@pytest.mark.slow
def test_ctrl_c_at_a_terminal_stops_torchrun_ranks_cleanly(workdir, config):
    run = workdir / "torchrun_ctrl_c"
    job = launch(config, run, "train.max_steps=5000", "eval.final=false", nproc=2, new_session=True)
    wait_for(lambda: logged_steps(run) >= 2, "two logged steps")
    os.killpg(job.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: to its foreground process group
    assert job.wait() == 0, job.output()[-3000:]
    step = int(checkpoint.find_latest(run / "checkpoints").removeprefix("step_"))
    assert f"stopping at step {step}: signal SIGINT" in job.output()
    assert checkpoint.commit_record(run / "checkpoints", checkpoint.tag_for(step))["world_size"] == 2
    assert list(metrics(run)) == list(range(1, step + 1))


def test_health_settings_are_checked_at_load():
    from llm.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="train.skip_nonfinite needs train.zero_stage >= 1"):
        build_config({"train": {"skip_nonfinite": 2, "zero_stage": 0}})
    with pytest.raises(ConfigError, match="train.spike_window: got 1, expected an integer >= 2"):
        build_config({"train": {"spike_window": 1}})
