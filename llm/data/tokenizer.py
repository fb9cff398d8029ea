"""The sentencepiece BPE tokenizer: training it on documents, and `load_tokenizer`, the one way
every part of the library loads it (from a data directory, an exported model directory or a file).

Reserved ids: 0 <unk>, 1 <s> (bos), 2 </s> (eos, joins documents in the shards), 3 <sep> (Bi-Induct's
separator), 4 a newline piece. Byte fallback makes any text encodable, and the text is not
normalized (identity rule, whitespace kept), so decode(encode(text)) == text.
"""
import io
import os
from typing import Iterable

import sentencepiece as spm

from llm.data.shards import META, TOKENIZER_FILE, file_sha256, make_command, read_meta, tokenizer_path
from llm.files import write_atomic

SEP_PIECE = "<sep>"


class Tokenizer:
    def __init__(self, model_path: str):
        self.path = os.path.abspath(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.sha256 = file_sha256(self.path)
        self.vocab_size = self.sp.vocab_size()
        self.unk_id, self.bos_id, self.eos_id = self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()
        self.sep_id = self.sp.piece_to_id(SEP_PIECE)
        if self.sep_id == self.unk_id:
            raise ValueError(f"{self.path}: the tokenizer has no {SEP_PIECE} piece; train it with "
                             f"`python -m data_prep tokenize` (llm.data.tokenizer.train_tokenizer)")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def special_ids(self) -> dict:
        return {"unk": self.unk_id, "bos": self.bos_id, "eos": self.eos_id, "sep": self.sep_id}


def train_tokenizer(docs: Iterable[str], out_path: str, vocab_size: int = 4096) -> Tokenizer:
    """Train on `docs` (all of them: pass a sample for large corpora) and write `out_path`.
    Deterministic: the same documents give the same model file."""
    # sentencepiece trains on "sentences": lines, which keeps pieces from spanning a newline.
    lines = (line for doc in docs for line in doc.split("\n") if line.strip())
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, model_type="bpe", vocab_size=vocab_size,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=[SEP_PIECE, "\n"],
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True, character_coverage=0.9995,
            max_sentence_length=1 << 16, minloglevel=2)
    except RuntimeError as e:  # e.g. "Vocabulary size too high" for a small corpus
        raise ValueError(f"sentencepiece training (vocab_size={vocab_size}) failed: {e}") from None
    write_atomic(out_path, model.getvalue())
    return Tokenizer(out_path)


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a data directory (the file its meta.json names, checked against the sha256
    recorded there), of a directory without meta.json (its tokenizer.model: an export), or a .model file."""
    if os.path.isfile(os.path.join(path, META)):
        return Tokenizer(tokenizer_path(path, read_meta(path)))
    model_file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"{model_file}: no tokenizer here; make one with: {make_command(path)}")
    return Tokenizer(model_file)
