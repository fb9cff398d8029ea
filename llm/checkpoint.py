"""Checkpoints: DeepSpeed's sharded files plus our own commit protocol, and consolidated loading.

Layout under `<out_dir>/checkpoints/`: one directory per tag (`step_00000100`), written by
DeepSpeed on every rank; once all ranks are done, rank 0 writes `<tag>/complete.json` and then
atomically replaces `latest`. A crash mid-save leaves a tag without `complete.json`, which
`find_latest` ignores, so `train.resume=auto` always lands on a whole checkpoint.
"""
import glob
import json
import os
import shutil

import torch

COMPLETE = "complete.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_tags(ckpt_root: str) -> list[str]:
    """Tags with a completion marker, oldest first."""
    tags = [os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(ckpt_root, "*", COMPLETE))]
    return sorted(tags)


def find_latest(ckpt_root: str):
    """The newest complete tag, or None. `latest` is trusted only if its tag is complete."""
    latest = os.path.join(ckpt_root, "latest")
    if os.path.isfile(latest):
        tag = open(latest).read().strip()
        if os.path.isfile(os.path.join(ckpt_root, tag, COMPLETE)):
            return tag
    tags = complete_tags(ckpt_root)
    return tags[-1] if tags else None


def save(engine, ckpt_root: str, step: int, client_state: dict, keep_last: int) -> str:
    """Save on every rank; commit (marker, then `latest`) on rank 0 once all ranks are done."""
    import torch.distributed as dist

    tag = tag_for(step)
    engine.save_checkpoint(ckpt_root, tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        _write_atomic(os.path.join(ckpt_root, tag, COMPLETE), json.dumps({"step": step}))
        _write_atomic(os.path.join(ckpt_root, "latest"), tag)
        for old in complete_tags(ckpt_root)[:-keep_last]:
            shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
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


def consolidated_state_dict(ckpt_dir: str, tag: str) -> dict:
    """Full fp32 model weights from a checkpoint written at any ZeRO stage and rank count."""
    tag_dir = os.path.join(ckpt_dir, tag)
    if glob.glob(os.path.join(tag_dir, "*_optim_states.pt")):  # ZeRO 1-3: fp32 master partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    states = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                        weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def load_model(run_dir: str, tag: str = None):
    """(model, cfg) from a run directory's newest (or given) checkpoint, in eval mode on CPU."""
    from llm.config import load_config
    from llm.model import build_model

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{run_dir}: no config.yaml; expected a run directory made by `python -m llm train`")
    cfg = load_config(cfg_path)
    ckpt_root = os.path.join(run_dir, "checkpoints")
    tag = tag or find_latest(ckpt_root)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_root}: no complete checkpoint")
    model = build_model(cfg.model)
    model.load_state_dict(consolidated_state_dict(ckpt_root, tag))
    return model.eval(), cfg
