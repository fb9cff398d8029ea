"""Checkpoints: DeepSpeed's sharded files plus our own commit protocol, resharding, consolidated loading.

This module owns the commit record (`complete.json`: written by `save`, read by `commit_record`)
and the client state (`TrainState` plus RNG states and the resolved config): `save(engine, cfg,
state)` writes both; `find_resume(cfg)` picks and checks the checkpoint to continue,
`prepare_reshard` converts it for another world size, and `resume(engine, source)` loads it and
returns the `TrainState`.

Layout under `<out_dir>/checkpoints/`: one directory per tag (`step_00000100`), written by
DeepSpeed on every rank; once all ranks are done, rank 0 writes `<tag>/complete.json` (the commit
record: step, world size, ZeRO stage, global batch, model config and the step's held-out loss)
and then atomically replaces `latest`. Pruning keeps the newest train.keep_last complete tags and,
with train.keep_best, the newest one of the lowest held-out loss. A crash mid-save leaves a tag without `complete.json`, which `find_latest` ignores, so
`train.resume=auto` always lands on a whole checkpoint.

Resuming on another world size goes through DeepSpeed's universal format, converted once into
`<tag>_universal` (next to its tag, pruned with it; never a tag itself, as it has no complete.json):
automatically by `train`, or ahead of time with `python -m llm convert RUN_DIR [--tag TAG]`.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass

import numpy as np
import torch
from omegaconf import OmegaConf

from llm.config import ConfigError
from llm.files import atomic_path, write_atomic

COMPLETE = "complete.json"
UNIVERSAL = "_universal"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(ckpt_root: str) -> list[str]:
    """Tags with a completion marker, oldest first."""
    tags = [os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(ckpt_root, "*", COMPLETE))]
    return sorted(tags)


def find_latest(ckpt_root: str):
    """The newest complete tag, or None. `latest` is trusted only if it names a complete tag."""
    tags = complete_tags(ckpt_root)
    latest = os.path.join(ckpt_root, "latest")
    if os.path.isfile(latest):
        with open(latest, errors="replace") as f:
            tag = f.read().strip()
        if tag in tags:
            return tag
    return tags[-1] if tags else None


@dataclass
class TrainState:
    """Training progress: optimizer steps done and the data position, the global sample index
    (world-size independent: step * train.global_batch_size, as every step reads one global batch)."""
    step: int = 0
    global_sample: int = 0

    @classmethod
    def at(cls, step: int, global_batch_size: int) -> "TrainState":
        return cls(step, step * global_batch_size)


def ckpt_root(cfg) -> str:
    return os.path.join(os.path.abspath(cfg.train.out_dir), "checkpoints")


# --- the commit record (complete.json): written by `save`, read by `commit_record` -------------

def _commit_record(cfg, step: int, world_size: int, val_loss=None) -> dict:
    finite_val = val_loss if val_loss is not None and math.isfinite(val_loss) else None
    return {"step": step, "world_size": world_size, "zero_stage": cfg.train.zero_stage,
            "global_batch_size": cfg.train.global_batch_size,
            "model": OmegaConf.to_container(cfg.model, resolve=True), "val_loss": finite_val}


def commit_record(ckpt_root: str, tag: str) -> dict:
    """The `complete.json` of a tag: step, world_size, zero_stage, global_batch_size, model, and
    val_loss (the held-out loss at that step; null, or absent in older records, if not measured)."""
    with open(os.path.join(ckpt_root, tag, COMPLETE)) as f:
        return json.load(f)


def check_fits(cfg, ckpt_dir: str, tag: str) -> dict:
    """The checkpoint's commit record, once it is clear that the config can continue it."""
    saved = commit_record(ckpt_dir, tag)
    ours = {f"model.{k}": v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "kernels"}
    theirs = {f"model.{k}": v for k, v in saved["model"].items()}
    for key in ("global_batch_size", "zero_stage"):  # DeepSpeed cannot load another ZeRO stage's layout
        ours[f"train.{key}"], theirs[f"train.{key}"] = cfg.train[key], saved[key]
    diff = [f"{k}: checkpoint {theirs.get(k)!r} vs config {v!r}" for k, v in ours.items() if theirs.get(k) != v]
    if diff:
        raise ConfigError(f"checkpoint {os.path.join(ckpt_dir, tag)} does not fit the config ({', '.join(diff)})")
    return saved


# --- RNG states (in client_state) ---------------------------------------------------------------

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


# --- save and resume ------------------------------------------------------------------------------

def save(engine, cfg, state: TrainState, val_loss=None) -> str:
    """Save on every rank; commit (complete.json, with the step's held-out loss if measured, then
    `latest`) on rank 0 once all ranks are done; then prune."""
    import torch.distributed as dist

    root, tag = ckpt_root(cfg), tag_for(state.step)
    client = {**asdict(state), "global_batch_size": cfg.train.global_batch_size, "rng": _rng_state(),
              "config": OmegaConf.to_container(cfg, resolve=True)}
    engine.save_checkpoint(root, tag=tag, client_state=client, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        record = _commit_record(cfg, state.step, dist.get_world_size(), val_loss)
        write_atomic(os.path.join(root, tag, COMPLETE), json.dumps(record, indent=1))
        write_atomic(os.path.join(root, "latest"), tag)
        prune(root, cfg.train.keep_last, cfg.train.keep_best)
    dist.barrier()
    return tag


def best_tag(ckpt_root: str):
    """The newest complete tag of the lowest held-out loss in its commit record, or None."""
    scored = [(record["val_loss"], tag) for tag in reversed(complete_tags(ckpt_root))
              if (record := commit_record(ckpt_root, tag)).get("val_loss") is not None]
    return min(scored, key=lambda vt: vt[0])[1] if scored else None  # min keeps the first: the newest


def prune(ckpt_root: str, keep_last: int, keep_best: bool) -> None:
    """Drop all complete tags (with their universal copies) but the newest `keep_last` and, with
    `keep_best`, the best (best_tag): a diverging run never prunes away its last good checkpoint."""
    tags = complete_tags(ckpt_root)
    keep = set(tags[-keep_last:]) | ({best_tag(ckpt_root)} if keep_best else set())
    for old in tags:
        if old not in keep:
            # The marker goes first, so a half-deleted tag is never taken for a checkpoint.
            os.remove(os.path.join(ckpt_root, old, COMPLETE))
            shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
            shutil.rmtree(os.path.join(ckpt_root, old + UNIVERSAL), ignore_errors=True)


@dataclass
class ResumeSource:
    """A complete checkpoint that fits the config, and how this world size loads it."""
    ckpt_root: str
    tag: str
    record: dict  # its commit record
    reshard: bool = False  # saved by another world size: load its universal copy
    changes: tuple = ()  # optimizer settings of the config that differ from the checkpoint's (set by resume)

    @property
    def load_tag(self) -> str:
        return self.tag + UNIVERSAL if self.reshard else self.tag

    def describe(self, step: int) -> str:
        return (f"resumed from {os.path.join(self.ckpt_root, self.load_tag)} at step {step}"
                + (f" (saved by {self.record['world_size']} ranks)" if self.reshard else "")
                + (f"; optimizer settings from the config, changed since the checkpoint: {', '.join(self.changes)}"
                   if self.changes else ""))


def find_resume(cfg):
    """The ResumeSource train.resume names (None for a fresh run), checked against the config.
    Needs no process group, so a bad resume fails before anything starts."""
    root = ckpt_root(cfg)
    found = resolve_resume(cfg.train.resume, root)
    if found is None and cfg.train.resume == "none" and complete_tags(root):
        raise ConfigError(f"train.out_dir={cfg.train.out_dir} already holds checkpoints: continue it with "
                          f"train.resume=auto, or choose another train.out_dir")
    return ResumeSource(*found, check_fits(cfg, *found)) if found else None


def prepare_reshard(source, rank: int, world: int) -> None:
    """DeepSpeed loads another world size's layout only from its universal format: rank 0 converts
    once (collective: every rank calls this after the process group is up)."""
    if source is None or source.record["world_size"] == world:
        return
    if rank == 0:
        to_universal(source.ckpt_root, source.tag)
    torch.distributed.barrier()
    source.reshard = True


def resume(engine, source: ResumeSource, cfg=None) -> TrainState:
    """Load the checkpoint into the engine (built with load_universal=source.reshard; the optimizer
    hyperparameters stay those it was built with: `cfg`'s, whose changes go to source.changes) and
    restore the RNG states; the training state to continue from."""
    client = _load_keeping_hyperparameters(engine, source.ckpt_root, source.load_tag)
    if cfg is not None:
        source.changes = tuple(optimizer_changes(client.get("config", {}), cfg))
    _set_rng_state(client["rng"])
    g = source.record["global_batch_size"]
    return TrainState(client["global_sample"] // g, client["global_sample"])


def _load_keeping_hyperparameters(engine, ckpt_dir: str, tag: str) -> dict:
    """engine.load_checkpoint, the optimizer's hyperparameters kept as the engine was built (from
    the config); returns the client state.

    DeepSpeed restores the saved param groups (lr, weight decay, betas, eps) and the LR scheduler's
    base LRs, so a resume with a lowered optim.lr would go on at the old one (and its ZeRO-3
    universal load even gives every group the first one's values and all of them one shared Adam
    step tensor). Each group gets back its own values, at its config peak LR times the config's
    schedule at the resumed step, and its own step tensor."""
    ours = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    _, client = engine.load_checkpoint(ckpt_dir, tag)
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [g["initial_lr"] for g in ours]
    lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for g, hyper, lr in zip(engine.optimizer.param_groups, ours, lrs):
        g.update(hyper, lr=lr)
    scheduler._last_lr = lrs
    for state in getattr(engine.optimizer, "optimizer", engine.optimizer).state.values():  # ZeRO-0: unwrapped
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    return client


def optimizer_changes(saved_config: dict, cfg) -> list[str]:
    """`key old -> new` for the optimizer settings (optim.*, and train.max_steps, the schedule's
    length) where the config differs from the checkpoint's."""
    def settings(config: dict) -> dict:
        def flat(node, prefix):
            if isinstance(node, dict):
                return {k: v for key, sub in node.items() for k, v in flat(sub, f"{prefix}.{key}").items()}
            return {prefix: node}
        return {**flat(config.get("optim", {}), "optim"), "train.max_steps": config.get("train", {}).get("max_steps")}
    if not saved_config:
        return []
    theirs, ours = settings(saved_config), settings(OmegaConf.to_container(cfg, resolve=True))
    return [f"{k} {theirs.get(k)!r} -> {v!r}" for k, v in ours.items() if theirs.get(k) != v]


def resolve_resume(resume: str, ckpt_root: str):
    """(dir, tag) to resume from for train.resume (none | auto | a tag directory), or None."""
    if resume == "none":
        return None
    if resume == "auto":
        tag = find_latest(ckpt_root)
        return (ckpt_root, tag) if tag else None
    path = os.path.abspath(resume.rstrip("/"))
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint (no {COMPLETE} in it)")
    return os.path.dirname(path), os.path.basename(path)


def to_universal(ckpt_root: str, tag: str) -> str:
    """DeepSpeed's universal (world-size-independent) copy of a tag, converted once; its tag name.

    The conversion writes into a temporary directory that is renamed when done, so an existing
    `<tag>_universal` is always whole."""
    from deepspeed.checkpoint import ds_to_universal

    out = os.path.join(ckpt_root, tag + UNIVERSAL)
    if not os.path.isdir(out):
        with atomic_path(out) as tmp:
            args = argparse.Namespace(  # ds_to_universal's command-line options
                input_folder=os.path.join(ckpt_root, tag), output_folder=tmp, num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True,
                inject_missing_state=True)  # ZeRO 1/2 checkpoints lack the universal info
            with contextlib.redirect_stdout(None):
                ds_to_universal.main(args)
            os.remove(os.path.join(ckpt_root, "latest_universal"))  # DeepSpeed's pointer, to the tmp name
    return tag + UNIVERSAL


def consolidated_state_dict(ckpt_dir: str, tag: str) -> dict:
    """Full fp32 model weights from a checkpoint written at any ZeRO stage and rank count."""
    tag_dir = os.path.join(ckpt_dir, tag)
    if glob.glob(os.path.join(tag_dir, "*_optim_states.pt")):  # ZeRO 1-3: fp32 master partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    states = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                        weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def _run_checkpoints(run_dir: str, tag: str = None):
    """(checkpoints dir, tag) of a run directory's newest (or given) complete checkpoint."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    if tag is None:
        tag = find_latest(ckpt_root)
        if tag is None:
            raise FileNotFoundError(f"{ckpt_root}: no complete checkpoint")
    elif not os.path.isfile(os.path.join(ckpt_root, tag, COMPLETE)):
        raise FileNotFoundError(f"{os.path.join(ckpt_root, tag)}: not a complete checkpoint "
                                f"(complete ones: {', '.join(complete_tags(ckpt_root)) or 'none'})")
    return ckpt_root, tag


def load_model(run_dir: str, tag: str = None):
    """(model, cfg) from a run directory's newest (or given) checkpoint, in eval mode on CPU."""
    from llm.config import load_config
    from llm.model import build_model

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{run_dir}: no config.yaml; expected a run directory made by `python -m llm train`")
    cfg = load_config(cfg_path)
    ckpt_root, tag = _run_checkpoints(run_dir, tag)
    model = build_model(cfg.model)
    model.load_state_dict(consolidated_state_dict(ckpt_root, tag))
    return model.eval(), cfg


def main(argv=None):
    """`python -m llm convert RUN_DIR [--tag TAG]`: write a checkpoint's universal copy ahead of a
    resume on another world size (which would otherwise convert it on start)."""
    p = argparse.ArgumentParser(prog="python -m llm convert", description=main.__doc__)
    p.add_argument("run_dir")
    p.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    a = p.parse_args(argv)
    ckpt_root, tag = _run_checkpoints(a.run_dir, a.tag)
    print(os.path.join(ckpt_root, to_universal(ckpt_root, tag)))
