"""The training loop: a DeepSpeed engine (even for one process), fixed global batch, resumable.

One optimizer step consumes global samples [step * G, (step + 1) * G) of the data stream, split
over ranks and micro-steps, so any rank count trains the same steps; gradient accumulation is
G / (micro_batch_size * world_size). Checkpoints carry that position, the RNG states and the
config, and `train.resume=auto` continues a run exactly where its last checkpoint left it.

`setup` checks the inputs, builds the engine and resumes into a `Run`; `train` is the loop, where
each concern (stopping, health, logging, evaluation, checkpoints) is one object that decides for
itself whether this step is its turn. Rank 0 holds the run directory's lock (llm.runlock) for the
whole job. A non-finite loss or gradient norm ends the run with `Diverged` (llm.health) without
checkpointing that state.
"""
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from omegaconf import OmegaConf

from llm import checkpoint, distributed
from llm.checkpoint import TrainState
from llm.config import ConfigError, save_config
from llm.engine import build_engine, forward, resolve_dtype, train_step
from llm.flops import mfu, peak_flops, train_flops_per_token
from llm.health import Diverged, NonFiniteGuard, SpikeDetector
from llm.logs import MetricsLog
from llm.runlock import RunLock
from llm.telemetry import TelemetryLog


class StopSignal:
    """SIGTERM / SIGUSR1 (preemption) and a first Ctrl-C (SIGINT) ask every rank to checkpoint at
    the next step boundary; a second Ctrl-C aborts at once (KeyboardInterrupt; what was committed stays)."""

    def __init__(self):
        self.received, self.interrupts = None, 0
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt("a second Ctrl-C: aborted without a checkpoint of the steps since the last one")
            if os.environ.get("RANK", "0") == "0":
                print("Ctrl-C: checkpointing at the next step boundary, then exiting (again to abort)", flush=True)
        self.received = signal.Signals(signum).name


class Stopper:
    """Whether this job ends after a step: train.stop_at_step, a signal on any rank, or too little
    time left for a few more steps and a checkpoint before the earliest time limit
    (train.time_limit, or the Slurm job's end, asked once by rank 0); or, as an error, a non-finite
    step on any rank that the guard does not let pass. The flags are all-reduced once per step."""

    def __init__(self, cfg, job_start: float, stop: StopSignal, rank: int, guard: NonFiniteGuard):
        self.stop_at, self.signal, self.guard, self.longest_step = cfg.train.stop_at_step, stop, guard, 0.0
        limits = {f"train.time_limit={cfg.train.time_limit}s": job_start + cfg.train.time_limit} \
            if cfg.train.time_limit else {}
        slurm_left = distributed.slurm_time_left() if rank == 0 else None
        if slurm_left is not None:
            limits["the Slurm job's time limit"] = time.time() + slurm_left
        self.limit, self.deadline = min(limits.items(), key=lambda kv: kv[1], default=(None, math.inf))

    def reason(self, step_done: int, step_seconds: float, save_seconds: float, stats: dict):
        """Why to stop after `step_done` (collective: every rank calls it each step), or None: a
        string for a clean stop (checkpoint, exit 0), a `Diverged` error for a failed step."""
        self.longest_step = max(self.longest_step, step_seconds)
        flags = [float(self.signal.received is not None),
                 float(time.time() + 3 * self.longest_step + save_seconds > self.deadline),
                 self.guard.local_flag(stats)]
        signalled, out_of_time, nonfinite = distributed.all_reduce(flags, op="max")
        failure = self.guard.judge(step_done, stats) if nonfinite else None
        if failure:
            return failure
        if step_done == self.stop_at:
            return f"train.stop_at_step={self.stop_at}"
        if signalled:
            return "signal " + (self.signal.received or "on another rank")
        if out_of_time:
            return self.limit or "a time limit on rank 0"
        return None


class Checkpointer:
    """Saves every train.ckpt_every steps and at the last step (with the step's held-out loss, if
    measured, for pruning's train.keep_best); times its saves for the Stopper."""

    def __init__(self, cfg, engine, log: MetricsLog):
        self.cfg, self.engine, self.log, self.longest_save = cfg, engine, log, 0.0

    def maybe_save(self, state: TrainState, last: bool, val_loss=None) -> None:
        if state.step % self.cfg.train.ckpt_every == 0 or last:
            start = time.time()
            self.log.echo(f"checkpoint {checkpoint.save(self.engine, self.cfg, state, val_loss=val_loss)}")
            self.longest_save = max(self.longest_save, time.time() - start)


@torch.no_grad()
def evaluate(engine, windows: torch.Tensor, micro: int, rank: int, world: int, eos_id=None) -> float:
    """Mean held-out token loss over all ranks (each rank runs the same number of forwards, as
    ZeRO-3 gathers parameters collectively)."""
    from llm.data import rank_batches

    engine.eval()
    total, count = 0.0, 0.0
    for batch, weight in rank_batches(windows, micro, rank, world):
        batch = batch.to(engine.device)
        _, ce = forward(engine, batch[:, :-1], eos_id, targets=batch[:, 1:])
        total += weight * ce.item() * batch[:, 1:].numel()
        count += weight * batch[:, 1:].numel()
    engine.train()
    total, count = distributed.all_reduce([total, count])
    return total / count


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:  # a diverged run's held-out loss
        return math.inf


class Evaluator:
    """Held-out loss and the attention products' ranks (all in telemetry.jsonl; layer means in the
    metrics) every train.eval_every steps, and at the end with eval.final; with train.keep_best,
    the held-out loss alone on the other checkpoint steps too (their commit records carry it)."""

    def __init__(self, cfg, engine, val_windows, telemetry: TelemetryLog, rank: int, world: int, eos_id):
        self.cfg, self.engine, self.val, self.telemetry = cfg, engine, val_windows, telemetry
        self.rank, self.world, self.eos_id = rank, world, eos_id

    def due(self, step: int, last: bool) -> bool:
        return step % self.cfg.train.eval_every == 0 or (last and self.cfg.eval.final)

    def held_out(self) -> dict:
        val_loss = evaluate(self.engine, self.val, self.cfg.train.micro_batch_size, self.rank, self.world,
                            self.eos_id)
        return {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}

    def run(self, step: int) -> dict:
        return {**self.held_out(), **self.telemetry.write(self.engine.module, step)}

    def maybe_eval(self, step: int, last: bool) -> dict:
        if self.due(step, last):
            return self.run(step)
        t = self.cfg.train
        return self.held_out() if t.keep_best and step % t.ckpt_every == 0 else {}


class Reporter:
    """Training metrics over the steps since the last log line (every logging.log_every steps and
    at the last; timed before any evaluation of the step), to metrics.jsonl, wandb and the console.
    Loss spikes (of rank 0's own loss, step by step) are echoed and counted in `loss_spikes`."""

    def __init__(self, cfg, engine, loader, schedule, log: MetricsLog, world: int):
        self.cfg, self.engine, self.loader, self.schedule = cfg, engine, loader, schedule
        self.log, self.world = log, world
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = peak_flops(cfg.logging.peak_flops)  # None on CPU: no MFU
        self.spikes = SpikeDetector(cfg.train.spike_window, cfg.train.spike_zscore)
        self._restart_window()

    def _restart_window(self) -> None:
        self.window_start, self.window_steps, self.ce_sum, self.z_sum = time.time(), 0, 0.0, 0.0
        self.window_spikes = 0

    def initial(self, metrics: dict) -> dict:
        """Log the evaluation before training (fresh runs with eval.final)."""
        self.log.write({"step": 0, **metrics})
        self.log.echo(f"step 0: held-out loss {metrics['val_loss']:.4f}")
        self._restart_window()
        return {"val_loss_start": metrics["val_loss"]}

    def maybe_summarize(self, step_done: int, last: bool, stats: dict) -> dict:
        """Add this step's losses to the window; its training metrics on log steps, else {}."""
        self.window_steps += 1
        self.ce_sum, self.z_sum = self.ce_sum + stats["ce"], self.z_sum + stats["z"]
        z = self.spikes.observe(stats["ce"])
        if z is not None:
            self.window_spikes += 1
            self.log.echo(f"loss spike at step {step_done}: loss {stats['ce']:.4f} is {z:.1f} std above the mean "
                          f"of the previous {self.cfg.train.spike_window} steps")
        self.log.progress(1, loss=f"{stats['last_ce']:.3f}")
        return self._train_record(step_done) if step_done % self.cfg.logging.log_every == 0 or last else {}

    def write(self, step_done: int, metrics: dict) -> dict:
        """Log a step's metrics (training and / or evaluation; nothing if empty); a training
        record also goes to the console and starts the next window. Returns it, or {}."""
        if metrics:
            self.log.write({"step": step_done, **metrics})
        if "loss" not in metrics:
            return {}
        self.log.echo(self._line(metrics))
        self._restart_window()
        return metrics

    def _train_record(self, step_done: int) -> dict:
        t, seq_len, n = self.cfg.train, self.cfg.data.seq_len, self.window_steps
        mean_ce, mean_z = distributed.all_reduce([self.ce_sum / n, self.z_sum / n])
        tokens_per_s = n * t.global_batch_size * seq_len / (time.time() - self.window_start)
        # the step just trained; the scheduler's count (DeepSpeed does not advance it on a skipped step)
        lr = self.cfg.optim.lr * self.schedule(self.engine.lr_scheduler.last_epoch - 1)
        record = {"step": step_done, "loss": mean_ce / self.world, "lr": lr,
                  "grad_norm": float(self.engine.get_global_grad_norm() or 0.0), "tokens_per_s": tokens_per_s,
                  "mfu": mfu(self.flops_per_token, tokens_per_s, self.peak, self.world),
                  "tokens": step_done * t.global_batch_size * seq_len}
        rewrite = self.loader.rewrite_stats()  # this rank's online Bi-Induct rewrites since the last log
        if rewrite:
            record.update(bi_induct_rate=self.loader.rate((step_done - 1) * t.global_batch_size),
                          bi_induct_token_fraction=rewrite["token_fraction"], bi_induct_snippets=rewrite["snippets"])
        if t.z_loss:
            record["z_loss"] = mean_z / self.world
        if self.window_spikes:
            record["loss_spikes"] = self.window_spikes
        return record

    def _line(self, r: dict) -> str:
        return (f"step {r['step']}/{self.cfg.train.max_steps} loss {r['loss']:.4f} lr {r['lr']:.2e} "
                f"grad_norm {r['grad_norm']:.3f} {r['tokens_per_s']:,.0f} tok/s"
                + (f" mfu {r['mfu']:.2%}" if r["mfu"] is not None else "")
                + (f" | held-out loss {r['val_loss']:.4f} ppl {r['val_ppl']:.2f}" if "val_loss" in r else ""))


@dataclass
class Run:
    """A set-up training job: the engine at its starting state and the objects the loop calls."""
    cfg: object
    engine: object
    loader: object
    state: TrainState
    accum: int
    eos_id: object  # int when data.doc_mask (documents end at EOS), else None
    rank: int
    world: int
    log: MetricsLog
    stopper: Stopper
    reporter: Reporter
    evaluator: Evaluator
    checkpointer: Checkpointer
    out_dir: str

    def micro_batch(self, step: int):
        """i -> this rank's (inputs, targets) of micro-step i of `step`."""
        return lambda i: self.loader.micro_batch(step, i, self.rank, self.world, self.cfg.train.micro_batch_size)


class Inputs(NamedTuple):
    """What a run reads, checked: the budget's account of max_steps, the training shards, their
    loader, the held-out windows, the checkpoint to resume (or None) and the weights to start from
    (train.init_from, or None)."""
    budget_info: dict
    train_data: object
    loader: object
    val_windows: torch.Tensor
    source: object
    init_state: dict


def _check_inputs(cfg) -> Inputs:
    """Everything that can be wrong with the inputs fails here, before the process group starts
    and the run directory is touched."""
    from llm.budget import resolve_max_steps
    from llm.data import TokenShards, WindowLoader, eval_windows

    _absolute_paths(cfg)
    t, d = cfg.train, cfg.data
    max_steps, budget_info = resolve_max_steps(cfg)
    OmegaConf.update(cfg, "train.max_steps", max_steps)
    train_data, val_data = TokenShards(d.path, "train"), TokenShards(d.path, "val")
    if train_data.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer of {d.path} has "
                          f"{train_data.vocab_size} tokens: set model.vocab_size={train_data.vocab_size}")
    loader = WindowLoader(train_data, d.seq_len, t.seed, t.global_batch_size, t.max_steps, d.bi_induct)
    val = eval_windows(val_data, d.seq_len, cfg.eval.windows)
    source = checkpoint.find_resume(cfg)
    if source:
        _check_continues(cfg, source)
    return Inputs(budget_info, train_data, loader, val, source, None if source else _init_state(cfg))


def _init_state(cfg):
    """The weights of train.init_from (a Llama / Qwen3 checkpoint directory) for this model, or None."""
    if cfg.train.init_from is None:
        return None
    from llm.export import load_hf_softmax

    try:
        return load_hf_softmax(cfg.train.init_from, cfg.model)
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.init_from={cfg.train.init_from}: {e}") from None


def _check_continues(cfg, source) -> None:
    """A resumed run must have steps left to train: the loop would otherwise do nothing, or run past
    a train.stop_at_step it never meets."""
    step, where = source.record["step"], os.path.join(source.ckpt_root, source.tag)
    if step > cfg.train.max_steps:
        raise ConfigError(f"train.max_steps={cfg.train.max_steps} is before the checkpoint's step {step} ({where}): "
                          f"raise train.max_steps, or resume an earlier checkpoint with train.resume=<tag directory>")
    if cfg.train.stop_at_step is not None and cfg.train.stop_at_step <= step:
        raise ConfigError(f"train.stop_at_step={cfg.train.stop_at_step} is not after the checkpoint's step {step} "
                          f"({where}): expected {step + 1}..train.max_steps")


def _absolute_paths(cfg) -> None:
    """Paths the config holds relative to this job's working directory, made absolute, so that the
    saved config (and the run directory with it) means the same from anywhere."""
    paths = ["data.path", "train.out_dir"] + ([] if cfg.train.resume in ("none", "auto") else ["train.resume"])
    for key in paths:
        OmegaConf.update(cfg, key, os.path.abspath(OmegaConf.select(cfg, key)))


def _write_run_dir(cfg, out_dir: str, group_rows: list, train_data) -> None:
    """config.yaml, param_groups.json and a copy of the data's tokenizer: the run directory alone
    is enough to generate, evaluate and export."""
    from llm.data.shards import TOKENIZER_FILE, copy_file, tokenizer_path

    os.makedirs(out_dir, exist_ok=True)
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    copy_file(tokenizer_path(cfg.data.path, train_data.meta), os.path.join(out_dir, TOKENIZER_FILE))
    with open(os.path.join(out_dir, "param_groups.json"), "w") as f:
        json.dump(group_rows, f, indent=1)


def _announce(run: Run, model, group_rows: list, budget_info: dict, source) -> None:
    t = run.cfg.train
    run.log.echo(f"model: {model.num_params() / 1e6:.2f}M non-embedding params, layers "
                 f"{[b.mixer.name for b in model.blocks]}; {run.world} rank(s), grad accumulation {run.accum}, "
                 f"ZeRO-{t.zero_stage}, {resolve_dtype(t)}; steps {run.state.step}->{t.max_steps}"
                 + (f" (from budget: {budget_info})" if budget_info else ""))
    for g in group_rows:
        run.log.echo(f"  param group {g['name']:<12} {g['params']:>10,d} params  wd {g['weight_decay']:g}  lr {g['lr']:g}")
    if source:
        run.log.echo(source.describe(run.state.step))
    elif t.init_from:
        run.log.echo(f"initialized from {t.init_from}")
    if run.stopper.limit:
        run.log.echo(f"time limit: {run.stopper.limit}, {run.stopper.deadline - time.time():.0f} s from now")


def setup(cfg, job_start: float, stop: StopSignal) -> Run:
    """Check the inputs, start the process group, build the engine, resume, write the run directory."""
    from llm.model import build_model

    inputs = _check_inputs(cfg)
    source, train_data, loader = inputs.source, inputs.train_data, inputs.loader
    t, d = cfg.train, cfg.data
    distributed.init(t.dist_timeout)
    rank, world = distributed.rank(), distributed.world_size()
    checkpoint.prepare_reshard(source, rank, world)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model)
    if inputs.init_state is not None:
        model.load_state_dict(inputs.init_state)
    reshard = bool(source and source.reshard)
    engine, group_rows, schedule = build_engine(cfg, model, world, t.max_steps, load_universal=reshard)
    state = checkpoint.resume(engine, source, cfg) if source else TrainState()
    out_dir = os.path.abspath(t.out_dir)
    if rank == 0:
        _write_run_dir(cfg, out_dir, group_rows, train_data)
    log = MetricsLog(cfg, out_dir, state.step, t.max_steps, active=rank == 0)
    telemetry = TelemetryLog(out_dir, state.step, active=rank == 0)
    eos_id = train_data.eos_id if d.doc_mask else None
    run = Run(cfg=cfg, engine=engine, loader=loader, state=state, accum=engine.gradient_accumulation_steps(),
              eos_id=eos_id, rank=rank, world=world, log=log,
              stopper=Stopper(cfg, job_start, stop, rank, NonFiniteGuard(t.skip_nonfinite, engine, log)),
              reporter=Reporter(cfg, engine, loader, schedule, log, world),
              evaluator=Evaluator(cfg, engine, inputs.val_windows, telemetry, rank, world, eos_id),
              checkpointer=Checkpointer(cfg, engine, log), out_dir=out_dir)
    _announce(run, model, group_rows, inputs.budget_info, source)
    return run


def train(cfg) -> dict:
    job_start, stop = time.time(), StopSignal()  # a preemption signal during setup still counts
    distributed.prepare_env()
    with RunLock(cfg.train.out_dir, active=os.environ["RANK"] == "0"):  # before anything is written there
        return _loop(cfg, setup(cfg, job_start, stop))


def _loop(cfg, run: Run) -> dict:
    result = {"start_step": run.state.step}
    if run.state.step == 0 and cfg.eval.final:
        result.update(run.reporter.initial(run.evaluator.run(0)))
    stop_reason = None
    for step in range(run.state.step, cfg.train.max_steps):
        step_start = time.time()
        stats = train_step(run.engine, run.micro_batch(step), run.accum, cfg.train.z_loss, run.eos_id)
        run.state = TrainState.at(step + 1, cfg.train.global_batch_size)
        stop_reason = run.stopper.reason(run.state.step, time.time() - step_start, run.checkpointer.longest_save,
                                         stats)
        last = run.state.step == cfg.train.max_steps or stop_reason is not None
        metrics = run.reporter.maybe_summarize(run.state.step, last, stats)
        if isinstance(stop_reason, Diverged):
            run.reporter.write(run.state.step, metrics)
            break  # no evaluation or checkpoint of a non-finite state
        metrics.update(run.evaluator.maybe_eval(run.state.step, last))
        result.update(run.reporter.write(run.state.step, metrics))
        run.checkpointer.maybe_save(run.state, last, metrics.get("val_loss"))
        if stop_reason:
            run.log.echo(f"stopping at step {run.state.step}: {stop_reason}; resume with train.resume=auto")
            break
    return _finish(run, result, stop_reason)


def _finish(run: Run, result: dict, stop_reason) -> dict:
    failed = isinstance(stop_reason, Diverged)
    if failed:
        run.log.echo(f"stopping at step {run.state.step}: {stop_reason}")
    run.log.close()
    result.update(step=run.state.step, stopped=stop_reason, out_dir=run.out_dir)
    if run.rank == 0 and "val_loss" in result and not failed:
        print(f"final held-out loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f} "
              f"(step {run.state.step}, run dir {run.out_dir})", flush=True)
    distributed.teardown()
    if failed:  # on every rank: the job exits non-zero
        raise Diverged(f"step {run.state.step}: {stop_reason}; {_rollback_hint(run.cfg)}")
    return result


def _rollback_hint(cfg) -> str:
    root = checkpoint.ckpt_root(cfg)
    tag = checkpoint.find_latest(root)
    if tag is None:
        return "no checkpoint of this run was committed"
    return (f"no checkpoint of this state was saved; the newest is {os.path.join(root, tag)}: continue from it "
            f"with a lower learning rate, e.g. train.resume=auto optim.lr={cfg.optim.lr / 10:g}")
