"""The training loop: a DeepSpeed engine (even for one process), fixed global batch, resumable.

One optimizer step consumes global samples [step * G, (step + 1) * G) of the data stream, split
over ranks and micro-steps, so any rank count trains the same steps; gradient accumulation is
G / (micro_batch_size * world_size). Checkpoints carry that position, the RNG states and the
config, and `train.resume=auto` continues a run exactly where its last checkpoint left it.
"""
import json
import logging
import math
import os
import random
import signal
import time

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from llm import checkpoint, distributed
from llm.config import ConfigError, save_config
from llm.files import write_atomic
from llm.flops import peak_flops, train_flops_per_token
from llm.optim import describe_groups, lr_schedule, param_groups
from llm.telemetry import TelemetryLog


def lm_loss(logits, targets, z_loss: float = 0.0):
    """(loss to optimize, cross-entropy): mean next-token CE plus z_loss * mean logsumexp^2."""
    logits = logits.float().flatten(0, 1)
    ce = F.cross_entropy(logits, targets.flatten())
    if not z_loss:
        return ce, ce
    return ce + z_loss * torch.logsumexp(logits, dim=-1).pow(2).mean(), ce


def ds_config(cfg, world: int, dtype: str) -> dict:
    t, o = cfg.train, cfg.optim
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size "
            f"({t.micro_batch_size}) x data-parallel ranks ({world})")
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // per_step,
        "gradient_clipping": o.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            "torch_adam": True, "adam_w_mode": True}},
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": dtype == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": False},
    }


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class StopSignal:
    """SIGTERM / SIGUSR1 (preemption) ask every rank to checkpoint at the next step boundary."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


class MetricsLog:
    """Rank 0: JSONL metrics file, console progress bar, wandb (offline unless configured)."""

    def __init__(self, cfg, out_dir: str, start_step: int, max_steps: int, active: bool):
        self.active, self.path = active, os.path.join(out_dir, "metrics.jsonl")
        self.bar = self.wandb = None
        if not active:
            return
        self._truncate_after(start_step)
        if cfg.logging.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if cfg.logging.wandb != "disabled":
            import wandb
            self.wandb = wandb.init(project=cfg.logging.project, name=cfg.logging.run_name,
                                    dir=out_dir, mode=cfg.logging.wandb, resume="allow",
                                    config=OmegaConf.to_container(cfg, resolve=True))

    def _truncate_after(self, step: int) -> None:
        """Drop records a crashed run logged past the checkpoint we resume from."""
        if not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        write_atomic(self.path, "".join(keep))

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def echo(self, text: str) -> None:
        if self.active:
            if self.bar is not None:
                self.bar.write(text)
            else:
                print(text, flush=True)

    def progress(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


@torch.no_grad()
def evaluate(engine, windows: torch.Tensor, micro: int, rank: int, world: int) -> float:
    """Mean held-out token loss over all ranks (each rank runs the same number of forwards, as
    ZeRO-3 gathers parameters collectively)."""
    from llm.data import rank_batches

    engine.eval()
    total, count = 0.0, 0.0
    for batch, weight in rank_batches(windows, micro, rank, world):
        batch = batch.to(engine.device)
        _, ce = lm_loss(engine(batch[:, :-1]), batch[:, 1:])
        total += weight * ce.item() * batch[:, 1:].numel()
        count += weight * batch[:, 1:].numel()
    engine.train()
    total, count = distributed.all_reduce([total, count])
    return total / count


def _check_checkpoint_fits(cfg, ckpt_dir: str, tag: str) -> dict:
    """The checkpoint's commit record, once it is clear that the config can continue it."""
    saved = checkpoint.commit_record(ckpt_dir, tag)
    ours = {f"model.{k}": v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "kernels"}
    theirs = {f"model.{k}": v for k, v in saved["model"].items()}
    for key in ("global_batch_size", "zero_stage"):  # DeepSpeed cannot load another ZeRO stage's layout
        ours[f"train.{key}"], theirs[f"train.{key}"] = cfg.train[key], saved[key]
    diff = [f"{k}: checkpoint {theirs.get(k)!r} vs config {v!r}" for k, v in ours.items() if theirs.get(k) != v]
    if diff:
        raise ConfigError(f"checkpoint {os.path.join(ckpt_dir, tag)} does not fit the config ({', '.join(diff)})")
    return saved


def _load_universal(engine, ckpt_dir: str, tag: str) -> dict:
    """engine.load_checkpoint of a universal checkpoint; returns the client state.

    DeepSpeed 0.19's ZeRO-3 universal load gives every param group the first one's hyperparameters
    (weight decay, lr) and all of them one shared Adam step tensor, which each group's update then
    advances: put back each group's own hyperparameters, at the resumed schedule's lr, and step."""
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    _, client = engine.load_checkpoint(ckpt_dir, tag)
    for g, ours, lr in zip(engine.optimizer.param_groups, hyper, engine.lr_scheduler.get_last_lr()):
        g.update(ours, lr=lr)
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    return client


def train(cfg) -> dict:
    job_start, stop = time.time(), StopSignal()  # a preemption signal during setup still counts
    distributed.prepare_env()
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    from llm.budget import resolve_max_steps
    from llm.data import TokenShards, WindowLoader, eval_windows
    from llm.model import build_model

    ds_logger.setLevel(logging.WARNING)
    t, d = cfg.train, cfg.data
    # Everything that can be wrong with the inputs fails here, before the run directory is touched.
    max_steps, budget_info = resolve_max_steps(cfg)
    OmegaConf.update(cfg, "train.max_steps", max_steps)
    train_data, val_data = TokenShards(d.path, "train"), TokenShards(d.path, "val")
    if train_data.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer of {d.path} has "
                          f"{train_data.vocab_size} tokens: set model.vocab_size={train_data.vocab_size}")
    out_dir = os.path.abspath(t.out_dir)
    ckpt_root = os.path.join(out_dir, "checkpoints")
    resume_from = checkpoint.resolve_resume(t.resume, ckpt_root)
    if resume_from is None and t.resume == "none" and checkpoint.complete_tags(ckpt_root):
        raise ConfigError(f"train.out_dir={t.out_dir} already holds checkpoints: continue it with "
                          f"train.resume=auto, or choose another train.out_dir")
    if resume_from:
        saved = _check_checkpoint_fits(cfg, *resume_from)

    distributed.init(t.dist_timeout)
    rank, world = distributed.rank(), distributed.world_size()
    dtype = t.dtype if t.dtype != "auto" else ("bf16" if torch.cuda.is_available() else "fp32")
    config = ds_config(cfg, world, dtype)
    accum = config["gradient_accumulation_steps"]
    if resume_from:
        load_from, reshard = resume_from, saved["world_size"] != world
        if reshard:  # DeepSpeed loads another layout only from its universal format (rank 0 converts once)
            if rank == 0:
                checkpoint.to_universal(*resume_from)
            torch.distributed.barrier()
            load_from = (resume_from[0], resume_from[1] + checkpoint.UNIVERSAL)
            config["checkpoint"]["load_universal"] = True
    # Stop early enough for a few more steps and a checkpoint before the earliest time limit:
    # train.time_limit, or the Slurm job's end (asked once, by rank 0; the stop flag is all-reduced).
    limits = {f"train.time_limit={t.time_limit}s": job_start + t.time_limit} if t.time_limit else {}
    slurm_left = distributed.slurm_time_left() if rank == 0 else None
    if slurm_left is not None:
        limits["the Slurm job's time limit"] = time.time() + slurm_left
    time_limit, deadline = min(limits.items(), key=lambda kv: kv[1], default=(None, math.inf))

    torch.manual_seed(t.seed)
    model = build_model(cfg.model)
    groups = param_groups(model, cfg.optim)
    group_rows = describe_groups(groups, cfg.optim)  # before the scheduler scales the group LRs
    schedule = lr_schedule(cfg.optim, max_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))

    start_step = 0
    if resume_from:
        client = _load_universal(engine, *load_from) if reshard else engine.load_checkpoint(*load_from)[1]
        start_step = client["global_sample"] // t.global_batch_size
        _set_rng_state(client["rng"])
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        save_config(cfg, os.path.join(out_dir, "config.yaml"))
        with open(os.path.join(out_dir, "param_groups.json"), "w") as f:
            json.dump(group_rows, f, indent=1)

    loader = WindowLoader(train_data, d.seq_len, t.seed, t.global_batch_size, max_steps, d.bi_induct)
    val = eval_windows(val_data, d.seq_len, cfg.eval.windows)
    flops_per_token = train_flops_per_token(cfg.model, d.seq_len)
    peak = peak_flops(cfg.logging.peak_flops)
    log = MetricsLog(cfg, out_dir, start_step, max_steps, active=rank == 0)
    telemetry = TelemetryLog(out_dir, start_step, active=rank == 0)
    log.echo(f"model: {model.num_params() / 1e6:.2f}M non-embedding params, layers "
             f"{[b.mixer.name for b in model.blocks]}; {world} rank(s), grad accumulation {accum}, "
             f"ZeRO-{t.zero_stage}, {dtype}; steps {start_step}->{max_steps}"
             + (f" (from budget: {budget_info})" if budget_info else ""))
    for g in group_rows:
        log.echo(f"  param group {g['name']:<12} {g['params']:>10,d} params  wd {g['weight_decay']:g}  lr {g['lr']:g}")
    if resume_from:
        log.echo(f"resumed from {os.path.join(*load_from)} at step {start_step}"
                 + (f" (saved by {saved['world_size']} ranks)" if reshard else ""))
    if time_limit:
        log.echo(f"time limit: {time_limit}, {deadline - time.time():.0f} s from now")

    def save(step_done: int) -> None:
        client = {"step": step_done, "global_sample": step_done * t.global_batch_size,
                  "global_batch_size": t.global_batch_size, "rng": _rng_state(),
                  "config": OmegaConf.to_container(cfg, resolve=True)}
        record = {"zero_stage": t.zero_stage, "global_batch_size": t.global_batch_size,
                  "model": OmegaConf.to_container(cfg.model, resolve=True)}
        tag = checkpoint.save(engine, ckpt_root, step_done, client, t.keep_last, record)
        log.echo(f"checkpoint {tag}")

    def eval_metrics(step_done: int) -> dict:
        """Held-out loss and the attention products' ranks (all in telemetry.jsonl; layer means here)."""
        val_loss = evaluate(engine, val, t.micro_batch_size, rank, world)
        return {"val_loss": val_loss, "val_ppl": math.exp(val_loss), **telemetry.write(engine.module, step_done)}

    result = {"start_step": start_step}
    if start_step == 0 and cfg.eval.final:
        metrics = eval_metrics(0)
        result["val_loss_start"] = metrics["val_loss"]
        log.write({"step": 0, **metrics})
        log.echo(f"step 0: held-out loss {result['val_loss_start']:.4f}")

    window_start = time.time()
    longest_step, longest_save, window_steps, loss_sum, z_sum = 0.0, 0.0, 0, 0.0, 0.0
    step_done = start_step
    stop_reason = None
    for step in range(start_step, max_steps):
        step_start = time.time()
        lr = cfg.optim.lr * schedule(step)
        for micro in range(accum):
            x, y = loader.micro_batch(step, micro, rank, world, t.micro_batch_size)
            logits = engine(x.to(engine.device))
            loss, ce = lm_loss(logits, y.to(engine.device), t.z_loss)
            engine.backward(loss)
            engine.step()
            loss_sum += ce.item() / accum
            z_sum += (loss - ce).item() / accum  # the z-loss term, 0 unless train.z_loss
        step_done, window_steps = step + 1, window_steps + 1
        longest_step = max(longest_step, time.time() - step_start)
        log.progress(1, loss=f"{ce.item():.3f}")

        flags = [float(stop.received is not None),
                 float(time.time() + 3 * longest_step + longest_save > deadline)]
        signalled, out_of_time = distributed.all_reduce(flags, op="max")
        if step_done == t.stop_at_step:
            stop_reason = f"train.stop_at_step={t.stop_at_step}"
        elif signalled:
            stop_reason = "signal " + (stop.received or "on another rank")
        elif out_of_time:
            stop_reason = time_limit or "a time limit on rank 0"
        last = step_done == max_steps or stop_reason is not None

        if step_done % cfg.logging.log_every == 0 or last:
            elapsed = time.time() - window_start
            mean_loss, mean_z = distributed.all_reduce([loss_sum / window_steps, z_sum / window_steps])
            tokens_per_s = window_steps * t.global_batch_size * d.seq_len / elapsed
            record = {"step": step_done, "loss": mean_loss / world, "lr": lr,
                      "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                      "tokens_per_s": tokens_per_s,
                      "mfu": flops_per_token * tokens_per_s / (peak * world),
                      "tokens": step_done * t.global_batch_size * d.seq_len}
            rewrite = loader.rewrite_stats()  # this rank's online Bi-Induct rewrites since the last log
            if rewrite:
                record.update(bi_induct_rate=loader.rate(step * t.global_batch_size),
                              bi_induct_token_fraction=rewrite["token_fraction"],
                              bi_induct_snippets=rewrite["snippets"])
            if t.z_loss:
                record["z_loss"] = mean_z / world
            if step_done % t.eval_every == 0 or (last and cfg.eval.final):
                record.update(eval_metrics(step_done))
            log.write(record)
            log.echo(f"step {step_done}/{max_steps} loss {record['loss']:.4f} lr {lr:.2e} "
                     f"grad_norm {record['grad_norm']:.3f} {tokens_per_s:,.0f} tok/s mfu {record['mfu']:.2%}"
                     + (f" | held-out loss {record['val_loss']:.4f} ppl {record['val_ppl']:.2f}"
                        if "val_loss" in record else ""))
            result.update(record)
            window_start, window_steps, loss_sum, z_sum = time.time(), 0, 0.0, 0.0
        elif step_done % t.eval_every == 0:
            log.write({"step": step_done, **eval_metrics(step_done)})

        if step_done % t.ckpt_every == 0 or last:
            save_start = time.time()
            save(step_done)
            longest_save = max(longest_save, time.time() - save_start)
        if stop_reason:
            log.echo(f"stopping at step {step_done}: {stop_reason}; resume with train.resume=auto")
            break

    log.close()
    result.update(step=step_done, stopped=stop_reason, out_dir=out_dir)
    if rank == 0 and "val_loss" in result:
        print(f"final held-out loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f} "
              f"(step {step_done}, run dir {out_dir})", flush=True)
    distributed.teardown()
    return result
