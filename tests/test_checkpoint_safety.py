"""Damaged, interrupted and hostile checkpoints, with real DeepSpeed runs of the tiny model: the
commit record's checksums and the resume fallback, a kill while a tag is rewritten, a partial
metrics line, pickled code refused by name, disk full mid-save, the consolidated-weights cache and
export's --force and file modes.

One 1-rank ZeRO-1 run (6 steps, a checkpoint every 2, the last 2 kept: tags 4 and 6) is shared;
each test damages its own copy and checks that nothing already written is lost."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from llm import checkpoint
from multiproc import ROOT, Launch, clean_env, copy_run, kill_all, metrics, train, write_config

pytestmark = pytest.mark.slow
TAG4, TAG6 = checkpoint.tag_for(4), checkpoint.tag_for(6)
MODEL, OPTIM = "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    yield tmp_path_factory.mktemp("ckpt_safety")
    kill_all()


@pytest.fixture(scope="module")
def config(workdir, data_dir):
    return write_config(workdir / "tiny.yaml", data_dir)


@pytest.fixture(scope="module")
def straight(workdir, config):
    run = workdir / "straight"
    train(config, run, "train.ckpt_every=2", nproc=1)
    assert checkpoint.complete_tags(run / "checkpoints") == [TAG4, TAG6]
    return run


def run_cli(*args):
    """`python -m llm ARGS` in a subprocess: (returncode, stdout + stderr)."""
    p = subprocess.run([sys.executable, "-m", "llm", *map(str, args)], cwd=ROOT, env=clean_env(),
                       capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


def resume_auto(config, run, *overrides):
    """train.resume=auto on the copy; must succeed. Its output."""
    return train(config, run, "train.ckpt_every=2", "train.resume=auto", *overrides, nproc=1)


def assert_continues_straight(run, straight, out, skipped_problem):
    """Resumed from tag 4 after skipping tag 6 for `skipped_problem`; steps 1-4 kept and 5-6
    retrained to the straight run's losses (bitwise: one rank)."""
    assert f"resumed from {run}/checkpoints/{TAG4} at step 4\n  skipped {TAG6}: {skipped_problem}" in out
    ours, theirs = metrics(run), metrics(straight)
    assert list(ours) == [1, 2, 3, 4, 5, 6]
    for step in ours:
        assert ours[step]["loss"] == theirs[step]["loss"], step
    assert checkpoint.newest_verified(run / "checkpoints") == (TAG6, [])  # rewritten whole


def test_commit_record_lists_every_file_with_its_checksum(straight):
    root = straight / "checkpoints"
    files = checkpoint.commit_record(root, TAG6)["files"]
    assert sorted(files) == sorted(p.name for p in (root / TAG6).iterdir() if p.name != checkpoint.COMPLETE)
    for name, digest in files.items():
        assert digest == checkpoint.file_digest(root / TAG6 / name)
        assert digest["size"] == (root / TAG6 / name).stat().st_size
    assert checkpoint.verify(root, TAG6) is None


@pytest.mark.parametrize("damage", ["truncated", "same_size"])
def test_damaged_newest_tag_is_skipped_for_the_newest_that_verifies(damage, straight, config, workdir):
    run = copy_run(straight, workdir / f"damaged_{damage}")
    root = run / "checkpoints"
    (root / "latest").write_text(TAG6)
    if damage == "truncated":  # gave `OSError: [Errno 22] Invalid argument`, naming no file
        path = root / TAG6 / OPTIM
        size = path.stat().st_size
        os.truncate(path, size // 2)
        problem = f"{path} has {size // 2} bytes, its commit record says {size}"
    else:  # loaded silently before (NaN at step 6)
        path = root / TAG6 / MODEL
        data = bytearray(path.read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
        path.write_bytes(bytes(data))
        recorded = checkpoint.commit_record(root, TAG6)["files"][MODEL]["crc32"]
        problem = (f"{path} has checksum {checkpoint.file_digest(path)['crc32']}, its commit record says "
                   f"{recorded} (corrupted)")
    # a run killed mid-append left half a line (a bare JSONDecodeError blocked every retry)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 5.')
    out = resume_auto(config, run)
    assert f"note: {run}/metrics.jsonl: dropped a partial last line" in out
    assert_continues_straight(run, straight, out, problem)


KILLING_RUN = """
import os, signal, sys, torch
save = torch.save

def save_then_die(obj, path, *args, **kwargs):  # killed as the optimizer file of step 6 is begun
    if str(path).endswith("step_00000006/zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        open(path, "wb").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, path, *args, **kwargs)

torch.save = save_then_die
from llm.__main__ import main
main(sys.argv[1:])
"""


def test_kill_while_a_tag_is_rewritten_leaves_it_uncommitted(straight, config, workdir):
    run = copy_run(straight, workdir / "killed_rewrite")
    root = run / "checkpoints"
    killed = Launch([sys.executable, "-c", KILLING_RUN, "train", config, f"train.out_dir={run}",
                     "train.ckpt_every=2", f"train.resume={root / TAG4}"], workdir / "killed_rewrite.log", clean_env())
    assert killed.wait() == -9, killed.output()[-3000:]
    assert (root / TAG6 / OPTIM).stat().st_size == 0
    # before: the old complete.json stayed beside the 0-byte file and resume=auto hit EOFError forever
    assert checkpoint.complete_tags(root) == [TAG4] and checkpoint.verify(root, TAG4) is None
    out = resume_auto(config, run)
    assert f"resumed from {root}/{TAG4} at step 4" in out
    assert [metrics(run)[s]["loss"] for s in (5, 6)] == [metrics(straight)[s]["loss"] for s in (5, 6)]


def test_resume_auto_with_no_checkpoint_that_verifies_fails_naming_each(straight, config, workdir):
    run = copy_run(straight, workdir / "all_damaged")
    for tag in (TAG4, TAG6):
        os.truncate(run / "checkpoints" / tag / OPTIM, 100)
    rc, out = run_cli("train", config, f"train.out_dir={run}", "train.resume=auto")
    assert rc != 0
    assert f"train.resume=auto: no checkpoint in {run}/checkpoints matches its commit record; skipped {TAG6}: " in out
    assert f"; skipped {TAG4}: {run}/checkpoints/{TAG4}/{OPTIM} has 100 bytes" in out


class Payload:
    """Unpickling it creates `marker`: any code could run there."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_payload(run, marker):
    """Add the payload to tag 6's optimizer file and commit it again: a checkpoint whose checksums
    all match, handed over by someone else."""
    root = run / "checkpoints"
    path = root / TAG6 / OPTIM
    state = torch.load(path, weights_only=False)  # our own file: trusted
    state["extra"] = Payload(marker)
    torch.save(state, path)
    record = checkpoint.commit_record(root, TAG6)
    record["files"][OPTIM] = checkpoint.file_digest(path)
    (root / TAG6 / checkpoint.COMPLETE).write_text(json.dumps(record))
    return path


def test_pickled_code_is_refused_by_name(straight, config, workdir):
    run = copy_run(straight, workdir / "hostile")
    marker = workdir / "hostile_marker"
    path = plant_payload(run, marker)
    before = {p: p.read_bytes() for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()}
    metrics_before = (run / "metrics.jsonl").read_text()
    refused = f"{path}: refused to load: it pickles something other than tensors and DeepSpeed's checkpoint types (io.open)"
    for args in (["generate", run, "--prompt", "The"], ["export", run, "--out", workdir / "hostile_export"],
                 ["eval", run, "--ppl"], ["train", config, f"train.out_dir={run}", "train.resume=auto"]):
        rc, out = run_cli(*args)
        assert rc != 0 and refused in out and "--trust-checkpoint" in out, (args, out[-3000:])
        assert not marker.exists(), args
    assert not (workdir / "hostile_export").exists()
    assert {p: p.read_bytes() for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()} == before
    assert (run / "metrics.jsonl").read_text() == metrics_before
    rc, out = run_cli("generate", run, "--prompt", "The", "--trust-checkpoint")  # the user's call
    assert rc == 0 and marker.exists(), out[-3000:]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_checkpoints_load_with_the_allowlist(stage, config, workdir):
    """Every file DeepSpeed writes at ZeRO 0-3 on 2 ranks (ZeRO 1: the shared run) and in a
    universal copy opens under weights_only with `safe_globals`; the record lists each rank's files."""
    run = workdir / f"allowlist_zero{stage}"
    train(config, run, f"train.zero_stage={stage}", "train.max_steps=1", "eval.final=false")
    root, tag = run / "checkpoints", checkpoint.tag_for(1)
    assert checkpoint.verify(root, tag) is None
    assert sorted(checkpoint.commit_record(root, tag)["files"]) == sorted(
        p.name for p in (root / tag).iterdir() if p.name != checkpoint.COMPLETE)
    checkpoint.check_safe(root / tag, trust=False)
    if stage == 3:
        checkpoint.check_safe(root / checkpoint.to_universal(str(root), tag), trust=False)
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in checkpoint.safe_globals()}
    for path in (root / tag).glob("*.pt"):
        assert set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) <= allowed, path


def test_eval_consolidates_once_and_reuses_the_cache(straight, workdir):
    run = copy_run(straight, workdir / "cached")
    cache = run / "checkpoints" / TAG6 / checkpoint.CONSOLIDATED
    rc, first = run_cli("generate", run, "--prompt", "The", "--max-new-tokens", "8", "--temperature", "0")
    assert rc == 0 and cache.is_file() and oct(cache.stat().st_mode & 0o777) == "0o644"
    assert "Processing zero checkpoint" not in first and "Loading checkpoint shards" not in first
    made = cache.stat().st_mtime_ns
    for name in (MODEL, OPTIM):  # the cache alone now serves the weights
        os.truncate(run / "checkpoints" / TAG6 / name, 0)
    rc, second = run_cli("generate", run, "--prompt", "The", "--max-new-tokens", "8", "--temperature", "0")
    assert rc == 0 and second.splitlines()[-1] == first.splitlines()[-1] and cache.stat().st_mtime_ns == made
    cached, _, tag = checkpoint.load_checkpoint(str(run))
    assert tag == TAG6
    consolidated = checkpoint.consolidated_state_dict(str(straight / "checkpoints"), TAG6)  # from the shards
    for name, weights in cached.state_dict().items():
        assert torch.equal(weights, consolidated[name]), name


def test_export_asks_for_force_and_writes_readable_files(straight, workdir):
    run, out_dir = copy_run(straight, workdir / "exported"), workdir / "export"
    rc, out = run_cli("export", run, "--out", out_dir)
    assert rc == 0, out
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out_dir.iterdir()}
    assert modes == {"model.safetensors": "0o644", "config.json": "0o644", "tokenizer.model": "0o644"}
    weights = (out_dir / "model.safetensors").read_bytes()
    rc, out = run_cli("export", run, "--out", out_dir, "--tag", TAG4)
    assert rc != 0 and f"export --out {out_dir}: the directory already has files" in out and "--force" in out
    assert (out_dir / "model.safetensors").read_bytes() == weights
    rc, out = run_cli("export", run, "--out", out_dir, "--tag", TAG4, "--force")
    assert rc == 0 and (out_dir / "model.safetensors").read_bytes() != weights


DISK_FULL = """
set -e
mkdir -p "$RUN/checkpoints"
mount -t tmpfs -o size=1200k h11-test "$RUN/checkpoints"
set +e
"$@"
echo "exit code $?"
cp -a "$RUN/checkpoints" "$RUN/checkpoints_after"
"""


def test_disk_full_mid_save_removes_the_partial_tag(config, workdir):
    """2 ranks save onto a 1200 kB tmpfs (in a private mount namespace, gone with it): tag 2
    (~830 kB) fits, tag 4 does not."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount a small tmpfs")
    run = workdir / "disk_full"
    run.mkdir()
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", DISK_FULL, "sh",
           str(ROOT / "launch" / "torchrun.sh"), str(config), f"train.out_dir={run}", "train.ckpt_every=2"]
    p = subprocess.run(cmd, cwd=ROOT, env=clean_env(RUN=run, NPROC_PER_NODE=2), capture_output=True, text=True,
                       timeout=600)
    out = p.stdout + p.stderr
    assert "exit code 0" not in out and "exit code" in out, out[-5000:]
    assert (f"saving checkpoint {run}/checkpoints/{checkpoint.tag_for(4)} failed: no space left on device; "
            f"removed the partial checkpoint (newest complete one: {checkpoint.tag_for(2)})") in out, out[-5000:]
    after = run / "checkpoints_after"
    assert checkpoint.complete_tags(after) == [checkpoint.tag_for(2)]
    assert not (after / checkpoint.tag_for(4)).exists()
    assert checkpoint.verify(after, checkpoint.tag_for(2)) is None
    assert list(metrics(run)) == [1, 2, 3, 4]  # the log (on another filesystem) is whole


ONE_RANK_FULL = """
import errno, os
if os.environ.get("RANK") == "1":
    import torch
    save = torch.save

    def save_or_fail(obj, path, *args, **kwargs):  # only this rank's disk fills up, at step 4
        if str(path).endswith("step_00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return save(obj, path, *args, **kwargs)

    torch.save = save_or_fail
"""


def test_a_save_failing_on_one_rank_fails_every_rank_at_once(config, workdir):
    """Rank 1's save raises ENOSPC (patched in through a sitecustomize) while rank 0 has written
    its files and waits in DeepSpeed's last barrier: both end with the error, no collective hangs."""
    site = workdir / "one_rank_full_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(ONE_RANK_FULL)
    run = workdir / "one_rank_full"
    env = clean_env(NPROC_PER_NODE=2, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    launched = Launch([str(ROOT / "launch" / "torchrun.sh"), str(config), f"train.out_dir={run}", "train.ckpt_every=2"],
                      workdir / "one_rank_full.log", env)
    assert launched.wait() != 0
    out, tag_dir = launched.output(), run / "checkpoints" / checkpoint.tag_for(4)
    end = f"; removed the partial checkpoint (newest complete one: {checkpoint.tag_for(2)})"
    assert f"[rank1]: llm.checkpoint.CheckpointError: saving checkpoint {tag_dir} failed: no space left on device{end}" in out
    assert f"[rank0]: llm.checkpoint.CheckpointError: saving checkpoint {tag_dir} failed: failed on another rank{end}" in out
    assert "timed out" not in out.lower() and "timeout" not in out.lower(), out[-5000:]  # dist_timeout never hit
    assert not tag_dir.exists() and checkpoint.newest_verified(run / "checkpoints") == (checkpoint.tag_for(2), [])
    assert list(metrics(run)) == [1, 2, 3, 4]
