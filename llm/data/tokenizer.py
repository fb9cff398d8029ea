"""Tokenizers behind one interface, and `load_tokenizer`, the one way every part of the library loads
one (from a data directory, an exported model directory or a file):

    SentencePieceTokenizer  a sentencepiece .model: the one `train_tokenizer` makes, or any other
    HFTokenizer             a Hugging Face `tokenizers` tokenizer.json (needs the tokenizers package)

Trained here (sentencepiece BPE): reserved ids 0 <unk>, 1 <s> (bos), 2 </s> (eos, joins documents in
the shards), 3 <sep> (Bi-Induct's separator), 4 a newline piece. Byte fallback makes any text
encodable, and the text is not normalized (identity rule, whitespace kept), so
decode(encode(text)) == text.

Any tokenizer needs an end-of-document token: sentencepiece's eos id, or for a tokenizer.json a token
named one of EOS_TOKENS. <sep> is needed only by Bi-Induct (`sep_id` is None without it). Encoding
adds no special tokens (documents are joined by eos in the shards, nothing else).
"""
import io
import os
from typing import Iterable

import sentencepiece as spm

from llm.data.shards import META, SEP_PIECE, TOKENIZER_FILE, file_sha256, make_command, read_meta, tokenizer_path
from llm.files import write_atomic

HF_TOKENIZER_FILE = "tokenizer.json"
# Names the common tokenizer.json files give their special tokens, in the order they are looked for.
EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>")
UNK_TOKENS = ("<unk>", "[UNK]")


class Tokenizer:
    """What every tokenizer offers: its file (and sha256), the ids of its special tokens (None where
    it has none), encode / encode_batch / decode. `file_name` is its name in a data directory."""
    file_name: str

    def __init__(self, path: str, vocab_size: int, unk_id, bos_id, eos_id, sep_id):
        self.path = os.path.abspath(path)
        self.sha256 = file_sha256(self.path)
        self.vocab_size = vocab_size
        self.unk_id, self.bos_id, self.eos_id, self.sep_id = unk_id, bos_id, eos_id, sep_id
        if eos_id is None:
            raise ValueError(f"{self.path}: the tokenizer has no end-of-document token (sentencepiece's "
                             f"eos, or a token named one of {', '.join(EOS_TOKENS)}): the shards join "
                             f"documents with it")

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def special_ids(self) -> dict:
        return {"unk": self.unk_id, "bos": self.bos_id, "eos": self.eos_id, "sep": self.sep_id}


class SentencePieceTokenizer(Tokenizer):
    file_name = TOKENIZER_FILE

    def __init__(self, model_path: str):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_path}: not a sentencepiece model ({e}); expected a sentencepiece "
                             f".model or a Hugging Face {HF_TOKENIZER_FILE}") from None
        sp = self.sp
        some = lambda i: i if i >= 0 else None  # sentencepiece gives -1 for a disabled id
        sep = sp.piece_to_id(SEP_PIECE)  # an unknown piece maps to unk
        super().__init__(model_path, sp.vocab_size(), some(sp.unk_id()), some(sp.bos_id()),
                         some(sp.eos_id()), sep if sep != sp.unk_id() else None)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=0)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    file_name = HF_TOKENIZER_FILE

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as TokenizersTokenizer
        except ImportError:
            raise ValueError(f"{path} is a Hugging Face tokenizer.json: reading it needs the tokenizers "
                             f"package (pip install tokenizers)") from None
        try:
            self.hf = TokenizersTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{path}: not a valid {HF_TOKENIZER_FILE} ({e})") from None
        first = lambda names: next((i for i in map(self.hf.token_to_id, names) if i is not None), None)
        super().__init__(path, self.hf.get_vocab_size(with_added_tokens=True), first(UNK_TOKENS),
                         first(BOS_TOKENS), first(EOS_TOKENS), self.hf.token_to_id(SEP_PIECE))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)


def train_tokenizer(docs: Iterable[str], out_path: str, vocab_size: int = 4096) -> SentencePieceTokenizer:
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
    return SentencePieceTokenizer(out_path)


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a data directory (the file its meta.json names, checked against the sha256
    recorded there), of a directory without meta.json (its tokenizer.model or tokenizer.json: an
    export, or a Hugging Face tokenizer directory), or a file: a tokenizer.json (JSON) or a
    sentencepiece model."""
    if os.path.isfile(os.path.join(path, META)):
        return open_tokenizer(tokenizer_path(path, read_meta(path)))
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in (TOKENIZER_FILE, HF_TOKENIZER_FILE)]
        found = [f for f in found if os.path.isfile(f)]
        if not found:
            raise FileNotFoundError(f"{path}: no tokenizer here (no {TOKENIZER_FILE} or {HF_TOKENIZER_FILE}); "
                                    f"make one with: {make_command(path)}")
        return open_tokenizer(found[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no tokenizer here; make one with: {make_command(path)}")
    return open_tokenizer(path)


def open_tokenizer(file: str) -> Tokenizer:
    """A tokenizer file by its content: JSON is a tokenizer.json, anything else a sentencepiece model."""
    with open(file, "rb") as f:
        is_json = f.read(256).lstrip().startswith(b"{")
    return (HFTokenizer if is_json else SentencePieceTokenizer)(file)
