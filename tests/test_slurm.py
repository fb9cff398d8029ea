"""launch/slurm.sbatch on a real Slurm cluster: two slurmd's on this machine (launch/local_slurm.sh),
2 nodes x 1 rank on CPU, ZeRO-2. The job gets the time-limit signal mid-run, checkpoints, requeues
itself, resumes on restart and trains to the end."""
import os
import re
import shutil
import socket
import subprocess

import pytest

from llm import checkpoint
from multiproc import ROOT, clean_env, logged_steps, metrics, wait_for, write_config

MAX_STEPS = 50
LOCAL_SLURM = str(ROOT / "launch" / "local_slurm.sh")

pytestmark = pytest.mark.slow


def free_port_run(n: int) -> int:
    """A port p with p .. p + n - 1 all free (slurmctld and the two slurmd's)."""
    for base in range(17000, 30000, 10):
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment for Slurm commands talking to a local two-node cluster (stopped afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (apt-get install, slurmd)")
    root = tmp_path_factory.mktemp("slurm")
    env = clean_env(SLURM_LOCAL_PORT=free_port_run(3), SLURM_CONF=root / "slurm.conf")
    up = subprocess.run([LOCAL_SLURM, "up", str(root)], env=env, capture_output=True, text=True)
    try:
        if up.returncode and not shutil.which("slurmctld"):
            pytest.skip(f"Slurm is not installed and could not be installed: {up.stdout[-500:]}{up.stderr[-1000:]}")
        assert up.returncode == 0, f"{up.stdout}{up.stderr}"
        yield env
    finally:
        subprocess.run([LOCAL_SLURM, "down", str(root)], env=env, check=True)


def job_info(job: str, env) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True,
                         check=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def ended(job: str, env):
    """The job's fields once it has ended, else None."""
    info = job_info(job, env)
    return None if info["JobState"] in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING") else info


def test_sbatch_two_nodes_preempted_requeued_and_completed(slurm, data_dir, tmp_path):
    config, run = write_config(tmp_path / "tiny.yaml", data_dir), tmp_path / "run"
    job = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--time=10", f"--output={tmp_path}/slurm-%j.out",
         str(ROOT / "launch" / "slurm.sbatch"), str(config), f"train.out_dir={run}",
         f"train.max_steps={MAX_STEPS}", "train.zero_stage=2", "eval.final=false"],
        env=slurm, capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    log = tmp_path / f"slurm-{job}.out"
    try:
        wait_for(lambda: logged_steps(run) >= 2, "two logged steps")
        # what --signal=B:USR1@180 does 3 minutes before the time limit
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, check=True)
        wait_for(lambda: job_info(job, slurm)["JobState"] == "PENDING" and job_info(job, slurm)["Restarts"] == "1",
                 "the job to requeue itself")
        # Slurm holds a requeued job back for a couple of minutes (BeginTime): start it sooner, once
        # the old run's credential (revoked at the requeue, to the second) has been superseded
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], env=slurm, check=True)
        state = wait_for(lambda: ended(job, slurm), "the job to end", every=1)
    finally:
        subprocess.run(["scancel", job], env=slurm)
    output = log.read_text(errors="replace")
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), output[-5000:]

    assert f"job {job} (restart 0) on node[1-2]" in output and f"job {job} (restart 1) on node[1-2]" in output
    assert output.count("2 rank(s), grad accumulation 3, ZeRO-2") == 2
    left = [int(s) for s in re.findall(r"time limit: the Slurm job's time limit, (\d+) s from now", output)]
    assert len(left) == 2 and all(300 < s <= 600 for s in left), left  # --time=10 (minutes)
    (stopped,) = map(int, re.findall(r"stopping at step (\d+): signal SIGUSR1", output))
    assert 2 <= stopped < MAX_STEPS
    assert f"requeueing job {job}" in output
    assert f"resumed from {run}/checkpoints/{checkpoint.tag_for(stopped)} at step {stopped}" in output
    assert list(metrics(run)) == list(range(1, MAX_STEPS + 1))
    assert checkpoint.find_latest(run / "checkpoints") == checkpoint.tag_for(MAX_STEPS)
    assert checkpoint.commit_record(run / "checkpoints", checkpoint.tag_for(MAX_STEPS))["world_size"] == 2
