"""Preemption and failures with real DeepSpeed ranks (ZeRO-2, CPU), one run continuing the last:

1. two torchrun "nodes" on localhost (c10d rendezvous, 1 rank each); SIGUSR1 to the launcher of one
   mid-run: every rank checkpoints at the next step boundary and both launchers exit 0;
2. resumed on one node with 2 ranks; one rank SIGKILLed mid-run: the whole job exits non-zero, fast;
3. restarted with train.resume=auto: continues from the last complete checkpoint, and stops cleanly
   (checkpoint, exit 0) at train.time_limit;
4. resumed by plain python, one rank (resharded through the universal format); SIGTERM mid-run:
   checkpoint, exit 0.
"""
import signal
import time

import pytest

from llm import checkpoint
from multiproc import free_port, kill_all, launch, logged_steps, metrics, wait_for, write_config

MAX_STEPS = 5000  # never reached: every run here is stopped
FAIL_FAST = 60  # seconds from a rank's death to the end of the job (train.dist_timeout is 30 here)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    """(config, run dir, the overrides every launch here shares)."""
    root = tmp_path_factory.mktemp("distributed")
    yield (write_config(root / "tiny.yaml", data_dir), root / "run",
           [f"train.max_steps={MAX_STEPS}", "train.zero_stage=2", "train.dist_timeout=30", "eval.final=false"])
    kill_all()


def newest_step(run_dir) -> int:
    tag = checkpoint.find_latest(run_dir / "checkpoints")
    return checkpoint.commit_record(run_dir / "checkpoints", tag)["step"] if tag else 0


@pytest.fixture(scope="module")
def preempted(run):
    """Step 1: two nodes, SIGUSR1 to the second's launcher once training is under way."""
    config, run_dir, common = run
    env = dict(NNODES=2, NPROC_PER_NODE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), RDZV_ID="test")
    nodes = [launch(config, run_dir, *common, log=run_dir.with_name(f"node{i}.log"), **env) for i in range(2)]
    wait_for(lambda: logged_steps(run_dir) >= 2, "two logged steps")
    nodes[1].proc.send_signal(signal.SIGUSR1)  # launch/torchrun.sh passes it to its rank
    return nodes, [node.wait() for node in nodes]


def test_two_nodes_checkpoint_and_exit_cleanly_on_a_signal(run, preempted):
    _, run_dir, _ = run
    nodes, codes = preempted
    output = "".join(node.output() for node in nodes)
    assert codes == [0, 0], output[-5000:]
    assert "2 rank(s), grad accumulation 3, ZeRO-2" in output
    step = newest_step(run_dir)
    assert 2 <= step < MAX_STEPS
    # rank 0 prints; the signal went to the second node's rank, whichever global rank it got
    assert f"stopping at step {step}: signal SIGUSR1" in output or \
        f"stopping at step {step}: signal on another rank" in output
    assert checkpoint.commit_record(run_dir / "checkpoints", checkpoint.tag_for(step))["world_size"] == 2
    assert max(metrics(run_dir)) == step


@pytest.fixture(scope="module")
def killed(run, preempted):
    """Step 2: resume on one node with 2 ranks, a checkpoint every 2 steps; SIGKILL one rank once a
    new checkpoint is in. (start step, exit code, seconds from the kill to the job's end, output)."""
    config, run_dir, common = run
    start = newest_step(run_dir)
    job = launch(config, run_dir, *common, "train.resume=auto", "train.ckpt_every=2",
                 log=run_dir.with_name("killed.log"))
    wait_for(lambda: newest_step(run_dir) > start, "a checkpoint after the resume")
    wait_for(lambda: logged_steps(run_dir) > newest_step(run_dir), "a step after that checkpoint")
    job.ranks()[1].kill()
    killed_at = time.time()
    code = job.wait()
    return start, code, time.time() - killed_at, job.output()


def test_a_killed_rank_fails_the_job_fast(killed):
    start, code, seconds, output = killed
    assert f"{checkpoint.tag_for(start)} at step {start}" in output
    assert code != 0, output[-5000:]
    assert seconds < FAIL_FAST, output[-5000:]


def test_restart_continues_from_the_last_complete_checkpoint_and_stops_at_the_time_limit(run, killed):
    config, run_dir, common = run
    last = newest_step(run_dir)
    assert last > killed[0]
    job = launch(config, run_dir, *common, "train.resume=auto", "train.time_limit=15",
                 log=run_dir.with_name("restarted.log"))
    assert job.wait() == 0, job.output()[-5000:]
    output = job.output()
    assert f"{checkpoint.tag_for(last)} at step {last}" in output
    step = newest_step(run_dir)
    assert step > last
    assert f"stopping at step {step}: train.time_limit=15.0s" in output
    # the records the killed run wrote past its last checkpoint were replaced: one record per step
    assert list(metrics(run_dir)) == list(range(1, step + 1))


def test_one_rank_resumes_resharded_and_stops_on_sigterm(run, killed):
    config, run_dir, common = run
    start = newest_step(run_dir)
    job = launch(config, run_dir, *common, "train.resume=auto", nproc=1, log=run_dir.with_name("sigterm.log"))
    wait_for(lambda: logged_steps(run_dir) > start, "a step after the resume")
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait() == 0, job.output()[-5000:]
    output = job.output()
    assert f"{checkpoint.tag_for(start)}{checkpoint.UNIVERSAL} at step {start} (saved by 2 ranks)" in output
    step = newest_step(run_dir)
    assert step > start and f"stopping at step {step}: signal SIGTERM" in output
    assert checkpoint.commit_record(run_dir / "checkpoints", checkpoint.tag_for(step))["world_size"] == 1
