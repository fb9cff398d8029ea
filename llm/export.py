"""`python -m llm export RUN_DIR --out DIR [--tag TAG] [--format native|hf] [--force]`: a checkpoint
as a self-contained model directory.

native (default): `model.safetensors` (fp32 weights consolidated from any ZeRO stage and rank
count, our parameter names), `config.json` (the model fields, for `build_model`, plus the
`llm_export` record: seq_len and where it came from) and `tokenizer.model`.
hf: what stock `transformers` loads (`AutoModelForCausalLM` / `AutoTokenizer`): Llama or Qwen3
for softmax models, fla's formats for DeltaNet / Gated DeltaNet / Mesa, a `trust_remote_code`
bundle otherwise (see llm.hf).
Files are written atomically with the umask's mode; a DIR that already has files is refused
unless `force`.

`load_exported(DIR)` builds the model of either back; `load_hf_softmax(DIR)` reads a Llama / Qwen3
checkpoint (ours or not) as a state dict for `build_model`, to start training from it.
"""
import argparse
import json
import os
import shutil

from omegaconf import OmegaConf
from safetensors.torch import load_model as load_weights, save_model

from llm import HelpFormatter, hf
from llm.checkpoint import add_trust_argument
from llm.files import atomic_path, write_json

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.model"
FORMATS = ("native", "hf")


def export(run_dir: str, out_dir: str, tag: str = None, fmt: str = "native", force: bool = False,
           trust: bool = False) -> str:
    """Write the export; returns its format (native, or the HF model_type)."""
    from llm.checkpoint import load_checkpoint
    from llm.eval import run_tokenizer

    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise FileExistsError(f"export --out {out_dir}: the directory already has files "
                              f"({', '.join(sorted(os.listdir(out_dir))[:5])}); pass --force to overwrite them")
    model, cfg, tag = load_checkpoint(run_dir, tag, trust)
    tokenizer = run_tokenizer(run_dir, cfg)  # fail before writing anything
    record = {"run_dir": os.path.abspath(run_dir), "tag": tag, "data_path": cfg.data.path,
              "seq_len": cfg.data.seq_len}
    fields = OmegaConf.to_container(cfg.model, resolve=True)
    os.makedirs(out_dir, exist_ok=True)
    if fmt == "hf":
        return hf.export_hf(model, fields, out_dir, tokenizer, cfg.data.seq_len, record)
    with atomic_path(os.path.join(out_dir, WEIGHTS)) as tmp:
        save_model(model, tmp)  # unlike save_file, stores tensors the model shares (a tied head) once
    write_json(os.path.join(out_dir, CONFIG), {**fields, hf.RECORD: record})
    with atomic_path(os.path.join(out_dir, TOKENIZER)) as tmp:
        shutil.copyfile(tokenizer.path, tmp)
    return "native"


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG)) and os.path.isfile(os.path.join(path, WEIGHTS))


def load_exported_with_record(out_dir: str):
    """(model in eval mode on CPU, its model fields, export record: seq_len, and run_dir, tag,
    data_path where known)."""
    from llm.model import build_model

    with open(os.path.join(out_dir, CONFIG)) as f:
        config = json.load(f)
    if "model_type" in config:
        fields, state, record = hf.read_hf(out_dir)
        model = build_model(fields)
        model.load_state_dict(state)
        return model.eval(), fields, record
    record = config.pop(hf.RECORD, {})
    model = build_model(config)
    load_weights(model, os.path.join(out_dir, WEIGHTS))  # strict; restores shared tensors
    return model.eval(), config, record


def load_exported(out_dir: str):
    """The model of an exported directory (native or hf), in eval mode on CPU."""
    return load_exported_with_record(out_dir)[0]


def load_hf_softmax(path: str, model_cfg=None) -> dict:
    """A state dict for `build_model` from a Llama / Qwen3 checkpoint directory (ours or one made
    elsewhere; `llm.hf.softmax_fields` gives the model fields its config.json implies). With
    `model_cfg` (the model a trainer builds), first check that the checkpoint fits it: every
    tensor's shape, and the RoPE base and norm eps, which no shape shows."""
    import torch

    from llm.model import build_model

    with open(os.path.join(path, CONFIG)) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in ("llama", "qwen3"):
        raise ValueError(f"{path}: model_type {model_type!r}, expected a llama or qwen3 checkpoint")
    fields, state, _ = hf.read_hf(path)
    if model_cfg is None:
        return state
    with torch.device("meta"):
        ours = build_model(model_cfg)
    problems = [f"model.{k}: {fields[k]} in the checkpoint, {model_cfg[k]} in the config"
                for k in ("rope_theta", "norm_eps") if float(fields[k]) != float(model_cfg[k])]
    if set(hf.mixers_of(ours)) != {"softmax"}:
        problems.append(f"model layers: the config's are {hf.mixers_of(ours)}, the checkpoint's all softmax")
    shapes = {name: list(t.shape) for name, t in ours.state_dict().items()}
    for name in sorted(shapes.keys() | state.keys()):
        theirs = list(state[name].shape) if name in state else None
        if theirs != shapes.get(name):
            problems.append(f"{name}: {theirs or 'absent'} in the checkpoint, {shapes.get(name) or 'absent'} in the config")
    if problems:
        raise ValueError(f"{path} does not fit the model config: " + "; ".join(problems[:6]))
    return state


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m llm export", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("run_dir", help="run directory (train.out_dir)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    p.add_argument("--format", choices=FORMATS, default="native",
                   help="native: our names, for `build_model`; hf: loadable by `transformers`")
    p.add_argument("--force", action="store_true", help="write into an --out directory that already has files")
    add_trust_argument(p)
    a = p.parse_args(argv)
    fmt = export(a.run_dir, a.out, a.tag, a.format, a.force, a.trust_checkpoint)
    print(f"exported {a.run_dir} to {a.out} ({fmt}): {', '.join(sorted(os.listdir(a.out)))}")
