"""The on-disk format of a tokenized corpus directory: its writer and its reader.

    meta.json            written last; its presence marks the directory complete
    tokenizer.model      the tokenizer: a sentencepiece model (or tokenizer.json, a Hugging Face one)
    train-00000.bin ...  flat token arrays (little-endian uint16, uint32 for vocabularies > 65536)
    train-00000.json     the shard's header: format, split, dtype, vocab_size, tokenizer_sha256, tokens
    val-00000.bin ...

A directory is built whole in a temporary directory beside its destination and swapped in only
when complete (`building`, through `llm.files.atomic_path`): a run that fails or is killed leaves
the old directory as it was. `TokenShards` reads one split and validates every file against
meta.json and the headers.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil

import numpy as np

from llm.files import atomic_path, write_json

FORMAT = 1
META = "meta.json"
TOKENIZER_FILE = "tokenizer.model"
SEP_PIECE = "<sep>"  # Bi-Induct's separator token
SPLITS = ("train", "val")
META_FIELDS = ("vocab_size", "special_ids.eos", "special_ids.sep", "tokenizer.file", "tokenizer.sha256",
               *(f"splits.{split}.{key}" for split in SPLITS for key in ("shards", "tokens")))


class DataError(ValueError):
    """Token data is missing, incomplete, corrupt or does not fit the config; names the file."""


def make_command(path) -> str:
    return f"python -m data_prep tokenize --source builtin:python-docs --out {path}"


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


# What a data directory may hold (see the module docstring); anything else in --out is not ours to replace.
DATA_DIRECTORY_FILE = re.compile(r"meta\.json|tokenizer\.(model|json)|bi_induct_stats\.json|(train|val)-\d{5}\.(bin|json)"
                                 r"|.+\.tmp\.\d+")  # the last: temporaries of an interrupted older writer


@contextlib.contextmanager
def building(out_dir: str):
    """Yield a new, empty directory beside `out_dir` to build a data directory in; when the block
    succeeds (after `finish`), it replaces `out_dir`; when it fails, it is removed and `out_dir`
    is untouched. `out_dir` must be absent, empty, or a data directory (complete or not)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir):
        foreign = sorted(n for n in os.listdir(out_dir) if not DATA_DIRECTORY_FILE.fullmatch(n))
        if foreign:
            raise DataError(f"{out_dir} exists and holds files a data directory does not "
                            f"({', '.join(foreign[:5])}): building here would replace them; choose a "
                            f"new or empty directory")
    elif os.path.exists(out_dir):
        raise DataError(f"{out_dir} exists and is not a directory")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    with atomic_path(out_dir) as tmp:
        os.mkdir(tmp)
        yield tmp


def finish(build_dir: str, meta: dict) -> None:
    """Write meta.json, the file that marks a data directory complete (last)."""
    write_json(os.path.join(build_dir, META), meta)


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


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e}); remake the directory with: "
                        f"{make_command(os.path.dirname(path))}") from None


def read_meta(data_dir: str) -> dict:
    """The meta.json of a complete data directory, checked to have the fields readers use."""
    meta_path = os.path.join(data_dir, META)
    if not os.path.isfile(meta_path):
        what = ("does not exist" if not os.path.isdir(data_dir)
                else f"has no {META} (incomplete, or not a data directory)")
        raise DataError(f"data directory {data_dir} {what}; make it with: {make_command(data_dir)}")
    meta = _read_json(meta_path)
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT:
        raise DataError(f"{meta_path}: format {found!r}, this code reads format {FORMAT}; "
                        f"remake it with: {make_command(data_dir)}")
    for key in META_FIELDS:
        node = meta
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise DataError(f"{meta_path}: missing field {key}; remake it with: {make_command(data_dir)}")
            node = node[part]
    return meta


def tokenizer_path(data_dir: str, meta: dict) -> str:
    """The tokenizer file `meta` (data_dir's meta.json) names, checked to be that file (sha256)."""
    path, sha = os.path.join(data_dir, meta["tokenizer"]["file"]), meta["tokenizer"]["sha256"]
    if not os.path.isfile(path) or file_sha256(path) != sha:
        raise DataError(f"{path}: missing or not the tokenizer {META} names (sha256 {sha[:12]}...); "
                        f"remake the directory with: {make_command(data_dir)}")
    return path


class TokenShards:
    """One split ("train" or "val") of a directory written by `python -m data_prep tokenize`."""

    def __init__(self, path, split: str):
        self.path = os.fspath(path)
        meta = self.meta = read_meta(self.path)
        if split not in SPLITS:
            raise DataError(f"split: got {split!r}, expected one of {', '.join(SPLITS)}")
        self.vocab_size = int(meta["vocab_size"])
        self.eos_id, self.sep_id = meta["special_ids"]["eos"], meta["special_ids"]["sep"]  # sep: None if absent
        self.tokenizer_path = tokenizer_path(self.path, meta)
        self.dtype = token_dtype(self.vocab_size)
        self.split = split
        entry = meta["splits"][split]
        self.files = [os.path.join(self.path, name) for name in entry["shards"]]
        self.arrays = [self._open(f, meta["tokenizer"]["sha256"]) for f in self.files]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.num_tokens = int(self.offsets[-1])
        if self.num_tokens != entry["tokens"]:
            raise DataError(f"{os.path.join(self.path, META)}: splits.{split}.tokens={entry['tokens']} but "
                            f"its shards hold {self.num_tokens} tokens")

    def _open(self, file: str, sha: str) -> np.ndarray:
        head_file = header_path(file)
        if not os.path.isfile(file) or not os.path.isfile(head_file):
            raise DataError(f"{file}: shard or its header {os.path.basename(head_file)} is missing; "
                            f"remake the directory with: {make_command(self.path)}")
        head = _read_json(head_file)
        expected = {"dtype": self.dtype.name, "vocab_size": self.vocab_size, "tokenizer_sha256": sha}
        for key, want in expected.items():
            if head.get(key) != want:
                raise DataError(f"{head_file}: {key}={head.get(key)!r}, expected {want!r} (from {META})")
        if not isinstance(head.get("tokens"), int) or head["tokens"] < 0:
            raise DataError(f"{head_file}: tokens={head.get('tokens')!r}, expected a token count")
        size, want = os.path.getsize(file), head["tokens"] * self.dtype.itemsize
        if size != want:
            raise DataError(f"{file}: {size} bytes, expected {want} ({head['tokens']} {self.dtype.name} "
                            f"tokens per its header): truncated or corrupt; remake it with: "
                            f"{make_command(self.path)}")
        if not head["tokens"]:
            return np.empty(0, dtype=self.dtype)
        return np.memmap(file, dtype=self.dtype, mode="r", shape=(head["tokens"],))

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's concatenated stream (a copy)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"slice [{start}, {stop}) outside the {self.num_tokens} tokens of "
                             f"{self.path} {self.split}")
        out = np.empty(stop - start, dtype=self.dtype)
        pos, i = start, int(np.searchsorted(self.offsets, start, side="right")) - 1
        while pos < stop:
            shard_start = self.offsets[i]
            piece = self.arrays[i][pos - shard_start:stop - shard_start]
            if len(piece) and piece.max() >= self.vocab_size:
                raise DataError(f"{self.files[i]}: token id {int(piece.max())} >= vocab_size "
                                f"{self.vocab_size}: corrupt shard; remake it with: {make_command(self.path)}")
            out[pos - start:pos - start + len(piece)] = piece
            pos, i = pos + len(piece), i + 1
        return out

    def num_windows(self, seq_len: int) -> int:
        """How many windows of seq_len + 1 tokens (neighbours share their edge token) the split
        holds; a DataError if not even one: check this before training starts."""
        n = (self.num_tokens - 1) // seq_len
        if n < 1:
            raise DataError(f"data.seq_len={seq_len} is longer than the data: {self.path} {self.split} "
                            f"holds {self.num_tokens} tokens, fewer than one window of seq_len + 1 = "
                            f"{seq_len + 1}; lower data.seq_len or use a larger corpus")
        return n

    def require_sep(self) -> int:
        """The separator id Bi-Induct needs; a DataError naming the tokenizer if it has none."""
        if self.sep_id is None:
            raise DataError(f"Bi-Induct needs a {SEP_PIECE} token, and the tokenizer of {self.path} "
                            f"({self.tokenizer_path}) has none: tokenize with a tokenizer that has it (one "
                            f"`python -m data_prep tokenize` trains, i.e. without --tokenizer, does)")
        return self.sep_id

    @property
    def bi_induct(self):
        """The Bi-Induct rewrite these shards hold (`python -m data_prep bi-induct`), or None."""
        return self.meta.get("bi_induct")
