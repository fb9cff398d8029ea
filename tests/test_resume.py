"""Checkpoints with real DeepSpeed ranks on CPU: exact resume (ZeRO 1 and 3), resume on 1 and 3 ranks
of a 2-rank checkpoint through the universal format, the commit protocol, config checks, export.

Runs are shared: per ZeRO stage, a 6-step run straight and one stopped at step 3 (both 2 ranks),
each resumed copy of the stopped one made once."""
import functools
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llm import checkpoint
from llm.config import ConfigError, load_config
from llm.distributed import parse_slurm_time
from multiproc import ROOT, clean_env, copy_run, kill_all, loss_table, metrics, train, write_config

STOP = 3  # steps before the stop; the runs have 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    yield tmp_path_factory.mktemp("resume")
    kill_all()


@pytest.fixture(scope="module")
def config(workdir, data_dir):
    return write_config(workdir / "tiny.yaml", data_dir)


@pytest.fixture(scope="module")
def straight(workdir, config):
    """ZeRO stage -> 6 steps straight on 2 ranks, a checkpoint every 2 steps, the last 2 kept."""
    @functools.cache
    def make(stage):
        run = workdir / f"straight_zero{stage}"
        train(config, run, f"train.zero_stage={stage}", "train.ckpt_every=2")
        return run
    return make


@pytest.fixture(scope="module")
def stopped(workdir, config):
    """ZeRO stage -> (run dir, output) of the same run stopped at step 3 (train.stop_at_step)."""
    @functools.cache
    def make(stage):
        run = workdir / f"stopped_zero{stage}"
        return run, train(config, run, f"train.zero_stage={stage}", f"train.stop_at_step={STOP}")
    return make


@pytest.fixture(scope="module")
def resumed(workdir, config, stopped):
    """(ZeRO stage, ranks) -> (run dir, output) of a copy of the stopped run continued with
    train.resume=auto, after a crash mid-save: a newer tag without complete.json and a `latest`
    naming it. One rank converts the checkpoint ahead with `python -m llm convert`; 3 ranks
    convert on start."""
    @functools.cache
    def make(stage, nproc):
        run = copy_run(stopped(stage)[0], workdir / f"resumed_zero{stage}_{nproc}ranks")
        ckpts = run / "checkpoints"
        (ckpts / checkpoint.tag_for(5)).mkdir()
        (ckpts / checkpoint.tag_for(5) / "mp_rank_00_model_states.pt").write_bytes(b"half-written")
        (ckpts / "latest").write_text(checkpoint.tag_for(5))
        if nproc == 1:
            subprocess.run([sys.executable, "-m", "llm", "convert", str(run)], check=True, env=clean_env(),
                           cwd=ROOT, capture_output=True)
        keep = ["train.keep_last=1"] if nproc != 2 else []  # prunes step 3 and its universal copy
        return run, train(config, run, f"train.zero_stage={stage}", "train.resume=auto", *keep, nproc=nproc)
    return make


def losses(run):
    return {s: r["loss"] for s, r in metrics(run).items()}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_exact_resume(stage, straight, stopped, resumed):
    ref = straight(stage)
    run, out = resumed(stage, 2)
    assert f"stopping at step {STOP}: train.stop_at_step={STOP}" in stopped(stage)[1]
    assert f"resumed from {run}/checkpoints/{checkpoint.tag_for(STOP)} at step {STOP}" in out
    print(loss_table(f"ZeRO-{stage}, 2 ranks: 6 steps straight vs stop at {STOP} + resume",
                     {"straight": losses(ref), "stop+resume": losses(run)}))
    ours, theirs = metrics(run), metrics(ref)
    assert list(ours) == list(theirs) == [1, 2, 3, 4, 5, 6]
    for step in theirs:  # bitwise: same weights, optimizer state, LR schedule, data and RNG
        for key in ("loss", "lr", "grad_norm"):
            assert ours[step][key] == theirs[step][key], (step, key)
    assert ours[6]["val_loss"] == theirs[6]["val_loss"]
    assert all(r["mfu"] is None for r in ours.values())  # CPU: no peak to compare against
    # keep_last=2 with a checkpoint every 2 steps; the crash's leftovers are never taken for one
    assert checkpoint.complete_tags(ref / "checkpoints") == [checkpoint.tag_for(4), checkpoint.tag_for(6)]
    assert checkpoint.find_latest(run / "checkpoints") == checkpoint.tag_for(6)


@pytest.mark.slow
@pytest.mark.parametrize("stage, nproc", [(1, 1), (3, 3)])
def test_resume_on_another_world_size(stage, nproc, straight, resumed):
    ref = straight(stage)
    run, out = resumed(stage, nproc)
    print(loss_table(f"ZeRO-{stage}: saved by 2 ranks at step {STOP}, resumed on {nproc}",
                     {"straight (2 ranks)": losses(ref), f"resumed ({nproc} ranks)": losses(run)}))
    universal = checkpoint.tag_for(STOP) + checkpoint.UNIVERSAL
    assert f"resumed from {run}/checkpoints/{universal} at step {STOP} (saved by 2 ranks)" in out
    assert f"{nproc} rank(s), grad accumulation {6 // nproc}" in out
    ours, theirs = metrics(run), metrics(ref)
    assert list(ours) == list(theirs)
    for step in range(STOP + 1, 7):  # the same global batches: equal up to float summation order
        assert ours[step]["loss"] == pytest.approx(theirs[step]["loss"], rel=1e-6, abs=0), step
        assert ours[step]["lr"] == theirs[step]["lr"]
    ckpts = run / "checkpoints"
    assert checkpoint.complete_tags(ckpts) == [checkpoint.tag_for(6)]  # keep_last=1
    assert not (ckpts / universal).exists() and not (ckpts / checkpoint.tag_for(STOP)).exists()
    assert checkpoint.commit_record(ckpts, checkpoint.tag_for(6))["world_size"] == nproc


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_export_gives_the_trained_model(stage, stopped, tmp_path):
    from llm.data import load_tokenizer
    from llm.__main__ import main
    from llm.data import TokenShards, eval_windows
    from llm.export import load_exported

    run, _ = stopped(stage)
    main(["export", str(run), "--out", str(tmp_path / "export")])
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors",
                                                                      "tokenizer.model"]
    model = load_exported(tmp_path / "export")
    reference, cfg = checkpoint.load_model(run)
    windows = eval_windows(TokenShards(cfg.data.path, "val"), cfg.data.seq_len, cfg.eval.windows)
    with torch.no_grad():
        logits = model(windows[:, :-1])
        torch.testing.assert_close(logits, reference(windows[:, :-1]), rtol=0, atol=0)
        val_loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    # the held-out loss the DeepSpeed engine measured at the checkpoint's step, on the same windows
    assert val_loss == pytest.approx(metrics(run)[STOP]["val_loss"], rel=1e-5)
    assert load_tokenizer(str(tmp_path / "export")).vocab_size == cfg.model.vocab_size


@pytest.mark.slow
def test_checkpoint_that_does_not_fit_is_refused_by_name(stopped, config):
    run, _ = stopped(1)
    root, tag = run / "checkpoints", checkpoint.tag_for(STOP)
    assert checkpoint.check_fits(load_config(config), root, tag)["step"] == STOP
    for override, message in [("model.d_model=64", "model.d_model: checkpoint 32 vs config 64"),
                              ("model.vocab_size=600", "model.vocab_size: checkpoint 512 vs config 600"),
                              ("train.zero_stage=2", "train.zero_stage: checkpoint 1 vs config 2"),
                              ("train.global_batch_size=12", "train.global_batch_size: checkpoint 6 vs config 12")]:
        with pytest.raises(ConfigError, match=message):
            checkpoint.check_fits(load_config(config, [override]), root, tag)


def test_find_latest_trusts_only_complete_tags(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    assert checkpoint.find_latest(root) is None
    for step in (2, 4):
        (root / checkpoint.tag_for(step)).mkdir()
        (root / checkpoint.tag_for(step) / checkpoint.COMPLETE).write_text(json.dumps({"step": step}))
    (root / checkpoint.tag_for(6)).mkdir()  # crashed mid-save
    (root / (checkpoint.tag_for(4) + checkpoint.UNIVERSAL)).mkdir()
    # `latest` naming an older complete tag (a run resumed from it) must not hide the newer one
    for latest, expected in [(checkpoint.tag_for(2), 4), (checkpoint.tag_for(6), 4),
                             (checkpoint.tag_for(4) + checkpoint.UNIVERSAL, 4), ("../elsewhere", 4)]:
        (root / "latest").write_text(latest)
        assert checkpoint.find_latest(root) == checkpoint.tag_for(expected), latest
    (root / "latest").write_bytes(b"\xff\xfe garbage")
    assert checkpoint.find_latest(root) == checkpoint.tag_for(4)
    assert checkpoint.resolve_resume("auto", str(root)) == (str(root), checkpoint.tag_for(4))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(str(root / checkpoint.tag_for(6)), str(root))
    with pytest.raises(FileNotFoundError, match="step_00000006: not a complete checkpoint "
                                                "\\(complete ones: step_00000002, step_00000004\\)"):
        checkpoint.main([str(tmp_path), "--tag", checkpoint.tag_for(6)])  # python -m llm convert


@pytest.mark.parametrize("text, seconds", [("1-02:03:04", 93784), ("02:03:04", 7384), ("03:04", 184), ("59", 59),
                                           ("UNLIMITED", None), ("NOT_SET", None), ("", None)])
def test_parse_slurm_time_left(text, seconds):
    assert parse_slurm_time(text) == seconds
