"""`python -m llm export RUN_DIR --out DIR [--tag TAG]`: a checkpoint as a self-contained model directory.

DIR gets `model.safetensors` (fp32 weights consolidated from any ZeRO stage and rank count),
`config.json` (the model config, for `build_model`) and `tokenizer.model` (which
`llm.data.load_tokenizer(DIR)` reads). `load_exported(DIR)` builds the model back.
"""
import argparse
import json
import os
import shutil

from omegaconf import OmegaConf
from safetensors.torch import load_model as load_weights, save_model

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.model"


def export(run_dir: str, out_dir: str, tag: str = None) -> None:
    from llm.checkpoint import load_model
    from llm.eval import run_tokenizer

    model, cfg = load_model(run_dir, tag)
    tokenizer = run_tokenizer(run_dir, cfg).path  # fail before writing anything
    os.makedirs(out_dir, exist_ok=True)
    # save_model, unlike save_file, stores tensors the model shares (a tied head) once.
    save_model(model, os.path.join(out_dir, WEIGHTS))
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(OmegaConf.to_container(cfg.model, resolve=True), f, indent=1)
    shutil.copyfile(tokenizer, os.path.join(out_dir, TOKENIZER))


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
    a = p.parse_args(argv)
    export(a.run_dir, a.out, a.tag)
    print(f"exported {a.run_dir} to {a.out}: {WEIGHTS}, {CONFIG}, {TOKENIZER}")
