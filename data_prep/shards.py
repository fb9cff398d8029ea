"""The on-disk format of a tokenized corpus directory, and its writer.

    meta.json            written last; its presence marks the directory complete
    tokenizer.model      the sentencepiece model
    train-00000.bin ...  flat token arrays (little-endian uint16, uint32 for vocabularies > 65536)
    train-00000.json     the shard's header: format, split, dtype, vocab_size, tokenizer_sha256, tokens
    val-00000.bin ...

Every file goes to a temporary name first and is moved into place (`llm.files.atomic_path`), and a writer
removes meta.json before anything else, so an interrupted run never leaves a directory that looks
complete. `llm.data.TokenShards` reads and validates this format.
"""
import glob
import hashlib
import os
import shutil

import numpy as np

from llm.files import atomic_path, write_json

FORMAT = 1
META = "meta.json"
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def header_path(shard_path: str) -> str:
    return os.path.splitext(shard_path)[0] + ".json"


def copy_file(src: str, dst: str) -> None:
    if os.path.abspath(src) != os.path.abspath(dst):
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def begin(out_dir: str) -> None:
    """Make `out_dir` and mark it incomplete (no meta.json) before any shard is written."""
    os.makedirs(out_dir, exist_ok=True)
    for path in [os.path.join(out_dir, META)] + glob.glob(os.path.join(out_dir, "*.tmp.*")):
        if os.path.exists(path):
            os.remove(path)


def finish(out_dir: str, meta: dict) -> None:
    """Remove shards of an earlier run that `meta` does not list, then write meta.json (last)."""
    listed = {name for split in meta["splits"].values() for name in split["shards"]}
    for split in SPLITS:
        for path in glob.glob(os.path.join(out_dir, f"{split}-*.bin")):
            if os.path.basename(path) not in listed:
                os.remove(path)
                if os.path.exists(header_path(path)):
                    os.remove(header_path(path))
    write_json(os.path.join(out_dir, META), meta)


class ShardWriter:
    """Appends token arrays to `<split>-NNNNN.bin` shards of `shard_tokens` tokens each."""

    def __init__(self, out_dir: str, split: str, vocab_size: int, tokenizer_sha256: str,
                 shard_tokens: int):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens: expected a positive number, got {shard_tokens}")
        self.out_dir, self.split = out_dir, split
        self.vocab_size, self.tokenizer_sha256 = vocab_size, tokenizer_sha256
        self.buf = np.empty(shard_tokens, dtype=token_dtype(vocab_size))
        self.fill = 0
        self.shards: list[str] = []
        self.tokens = 0

    def write(self, tokens) -> None:
        tokens = np.asarray(tokens)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"{self.split}: token ids must lie in [0, {self.vocab_size}), got "
                             f"[{tokens.min()}, {tokens.max()}]")
        while len(tokens):
            n = min(len(tokens), len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + n] = tokens[:n]
            self.fill += n
            tokens = tokens[n:]
            if self.fill == len(self.buf):
                self._flush()

    def close(self) -> dict:
        """Flush the last partial shard; returns this split's entry of meta.json."""
        if self.fill or not self.shards:
            self._flush()
        return {"shards": self.shards, "tokens": self.tokens}

    def _flush(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        path = os.path.join(self.out_dir, name)
        with atomic_path(path) as tmp:
            self.buf[:self.fill].tofile(tmp)
        write_json(header_path(path), {
            "format": FORMAT, "split": self.split, "dtype": self.buf.dtype.name,
            "vocab_size": self.vocab_size, "tokenizer_sha256": self.tokenizer_sha256,
            "tokens": self.fill})
        self.shards.append(name)
        self.tokens += self.fill
        self.fill = 0
