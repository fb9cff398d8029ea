"""Hugging Face formats: our models as checkpoints that stock `transformers` (or fla) loads, and back.

The format follows the layers' mixers:

- softmax everywhere -> `llama` (`qwen3` with qk_norm: Llama has no QK-norm). The block is Llama's:
  the only renames are the module paths and the MLP's fused `gate_up`, split in two.
- one of deltanet / gated_deltanet / mesa, alone or with plain softmax layers -> fla's
  `delta_net` / `gated_deltanet` / `mesa_net` (loaded after `import fla`; fla's attention layers,
  used by the hybrids, need flash-attn on a GPU).
- anything else (momentum, pdssm, other hybrids) -> `llm_gpt`, a `trust_remote_code` bundle: the
  export ships `modeling_llm.py`, which builds this package's own model.

A format is a list of renaming rules (ours -> theirs; a tensor may split into several, e.g.
`gate_up`) and a config writer. `export_hf` writes config.json (with our model fields under
`llm_export`, so an export reads back exactly), model.safetensors, the sentencepiece tokenizer
files `AutoTokenizer` reads and generation_config.json. `read_hf` reads any of them back; for a
Llama / Qwen3 checkpoint made elsewhere it derives the model fields from the HF config.

Special tokens: training joins documents with EOS (</s>, id 2) and never shows BOS (<s>, 1), so
the exported tokenizer and configs name </s> as BOS too, and the tokenizer adds nothing: lm-eval's
`hf` model then scores as our adapter does (an empty context after </s>, others as they are).
"""
import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file


RECORD = "llm_export"  # config.json key holding our model fields, seq_len and provenance
LINEAR_FORMATS = {"deltanet": "delta_net", "gated_deltanet": "gated_deltanet", "mesa": "mesa_net"}
REMOTE = "llm_gpt"
MODELING_FILE = os.path.join(os.path.dirname(__file__), "modeling_llm.py")


def mixers_of(model) -> list[str]:
    return [block.mixer.name for block in model.blocks]


def hf_format(mixers: list[str], qk_norm: bool) -> str:
    """The model_type an export gets, from its layers' mixer names."""
    names = set(mixers)
    if names == {"softmax"}:
        return "qwen3" if qk_norm else "llama"
    linear = names - {"softmax"}
    # fla's attention layers have no QK-norm option
    if len(linear) == 1 and next(iter(linear)) in LINEAR_FORMATS and not ("softmax" in names and qk_norm):
        return LINEAR_FORMATS[next(iter(linear))]
    return REMOTE


def rules(fmt: str) -> list[tuple[str, tuple[str, ...]]]:
    """(regex on our parameter name, the names it becomes), first match wins. Several names: the
    tensor is split into that many equal parts along dim 0."""
    if fmt == REMOTE:
        return [(r"(.*)", (r"model.\1",))]
    llama = fmt in ("llama", "qwen3")
    layer = r"model.layers.\1."
    mixer = layer + ("self_attn." if llama else "attn.")
    return [
        (r"embed\.weight", ("model.embed_tokens.weight" if llama else "model.embeddings.weight",)),
        (r"norm\.weight", ("model.norm.weight",)),
        (r"head\.weight", ("lm_head.weight",)),
        (r"blocks\.(\d+)\.mixer_norm\.weight", (layer + ("input_layernorm" if llama else "attn_norm") + ".weight",)),
        (r"blocks\.(\d+)\.mlp_norm\.weight", (layer + ("post_attention_layernorm" if llama else "mlp_norm") + ".weight",)),
        (r"blocks\.(\d+)\.mlp\.gate_up\.weight", (layer + "mlp.gate_proj.weight", layer + "mlp.up_proj.weight")),
        (r"blocks\.(\d+)\.mlp\.down\.weight", (layer + "mlp.down_proj.weight",)),
        # fla's linear layers: the short convs and the output norm are flat modules there
        (r"blocks\.(\d+)\.mixer\.(\w)_conv\.conv\.weight", (mixer + r"\2_conv1d.weight",)),
        (r"blocks\.(\d+)\.mixer\.o_norm\.norm\.weight", (mixer + "o_norm.weight",)),
        (r"blocks\.(\d+)\.mixer\.o_norm\.g_proj\.weight", (mixer + "g_proj.weight",)),
        (r"blocks\.(\d+)\.mixer\.lamb_param", (mixer + "lambda_params",)),  # [H, K] there [H * K]
        (r"blocks\.(\d+)\.mixer\.(.*)", (mixer + r"\2",)),
    ]


def _match(fmt: str, name: str):
    for pattern, targets in rules(fmt):
        if m := re.fullmatch(pattern, name):
            return [m.expand(t) for t in targets]
    raise KeyError(f"{name}: no {fmt} name for this parameter")


def to_hf_state(state: dict, fmt: str) -> dict:
    out = {}
    for name, tensor in state.items():
        targets = _match(fmt, name)
        for target, part in zip(targets, tensor.chunk(len(targets))):
            out[target] = part.reshape(-1) if name.endswith("lamb_param") else part
    return out


def from_hf_state(hf_state: dict, fmt: str, model) -> dict:
    """A state dict for `model` (built from the export's fields) out of an HF state dict; every HF
    tensor must be used, except a tied head's copy and rotary buffers some checkpoints store."""
    used, state = set(), {}
    for name, ours in model.state_dict().items():
        targets = _match(fmt, name)
        missing = [t for t in targets if t not in hf_state]
        if missing:
            raise KeyError(f"HF checkpoint ({fmt}): missing {', '.join(missing)} (for our {name})")
        state[name] = torch.cat([hf_state[t] for t in targets]).reshape(ours.shape).to(ours.dtype)
        used.update(targets)
    unused = [k for k in hf_state if k not in used and k != "lm_head.weight" and not k.endswith("rotary_emb.inv_freq")]
    if unused:
        raise KeyError(f"HF checkpoint ({fmt}): tensors this model has no place for: {', '.join(sorted(unused)[:8])}")
    return state


def _attention_spec(model, m: dict) -> dict:
    """fla's `attn` entry for the softmax layers of a hybrid."""
    layers = [i for i, name in enumerate(mixers_of(model)) if name == "softmax"]
    return {"layers": layers, "num_heads": m["n_heads"], "num_kv_heads": m["n_kv_heads"] or m["n_heads"],
            "qkv_bias": False, "window_size": None, "rope_theta": m["rope_theta"]} if layers else None


def _linear_fields(model, m: dict, fmt: str) -> dict:
    """fla's config fields of the linear mixer (its options as the model's layers hold them)."""
    a = next(b.mixer.args for b in model.blocks if LINEAR_FORMATS.get(b.mixer.name) == fmt)
    head_k = a.head_dim or m["d_model"] // m["n_heads"]
    if fmt == "mesa_net":
        return {"num_heads": m["n_heads"], "head_dim": head_k, "conv_size": a.conv_size,
                "lambda_lower_bound": a.lamb_lower_bound, "use_output_gate": a.use_gate,
                "max_cg_step_training": a.cg_steps, "max_cg_step_decoding": a.cg_steps}
    fields = {"num_heads": m["n_heads"], "expand_v": a.expand_v, "conv_size": a.conv_size, "use_gate": a.use_gate,
              "allow_neg_eigval": a.allow_neg_eigval, "use_short_conv": True}
    if fmt == "delta_net":
        return {**fields, "expand_k": m["n_heads"] * head_k / m["d_model"], "use_beta": True, "use_output_norm": True,
                "qk_norm": "l2", "qk_activation": "silu"}
    return {**fields, "head_dim": head_k, "num_v_heads": None}


def hf_config(model, m: dict, fmt: str, seq_len: int, eos_id: int) -> dict:
    """The HF config.json (without our record) of `model`, whose model fields are `m`."""
    base = {"model_type": fmt, "vocab_size": m["vocab_size"], "hidden_size": m["d_model"],
            "num_hidden_layers": m["n_layers"], "intermediate_size": model.blocks[0].mlp.down.in_features,
            "max_position_embeddings": seq_len, "tie_word_embeddings": m["tie_embeddings"], "bos_token_id": eos_id, "eos_token_id": eos_id,
            "pad_token_id": None, "torch_dtype": "float32"}
    if fmt in ("llama", "qwen3"):
        return {**base, "architectures": ["LlamaForCausalLM" if fmt == "llama" else "Qwen3ForCausalLM"],
                "hidden_act": "silu", "num_attention_heads": m["n_heads"],
                "num_key_value_heads": m["n_kv_heads"] or m["n_heads"], "head_dim": m["d_model"] // m["n_heads"],
                "rms_norm_eps": m["norm_eps"], "rope_theta": m["rope_theta"],  # transformers 4's key; 5 reads both
                "rope_parameters": {"rope_type": "default", "rope_theta": m["rope_theta"]},
                "attention_bias": False, "mlp_bias": False}
    if fmt == REMOTE:
        return {**base, "architectures": ["LLMForCausalLM"], "use_cache": False,
                "auto_map": {"AutoConfig": "modeling_llm.LLMConfig",
                             "AutoModelForCausalLM": "modeling_llm.LLMForCausalLM"}}
    arch = {"delta_net": "DeltaNetForCausalLM", "gated_deltanet": "GatedDeltaNetForCausalLM",
            "mesa_net": "MesaNetForCausalLM"}[fmt]
    return {**base, "architectures": [arch], "hidden_act": "swish", "norm_eps": m["norm_eps"],
            "attn": _attention_spec(model, m), "fuse_cross_entropy": False, **_linear_fields(model, m, fmt)}


def softmax_fields(hf_cfg: dict) -> dict:
    """Our model fields of a Llama / Qwen3 config.json (one made elsewhere too); refuses what our
    softmax model cannot represent."""
    fmt = hf_cfg.get("model_type")
    if fmt not in ("llama", "qwen3"):
        raise ValueError(f"config.json: model_type {fmt!r}; only llama and qwen3 checkpoints map onto our softmax model")
    d, heads = hf_cfg["hidden_size"], hf_cfg["num_attention_heads"]
    rope = hf_cfg.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf_cfg.get("rope_theta", 10000.0)}
    unsupported = {"head_dim": hf_cfg.get("head_dim", d // heads) != d // heads,
                   "attention_bias": hf_cfg.get("attention_bias", False), "mlp_bias": hf_cfg.get("mlp_bias", False),
                   "hidden_act": hf_cfg.get("hidden_act", "silu") != "silu",
                   "rope_parameters.rope_type": rope.get("rope_type", "default") != "default" or hf_cfg.get("rope_scaling"),
                   "use_sliding_window": hf_cfg.get("use_sliding_window", False)}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"config.json ({fmt}): {', '.join(bad)} not supported by our softmax model "
                         f"(needs head_dim = hidden_size / heads, no biases, silu, default RoPE, full attention)")
    kv = hf_cfg.get("num_key_value_heads") or heads
    return {"vocab_size": hf_cfg["vocab_size"], "d_model": d, "n_layers": hf_cfg["num_hidden_layers"], "n_heads": heads,
            "n_kv_heads": None if kv == heads else kv, "mlp_hidden": hf_cfg["intermediate_size"], "mixer": "softmax",
            "qk_norm": fmt == "qwen3", "rope_theta": float(rope["rope_theta"]), "norm_eps": hf_cfg["rms_norm_eps"],
            "tie_embeddings": hf_cfg.get("tie_word_embeddings", False)}


def tokenizer_files(out_dir: str, tokenizer_model: str, seq_len: int, eos_id: int) -> None:
    """tokenizer.model plus the tokenizer_config.json `AutoTokenizer` reads it with (no
    tokenizer.json: transformers converts the sentencepiece model itself)."""
    from llm.files import write_json

    shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
    special = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>"}
    write_json(os.path.join(out_dir, "tokenizer_config.json"),
               {"tokenizer_class": "LlamaTokenizer", **special, "pad_token": None, "add_bos_token": False,
                "add_eos_token": False, "legacy": False, "add_prefix_space": True,
                "clean_up_tokenization_spaces": False, "model_max_length": seq_len})
    write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    write_json(os.path.join(out_dir, "generation_config.json"),
               {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id})


def export_hf(model, fields: dict, out_dir: str, tokenizer, seq_len: int, record: dict) -> str:
    """Write `model` (built from the model fields `fields`, every key given) as an HF checkpoint in
    out_dir; returns its model_type."""
    from llm.files import atomic_path, write_json

    fmt = hf_format(mixers_of(model), fields["qk_norm"])
    config = {**hf_config(model, fields, fmt, seq_len, tokenizer.eos_id), RECORD: {**record, "model": fields}}
    write_json(os.path.join(out_dir, "config.json"), config)
    state = {k: v.contiguous() for k, v in to_hf_state(model.state_dict(), fmt).items()}
    with atomic_path(os.path.join(out_dir, "model.safetensors")) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    tokenizer_files(out_dir, tokenizer.path, seq_len, tokenizer.eos_id)
    if fmt == REMOTE:
        shutil.copyfile(MODELING_FILE, os.path.join(out_dir, "modeling_llm.py"))
    return fmt


def read_hf(path: str):
    """(our model fields, state dict for build_model(fields), export record) of an HF checkpoint
    directory: one of ours, or a Llama / Qwen3 checkpoint made elsewhere."""
    from llm.model import build_model

    with open(os.path.join(path, "config.json")) as f:
        hf_cfg = json.load(f)
    record = dict(hf_cfg.get(RECORD) or {})
    fields = record.pop("model", None) or softmax_fields(hf_cfg)
    record.setdefault("seq_len", hf_cfg.get("max_position_embeddings"))
    fmt = hf_cfg["model_type"]
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights}: missing (sharded and .bin checkpoints are not read)")
    state = from_hf_state(load_file(weights), fmt, build_model(fields))
    return fields, state, record
