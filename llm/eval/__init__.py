"""Evaluation of trained runs: perplexity and bits per byte (`ppl`), the lm-evaluation-harness
adapter (`harness`), head-level induction telemetry and ablation (`induction`), function-style
in-context probes (`icl`) and plots (`plot`). `python -m llm eval` (`cli`) runs them; each writes
one JSON file under RUN_DIR/eval/ and prints a table.

The helpers here are the ones several evaluations share.
"""
import math
import os

import torch
import torch.nn.functional as F

from llm.files import write_json


def load_run(run_dir: str, tag: str | None = None, device="cpu", trust: bool = False):
    """(model in eval mode on `device`, resolved config, tokenizer, checkpoint tag) of a run
    directory's given checkpoint (or its newest complete one), or of an export directory (`python
    -m llm export`, native or hf; its config has the model, the seq_len it was trained on and, where
    known, data.path; `tag` must be None). `trust`: see --trust-checkpoint."""
    from llm.checkpoint import load_checkpoint
    from llm.config import build_config
    from llm.data import load_tokenizer
    from llm.export import is_export, load_exported_with_record

    if is_export(run_dir):
        if tag is not None:
            raise ValueError(f"{run_dir}: an export directory holds one checkpoint; --tag does not apply")
        model, fields, record = load_exported_with_record(run_dir)
        data = {"path": record.get("data_path") or run_dir, "seq_len": record["seq_len"]}
        cfg = build_config({"model": fields, "data": data})
        return model.to(device), cfg, load_tokenizer(run_dir), record.get("tag")
    model, cfg, tag = load_checkpoint(run_dir, tag, trust)
    return model.to(device), cfg, run_tokenizer(run_dir, cfg), tag


def run_tokenizer(run_dir: str, cfg):
    """The run directory's own copy of its tokenizer (written by training), else its data's (runs
    made before the copy existed)."""
    from llm.data import load_tokenizer
    from llm.data.shards import TOKENIZER_FILE

    own = os.path.join(run_dir, TOKENIZER_FILE)
    return load_tokenizer(own if os.path.isfile(own) else cfg.data.path)


def device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_losses(model, windows, batch_size: int = 16):
    """Next-token cross-entropy [N, T] of windows [N, T + 1] (inputs windows[:, :-1]), on CPU."""
    out = []
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device_of(model))
        logits = model(chunk[:, :-1]).float()
        out.append(F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none").cpu())
    return torch.cat(out)


@torch.no_grad()
def padded_logits(model, seqs: list[list[int]]) -> torch.Tensor:
    """Float logits [N, longest - 1, V], on the model's device, of each sequence's inputs seq[:-1]
    in one right-padded batch: every mixer is causal, so padding never reaches a real position
    (row r's logits at t < len(seqs[r]) - 1 are those of the sequence alone)."""
    x = torch.zeros(len(seqs), max(map(len, seqs)) - 1, dtype=torch.long)
    for r, s in enumerate(seqs):
        x[r, :len(s) - 1] = torch.tensor(s[:-1])
    return model(x.to(device_of(model))).float()


def split_encode(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) cut from the tokenization of the whole text, so the
    continuation is tokenized as it reads after the context (sentencepiece marks word starts and
    adds a dummy prefix to every text it encodes). The continuation keeps at least one token."""
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context) if context else []
    n = 0
    while n < min(len(ctx), len(whole) - 1) and ctx[n] == whole[n]:
        n += 1
    return whole[:n], whole[n:]


def decode_continuation(tokenizer, prefix_ids, ids) -> str:
    """The text that `ids` add after `prefix_ids`. Decoding `ids` alone would drop the space of a
    leading word-boundary piece (sentencepiece strips it at the start of a text)."""
    prefix_ids, ids = list(prefix_ids), list(ids)
    return tokenizer.decode(prefix_ids + ids)[len(tokenizer.decode(prefix_ids)):]


def save_result(run_dir: str, name: str, result: dict) -> str:
    """Write RUN_DIR/eval/<name>.json (atomically) and return its path."""
    out_dir = os.path.join(run_dir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    write_json(path, result, default=str)
    return path


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain-text table with aligned columns; floats to 4 significant digits, None as '-'."""
    def cell(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [list(map(str, header))] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
