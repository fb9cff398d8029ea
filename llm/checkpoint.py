"""Checkpoints: DeepSpeed's sharded files plus our own commit protocol, resharding, consolidated loading.

Layout under `<out_dir>/checkpoints/`: one directory per tag (`step_00000100`), written by
DeepSpeed on every rank; once all ranks are done, rank 0 writes `<tag>/complete.json` (the commit
record: step, world size, ZeRO stage, global batch and model config) and then atomically replaces
`latest`. A crash mid-save leaves a tag without `complete.json`, which `find_latest` ignores, so
`train.resume=auto` always lands on a whole checkpoint.

Resuming on another world size goes through DeepSpeed's universal format, converted once into
`<tag>_universal` (next to its tag, pruned with it; never a tag itself, as it has no complete.json):
automatically by `train`, or ahead of time with `python -m llm convert RUN_DIR [--tag TAG]`.
"""
import argparse
import contextlib
import glob
import json
import os
import shutil

import torch

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


def commit_record(ckpt_root: str, tag: str) -> dict:
    """The `complete.json` of a tag: step, world_size, zero_stage, global_batch_size, model."""
    with open(os.path.join(ckpt_root, tag, COMPLETE)) as f:
        return json.load(f)


def save(engine, ckpt_root: str, step: int, client_state: dict, keep_last: int, record: dict) -> str:
    """Save on every rank; commit (marker with `record`, then `latest`) on rank 0 once all ranks are
    done; then drop all but the newest `keep_last` complete tags (with their universal copies)."""
    import torch.distributed as dist

    tag = tag_for(step)
    engine.save_checkpoint(ckpt_root, tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        record = {"step": step, "world_size": dist.get_world_size(), **record}
        write_atomic(os.path.join(ckpt_root, tag, COMPLETE), json.dumps(record, indent=1))
        write_atomic(os.path.join(ckpt_root, "latest"), tag)
        for old in complete_tags(ckpt_root)[:-keep_last]:
            # The marker goes first, so a half-deleted tag is never taken for a checkpoint.
            os.remove(os.path.join(ckpt_root, old, COMPLETE))
            shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
            shutil.rmtree(os.path.join(ckpt_root, old + UNIVERSAL), ignore_errors=True)
    dist.barrier()
    return tag


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
