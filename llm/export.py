"""`python -m llm export RUN_DIR --out DIR [--tag TAG] [--force]`: a checkpoint as a self-contained model directory.

DIR gets `model.safetensors` (fp32 weights consolidated from any ZeRO stage and rank count),
`config.json` (the model config, for `build_model`) and `tokenizer.model` (which
`llm.data.load_tokenizer(DIR)` reads), each written atomically with the umask's mode; a DIR that
already has files is refused unless `force`. `load_exported(DIR)` builds the model back.
"""
import argparse
import json
import os
import shutil

from omegaconf import OmegaConf
from safetensors.torch import load_model as load_weights, save_model

from llm.checkpoint import add_trust_argument
from llm.files import atomic_path, write_json

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.model"


def export(run_dir: str, out_dir: str, tag: str = None, force: bool = False, trust: bool = False) -> None:
    from llm.data import load_tokenizer
    from llm.checkpoint import load_model

    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise FileExistsError(f"export --out {out_dir}: the directory already has files "
                              f"({', '.join(sorted(os.listdir(out_dir))[:5])}); pass --force to overwrite them")
    model, cfg = load_model(run_dir, tag, trust)
    tokenizer = load_tokenizer(cfg.data.path).path  # fail before writing anything
    os.makedirs(out_dir, exist_ok=True)
    with atomic_path(os.path.join(out_dir, WEIGHTS)) as tmp:
        save_model(model, tmp)  # unlike save_file, stores tensors the model shares (a tied head) once
    write_json(os.path.join(out_dir, CONFIG), OmegaConf.to_container(cfg.model, resolve=True))
    with atomic_path(os.path.join(out_dir, TOKENIZER)) as tmp:
        shutil.copyfile(tokenizer, tmp)


def load_exported(out_dir: str):
    """The model of an exported directory, in eval mode on CPU."""
    from llm.model import build_model

    with open(os.path.join(out_dir, CONFIG)) as f:
        model = build_model(json.load(f))
    load_weights(model, os.path.join(out_dir, WEIGHTS))  # strict; restores shared tensors
    return model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m llm export",
                                description="Write a run's checkpoint as safetensors weights, model config and tokenizer.")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    p.add_argument("--force", action="store_true", help="write into an --out directory that already has files")
    add_trust_argument(p)
    a = p.parse_args(argv)
    export(a.run_dir, a.out, a.tag, a.force, a.trust_checkpoint)
    print(f"exported {a.run_dir} to {a.out}: {WEIGHTS}, {CONFIG}, {TOKENIZER}")
