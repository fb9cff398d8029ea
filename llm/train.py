"""The training loop: a DeepSpeed engine (even for one process), fixed global batch, resumable.

One optimizer step consumes global samples [step * G, (step + 1) * G) of the data stream, split
over ranks and micro-steps, so any rank count trains the same steps; gradient accumulation is
G / (micro_batch_size * world_size). Checkpoints carry that position, the RNG states and the
config, and `train.resume=auto` continues a run exactly where its last checkpoint left it.

`setup` checks the inputs, builds the engine and resumes into a `Run`; `train` is the loop, where
each concern (stopping, logging, evaluation, checkpoints) is one object that decides for itself
whether this step is its turn.
"""
import json
import math
import os
import signal
import time
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from llm import checkpoint, distributed
from llm.checkpoint import TrainState
from llm.config import ConfigError, save_config
from llm.engine import build_engine, forward, lm_loss, resolve_dtype, train_step
from llm.flops import mfu, peak_flops, train_flops_per_token
from llm.logs import MetricsLog
from llm.telemetry import TelemetryLog


class StopSignal:
    """SIGTERM / SIGUSR1 (preemption) ask every rank to checkpoint at the next step boundary."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


class Stopper:
    """Whether this job ends after a step: train.stop_at_step, a signal on any rank, or too little
    time left for a few more steps and a checkpoint before the earliest time limit
    (train.time_limit, or the Slurm job's end, asked once by rank 0; the flags are all-reduced)."""

    def __init__(self, cfg, job_start: float, stop: StopSignal, rank: int):
        self.stop_at, self.signal, self.longest_step = cfg.train.stop_at_step, stop, 0.0
        limits = {f"train.time_limit={cfg.train.time_limit}s": job_start + cfg.train.time_limit} \
            if cfg.train.time_limit else {}
        slurm_left = distributed.slurm_time_left() if rank == 0 else None
        if slurm_left is not None:
            limits["the Slurm job's time limit"] = time.time() + slurm_left
        self.limit, self.deadline = min(limits.items(), key=lambda kv: kv[1], default=(None, math.inf))

    def reason(self, step_done: int, step_seconds: float, save_seconds: float):
        """Why to stop after `step_done` (collective: every rank calls it each step), or None."""
        self.longest_step = max(self.longest_step, step_seconds)
        flags = [float(self.signal.received is not None),
                 float(time.time() + 3 * self.longest_step + save_seconds > self.deadline)]
        signalled, out_of_time = distributed.all_reduce(flags, op="max")
        if step_done == self.stop_at:
            return f"train.stop_at_step={self.stop_at}"
        if signalled:
            return "signal " + (self.signal.received or "on another rank")
        if out_of_time:
            return self.limit or "a time limit on rank 0"
        return None


class Checkpointer:
    """Saves every train.ckpt_every steps and at the last step; times its saves for the Stopper."""

    def __init__(self, cfg, engine, log: MetricsLog):
        self.cfg, self.engine, self.log, self.longest_save = cfg, engine, log, 0.0

    def maybe_save(self, state: TrainState, last: bool) -> None:
        if state.step % self.cfg.train.ckpt_every == 0 or last:
            start = time.time()
            self.log.echo(f"checkpoint {checkpoint.save(self.engine, self.cfg, state)}")
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
        _, ce = lm_loss(forward(engine, batch[:, :-1], eos_id), batch[:, 1:])
        total += weight * ce.item() * batch[:, 1:].numel()
        count += weight * batch[:, 1:].numel()
    engine.train()
    total, count = distributed.all_reduce([total, count])
    return total / count


class Evaluator:
    """Held-out loss and the attention products' ranks (all in telemetry.jsonl; layer means in the
    metrics) every train.eval_every steps, and at the end with eval.final."""

    def __init__(self, cfg, engine, val_windows, telemetry: TelemetryLog, rank: int, world: int, eos_id):
        self.cfg, self.engine, self.val, self.telemetry = cfg, engine, val_windows, telemetry
        self.rank, self.world, self.eos_id = rank, world, eos_id

    def due(self, step: int, last: bool) -> bool:
        return step % self.cfg.train.eval_every == 0 or (last and self.cfg.eval.final)

    def run(self, step: int) -> dict:
        val_loss = evaluate(self.engine, self.val, self.cfg.train.micro_batch_size, self.rank, self.world,
                            self.eos_id)
        return {"val_loss": val_loss, "val_ppl": math.exp(val_loss), **self.telemetry.write(self.engine.module, step)}

    def maybe_eval(self, step: int, last: bool) -> dict:
        return self.run(step) if self.due(step, last) else {}


class Reporter:
    """Training metrics over the steps since the last log line (every logging.log_every steps and
    at the last; timed before any evaluation of the step), to metrics.jsonl, wandb and the console."""

    def __init__(self, cfg, engine, loader, schedule, log: MetricsLog, world: int):
        self.cfg, self.engine, self.loader, self.schedule = cfg, engine, loader, schedule
        self.log, self.world = log, world
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = peak_flops(cfg.logging.peak_flops)  # None on CPU: no MFU
        self._restart_window()

    def _restart_window(self) -> None:
        self.window_start, self.window_steps, self.ce_sum, self.z_sum = time.time(), 0, 0.0, 0.0

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
        lr = self.cfg.optim.lr * self.schedule(step_done - 1)  # the step just trained
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


def _check_inputs(cfg):
    """Everything that can be wrong with the inputs fails here, before the run directory is
    touched: (budget info, train shards, val shards, the checkpoint to resume or None)."""
    from llm.budget import resolve_max_steps
    from llm.data import TokenShards

    _absolute_paths(cfg)
    max_steps, budget_info = resolve_max_steps(cfg)
    OmegaConf.update(cfg, "train.max_steps", max_steps)
    train_data, val_data = TokenShards(cfg.data.path, "train"), TokenShards(cfg.data.path, "val")
    if train_data.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer of {cfg.data.path} has "
                          f"{train_data.vocab_size} tokens: set model.vocab_size={train_data.vocab_size}")
    return budget_info, train_data, val_data, checkpoint.find_resume(cfg)


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
    if run.stopper.limit:
        run.log.echo(f"time limit: {run.stopper.limit}, {run.stopper.deadline - time.time():.0f} s from now")


def setup(cfg, job_start: float, stop: StopSignal) -> Run:
    """Check the inputs, start the process group, build the engine, resume, write the run directory."""
    from llm.data import WindowLoader, eval_windows
    from llm.model import build_model

    budget_info, train_data, val_data, source = _check_inputs(cfg)
    t, d = cfg.train, cfg.data
    distributed.init(t.dist_timeout)
    rank, world = distributed.rank(), distributed.world_size()
    checkpoint.prepare_reshard(source, rank, world)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model)
    reshard = bool(source and source.reshard)
    engine, group_rows, schedule = build_engine(cfg, model, world, t.max_steps, load_universal=reshard)
    state = checkpoint.resume(engine, source) if source else TrainState()
    out_dir = os.path.abspath(t.out_dir)
    if rank == 0:
        _write_run_dir(cfg, out_dir, group_rows, train_data)
    loader = WindowLoader(train_data, d.seq_len, t.seed, t.global_batch_size, t.max_steps, d.bi_induct)
    log = MetricsLog(cfg, out_dir, state.step, t.max_steps, active=rank == 0)
    telemetry = TelemetryLog(out_dir, state.step, active=rank == 0)
    val = eval_windows(val_data, d.seq_len, cfg.eval.windows)
    eos_id = train_data.eos_id if d.doc_mask else None
    run = Run(cfg=cfg, engine=engine, loader=loader, state=state, accum=engine.gradient_accumulation_steps(),
              eos_id=eos_id, rank=rank, world=world, log=log, stopper=Stopper(cfg, job_start, stop, rank),
              reporter=Reporter(cfg, engine, loader, schedule, log, world),
              evaluator=Evaluator(cfg, engine, val, telemetry, rank, world, eos_id),
              checkpointer=Checkpointer(cfg, engine, log), out_dir=out_dir)
    _announce(run, model, group_rows, budget_info, source)
    return run


def train(cfg) -> dict:
    job_start, stop = time.time(), StopSignal()  # a preemption signal during setup still counts
    distributed.prepare_env()
    run = setup(cfg, job_start, stop)
    result = {"start_step": run.state.step}
    if run.state.step == 0 and cfg.eval.final:
        result.update(run.reporter.initial(run.evaluator.run(0)))
    stop_reason = None
    for step in range(run.state.step, cfg.train.max_steps):
        step_start = time.time()
        stats = train_step(run.engine, run.micro_batch(step), run.accum, cfg.train.z_loss, run.eos_id)
        run.state = TrainState.at(step + 1, cfg.train.global_batch_size)
        stop_reason = run.stopper.reason(run.state.step, time.time() - step_start, run.checkpointer.longest_save)
        last = run.state.step == cfg.train.max_steps or stop_reason is not None
        metrics = run.reporter.maybe_summarize(run.state.step, last, stats)
        metrics.update(run.evaluator.maybe_eval(run.state.step, last))
        result.update(run.reporter.write(run.state.step, metrics))
        run.checkpointer.maybe_save(run.state, last)
        if stop_reason:
            run.log.echo(f"stopping at step {run.state.step}: {stop_reason}; resume with train.resume=auto")
            break
    return _finish(run, result, stop_reason)


def _finish(run: Run, result: dict, stop_reason) -> dict:
    run.log.close()
    result.update(step=run.state.step, stopped=stop_reason, out_dir=run.out_dir)
    if run.rank == 0 and "val_loss" in result:
        print(f"final held-out loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f} "
              f"(step {run.state.step}, run dir {run.out_dir})", flush=True)
    distributed.teardown()
    return result
