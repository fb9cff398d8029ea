"""Checkpoints: DeepSpeed's sharded files plus our own commit protocol, resharding, consolidated loading.

This module owns the commit record (`complete.json`: written by `save`, read by `commit_record`)
and the client state (`TrainState` plus RNG states and the resolved config): `save(engine, cfg,
state)` writes both; `find_resume(cfg)` picks and checks the checkpoint to continue,
`prepare_reshard` converts it for another world size, and `resume(engine, source)` loads it and
returns the `TrainState`.

Layout under `<out_dir>/checkpoints/`: one directory per tag (`step_00000100`), written by
DeepSpeed on every rank; once all ranks are done, rank 0 writes `<tag>/complete.json` (the commit
record: step, world size, ZeRO stage, global batch, model config, the step's held-out loss and
every file's size and CRC-32) and then atomically replaces `latest` (kept for DeepSpeed's tools; we
read the newest complete tag instead). A crash mid-save leaves a tag without `complete.json`, which
`find_latest` ignores; a tag about to be rewritten loses its `complete.json` first;
`train.resume=auto` takes the newest tag whose files match their record (`verify`), saying which
newer ones it skipped and why. Pruning keeps the newest train.keep_last complete tags and, with
train.keep_best, the newest one of the lowest held-out loss.

Checkpoint files are pickles, and unpickling runs code: every file is first opened with
`torch.load(weights_only=True)` and the allowlist `safe_globals()` (the types DeepSpeed 0.19.8 writes
at ZeRO 0-3); anything else is refused, naming the file, unless the user trusts the checkpoint
(`train.trust_checkpoint=true`, `--trust-checkpoint`). Evaluation reads the model's weights from
`<tag>/consolidated.safetensors`, consolidated once from the shards of a verified tag.

Resuming on another world size goes through DeepSpeed's universal format, converted once into
`<tag>_universal` (next to its tag, pruned with it; never a tag itself, as it has no complete.json):
automatically by `train`, or ahead of time with `python -m llm convert RUN_DIR [--tag TAG]`.
"""
import argparse
import contextlib
import errno
import glob
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from omegaconf import OmegaConf

from llm import distributed
from llm.config import ConfigError
from llm.files import atomic_path, remove, write_atomic

COMPLETE = "complete.json"
UNIVERSAL = "_universal"
CONSOLIDATED = "consolidated.safetensors"  # the model's fp32 weights, cached in its tag by load_checkpoint
HASH_CHUNK = 16 << 20  # bytes read at a time for a checksum
LOW_SPACE = 16 << 20  # a save failing with less than this free on its filesystem ran out of space


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, verified or safely loaded."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(ckpt_root: str) -> list[str]:
    """Tags with a completion marker, oldest first."""
    tags = [os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(ckpt_root, "*", COMPLETE))]
    return sorted(tags)


def find_latest(ckpt_root: str):
    """The newest complete tag, or None. `latest` is not consulted: left pointing at an older tag
    (a run resumed from it), it must not hide a newer complete one."""
    tags = complete_tags(ckpt_root)
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
    val_loss (the held-out loss at that step; null, or absent in older records, if not measured) and
    files (path in the tag -> {"size", "crc32"}; absent in records written before checksums)."""
    with open(os.path.join(ckpt_root, tag, COMPLETE)) as f:
        return json.load(f)


def file_digest(path: str) -> dict:
    """{"size", "crc32"} of a file (zlib's CRC-32, 0.7 GB/s on one CPU core: it tells a damaged
    shard, no more is asked of it)."""
    size, crc = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            size, crc = size + len(chunk), zlib.crc32(chunk, crc)
    return {"size": size, "crc32": f"{crc:08x}"}


def _tag_files(tag_dir: str) -> list[str]:
    """The files DeepSpeed wrote into a tag (paths relative to it), sorted."""
    paths = (os.path.relpath(p, tag_dir) for p in glob.glob(os.path.join(tag_dir, "**"), recursive=True))
    return sorted(p for p in paths if os.path.isfile(os.path.join(tag_dir, p)) and p not in (COMPLETE, CONSOLIDATED))


def _digest_own_files(tag_dir: str, rank: int) -> dict:
    """Digests of the files this rank wrote (read back while still in its page cache): DeepSpeed
    names each rank's shards `[bf16_]zero_pp_rank_<R>_...`; rank 0 writes the others."""
    def writer(name):
        m = re.match(r"(?:bf16_)?zero_pp_rank_(\d+)_", os.path.basename(name))
        return int(m.group(1)) if m else 0
    return {name: file_digest(os.path.join(tag_dir, name)) for name in _tag_files(tag_dir) if writer(name) == rank}


def verify(ckpt_root: str, tag: str):
    """Why a complete tag's files do not match its commit record (missing, another size, another
    checksum), or None when they do (or it is a record from before checksums, with no files)."""
    tag_dir = os.path.join(ckpt_root, tag)
    try:
        files = commit_record(ckpt_root, tag).get("files", {})
    except (OSError, ValueError) as e:
        return f"unreadable {os.path.join(tag_dir, COMPLETE)} ({e})"
    for name, recorded in files.items():
        path = os.path.join(tag_dir, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != recorded["size"]:
            return f"{path} has {os.path.getsize(path)} bytes, its commit record says {recorded['size']}"
        actual = file_digest(path)["crc32"]
        if actual != recorded["crc32"]:
            return f"{path} has checksum {actual}, its commit record says {recorded['crc32']} (corrupted)"
    return None


def newest_verified(ckpt_root: str):
    """(the newest complete tag whose files match its record, or None; why each newer one was skipped)."""
    skipped = []
    for tag in reversed(complete_tags(ckpt_root)):
        problem = verify(ckpt_root, tag)
        if problem is None:
            return tag, skipped
        skipped.append(f"skipped {tag}: {problem}")
    return None, skipped


# --- safe loading: nothing but tensors, containers and DeepSpeed's checkpoint types ------------

def safe_globals() -> list:
    """What DeepSpeed 0.19.8 pickles besides tensors at ZeRO 0-3 (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on real checkpoints and their universal
    copies): numpy arrays (the RNG state), the loss scaler, the ZeRO stage enum, fragment addresses."""
    import numpy
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [numpy.zeros(0).__reduce__()[0], numpy.ndarray,  # the first: numpy's _reconstruct
            numpy.dtype, type(numpy.dtype(numpy.uint32)),
            LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str, trust: bool = False, mmap: bool = False):
    """torch.load a checkpoint file (on CPU), refusing any pickled object outside `safe_globals`
    with an error naming the file, unless `trust`."""
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = (re.search(r"GLOBAL (\S+) was not an allowed global", str(e))  # the name alone
                 or re.search(r"WeightsUnpickler error: ([^\n]*)", str(e)))
        what = found.group(1).strip() if found else str(e)
        raise CheckpointError(
            f"{path}: refused to load: it pickles something other than tensors and DeepSpeed's checkpoint types "
            f"({what}); unpickling it could run code. If you trust where it came from, pass --trust-checkpoint "
            f"(train.trust_checkpoint=true for training)") from None


def check_safe(tag_dir: str, trust: bool) -> None:
    """Open every checkpoint file under a directory the safe way (memory-mapped: the pickles are
    read, not the tensors) before DeepSpeed loads them its own (unsafe) way."""
    if not trust:
        for name in _tag_files(tag_dir):
            if name.endswith(".pt"):
                safe_load(os.path.join(tag_dir, name), mmap=True)


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

def _uncommit(root: str, tag: str) -> None:
    """Take a tag out of the complete set (its marker first) before anything of it is rewritten,
    with its universal copy and consolidated weights."""
    remove(os.path.join(root, tag, COMPLETE))
    remove(os.path.join(root, tag))
    remove(os.path.join(root, tag + UNIVERSAL))


def _disk_full(error, path: str) -> bool:
    """Whether a save failed for want of space: ENOSPC anywhere in the exception chain, or, as
    torch.save's zip writer loses the errno ("unexpected pos ..."), next to no space left."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return shutil.disk_usage(path).free < LOW_SPACE


def _save_shards(engine, root: str, tag: str, client: dict) -> None:
    """engine.save_checkpoint on every rank. If it fails on any rank, every rank raises one clear
    CheckpointError and the partial tag is removed."""
    import torch.distributed as dist

    try:
        engine.save_checkpoint(root, tag=tag, client_state=client, save_latest=False)
        error = None
    except Exception as e:  # raised below, on every rank, once the others know
        error = e
        dist.barrier()  # the one save_checkpoint ends with, where the ranks that wrote their files wait
    if not distributed.all_reduce([float(error is not None)])[0]:
        return
    tag_dir = os.path.join(root, tag)
    full = _disk_full(error, root)  # before the partial files free their space
    dist.barrier()
    if dist.get_rank() == 0:
        remove(tag_dir)
    dist.barrier()
    cause = "no space left on device" if full else (f"{type(error).__name__}: {error}" if error else "failed on another rank")
    raise CheckpointError(f"saving checkpoint {tag_dir} failed: {cause}; removed the partial checkpoint "
                          f"(newest complete one: {find_latest(root)})") from error


def save(engine, cfg, state: TrainState, val_loss=None) -> str:
    """Save on every rank; each rank checksums the files it wrote; commit (complete.json, with the
    step's held-out loss if measured, then `latest`) on rank 0 once all ranks are done; then prune."""
    import torch.distributed as dist

    root, tag = ckpt_root(cfg), tag_for(state.step)
    client = {**asdict(state), "global_batch_size": cfg.train.global_batch_size, "rng": _rng_state(),
              "config": OmegaConf.to_container(cfg, resolve=True)}
    if dist.get_rank() == 0:
        _uncommit(root, tag)  # resumed from an older tag: this one is rewritten
    dist.barrier()
    _save_shards(engine, root, tag, client)
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, _digest_own_files(os.path.join(root, tag), dist.get_rank()))
    if dist.get_rank() == 0:
        files = dict(sorted(kv for d in digests for kv in d.items()))
        record = {**_commit_record(cfg, state.step, dist.get_world_size(), val_loss), "files": files}
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
            _uncommit(ckpt_root, old)  # the marker first: a half-deleted tag is never taken for a checkpoint


@dataclass
class ResumeSource:
    """A complete checkpoint that fits the config, and how this world size loads it."""
    ckpt_root: str
    tag: str
    record: dict  # its commit record
    trust: bool = False  # train.trust_checkpoint: load without the safe-unpickling check
    skipped: list = field(default_factory=list)  # why each newer complete tag was not taken
    reshard: bool = False  # saved by another world size: load its universal copy
    changes: tuple = ()  # optimizer settings of the config that differ from the checkpoint's (set by resume)

    @property
    def load_tag(self) -> str:
        return self.tag + UNIVERSAL if self.reshard else self.tag

    def describe(self, step: int) -> str:
        return (f"resumed from {os.path.join(self.ckpt_root, self.load_tag)} at step {step}"
                + (f" (saved by {self.record['world_size']} ranks)" if self.reshard else "")
                + (f"; optimizer settings from the config, changed since the checkpoint: {', '.join(self.changes)}"
                   if self.changes else "")
                + "".join(f"\n  {s}" for s in self.skipped))


def find_resume(cfg):
    """The ResumeSource train.resume names (None for a fresh run), checked against the config,
    its files against their commit record and their pickles for safety. Needs no process group, so
    a bad resume fails before anything starts (every rank checks, and comes to the same answer)."""
    root, resume, trust = ckpt_root(cfg), cfg.train.resume, cfg.train.trust_checkpoint
    if resume == "auto":
        tag, skipped = newest_verified(root)
        if tag is None and skipped:
            raise CheckpointError(f"train.resume=auto: no checkpoint in {root} matches its commit record; "
                                  + "; ".join(skipped))
        found = (root, tag) if tag else None
    else:
        found, skipped = resolve_resume(resume, root), []
        problem = found and verify(*found)
        if problem:
            raise CheckpointError(f"train.resume={resume}: damaged checkpoint: {problem}")
    if found is None and resume == "none" and complete_tags(root):
        raise ConfigError(f"train.out_dir={cfg.train.out_dir} already holds checkpoints: continue it with "
                          f"train.resume=auto, or choose another train.out_dir")
    if found is None:
        return None
    record = check_fits(cfg, *found)
    check_safe(os.path.join(*found), trust)
    return ResumeSource(*found, record, trust, skipped)


def prepare_reshard(source, rank: int, world: int) -> None:
    """DeepSpeed loads another world size's layout only from its universal format: rank 0 converts
    once (collective: every rank calls this after the process group is up)."""
    if source is None or source.record["world_size"] == world:
        return
    if rank == 0:
        to_universal(source.ckpt_root, source.tag)
    torch.distributed.barrier()
    check_safe(os.path.join(source.ckpt_root, source.tag + UNIVERSAL), source.trust)
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
        tag = newest_verified(ckpt_root)[0]
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


def consolidated_state_dict(ckpt_dir: str, tag: str, trust: bool = False) -> dict:
    """Full fp32 model weights from a checkpoint written at any ZeRO stage and rank count (its
    files checked by `check_safe` first)."""
    tag_dir = os.path.join(ckpt_dir, tag)
    check_safe(tag_dir, trust)
    if glob.glob(os.path.join(tag_dir, "*_optim_states.pt")):  # ZeRO 1-3: fp32 master partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        # quiet: its "Processing zero checkpoint ..." lines and progress bar would go into our output
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    states = safe_load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), trust)
    return {k: v.float() for k, v in states["module"].items()}


def _cache_matches(ckpt_root: str, tag: str) -> bool:
    """Whether the tag holds consolidated weights made from its current commit (a rewritten tag has
    another complete.json, whose checksum the cache's metadata names)."""
    from safetensors import SafetensorError, safe_open

    path = os.path.join(ckpt_root, tag, CONSOLIDATED)
    if not os.path.isfile(path):
        return False
    try:
        with safe_open(path, "pt") as f:
            made_from = (f.metadata() or {}).get("checkpoint")
    except (OSError, SafetensorError):  # damaged: rebuilt from the shards
        return False
    return made_from == file_digest(os.path.join(ckpt_root, tag, COMPLETE))["crc32"]


def _write_cache(model, ckpt_root: str, tag: str) -> None:
    """Keep the consolidated weights in the tag (atomically), for the next evaluation; a run
    directory that cannot take them (read-only, full) only costs the consolidation next time."""
    from safetensors.torch import save_model

    path = os.path.join(ckpt_root, tag, CONSOLIDATED)
    try:
        with atomic_path(path) as tmp:
            save_model(model, tmp, metadata={"checkpoint": file_digest(os.path.join(ckpt_root, tag, COMPLETE))["crc32"]})
    except OSError as e:
        print(f"note: could not cache the consolidated weights as {path} ({e})", file=sys.stderr)


def _run_checkpoints(run_dir: str, tag: str = None):
    """(checkpoints dir, tag) of a run directory's given complete checkpoint, or its newest one
    that has consolidated weights or verifies (saying on stderr which newer ones it skipped)."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    if tag is not None:
        if not os.path.isfile(os.path.join(ckpt_root, tag, COMPLETE)):
            raise FileNotFoundError(f"{os.path.join(ckpt_root, tag)}: not a complete checkpoint "
                                    f"(complete ones: {', '.join(complete_tags(ckpt_root)) or 'none'})")
        return ckpt_root, tag
    for tag in reversed(complete_tags(ckpt_root)):
        problem = None if _cache_matches(ckpt_root, tag) else verify(ckpt_root, tag)
        if problem is None:
            return ckpt_root, tag
        print(f"skipped {tag}: {problem}", file=sys.stderr)
    raise FileNotFoundError(f"{ckpt_root}: no complete checkpoint that matches its commit record")


def load_checkpoint(run_dir: str, tag: str = None, trust: bool = False):
    """(model in eval mode on CPU, cfg, tag) of a run directory's newest (or given) checkpoint. The
    weights come from `<tag>/consolidated.safetensors`, consolidated once from the verified shards."""
    from safetensors.torch import load_model as load_weights

    from llm.config import load_config
    from llm.model import build_model

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{run_dir}: no config.yaml; expected a run directory made by `python -m llm train`")
    cfg = load_config(cfg_path, ["train.resume=none"])  # the checkpoint it resumed from may be pruned since
    ckpt_root, tag = _run_checkpoints(run_dir, tag)
    model = build_model(cfg.model)
    if _cache_matches(ckpt_root, tag):
        load_weights(model, os.path.join(ckpt_root, tag, CONSOLIDATED))  # strict; restores the tied head
    else:
        problem = verify(ckpt_root, tag)
        if problem:
            raise CheckpointError(f"{os.path.join(ckpt_root, tag)}: damaged checkpoint: {problem}")
        model.load_state_dict(consolidated_state_dict(ckpt_root, tag, trust))
        _write_cache(model, ckpt_root, tag)
    return model.eval(), cfg, tag


def load_model(run_dir: str, tag: str = None, trust: bool = False):
    """(model, cfg) from a run directory's newest (or given) checkpoint, in eval mode on CPU."""
    return load_checkpoint(run_dir, tag, trust)[:2]


def main(argv=None):
    """`python -m llm convert RUN_DIR [--tag TAG]`: write a checkpoint's universal copy ahead of a
    resume on another world size (which would otherwise convert it on start)."""
    p = argparse.ArgumentParser(prog="python -m llm convert", description=main.__doc__)
    p.add_argument("run_dir")
    p.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    add_trust_argument(p)
    a = p.parse_args(argv)
    ckpt_root, tag = _run_checkpoints(a.run_dir, a.tag)
    check_safe(os.path.join(ckpt_root, tag), a.trust_checkpoint)
    print(os.path.join(ckpt_root, to_universal(ckpt_root, tag)))


def add_trust_argument(parser) -> None:
    """--trust-checkpoint, for the commands that read checkpoints."""
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load checkpoint files that pickle more than tensors and DeepSpeed's types "
                             "(unpickling runs their code: only for checkpoints from a trusted source)")
