"""data_prep sources and tokenizers beyond the defaults: compressed files, reading errors with file
and line, hf: options and hf-disk:, foreign tokenizers (sentencepiece, Hugging Face), --workers."""
import gzip
import json
import re
import sys

import numpy as np
import pytest

from data_prep.cli import _split_of, main
from data_prep.sources import HFOptions, documents
from llm.data import DataError, TokenShards, WindowLoader, load_tokenizer
from llm.data.tokenizer import HFTokenizer


@pytest.fixture(scope="module")
def docs(data_topics):
    return [d for d in data_topics[:40] if d.strip()]


def _write_jsonl(path, docs, field="text"):
    data = "".join(json.dumps({field: d}) + "\n" for d in docs).encode()
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    elif path.suffix == ".zst":
        data = pytest.importorskip("zstandard").ZstdCompressor().compress(data)
    path.write_bytes(data)


def _bins(out):
    return {f.name: f.read_bytes() for f in sorted(out.glob("*.bin"))}


def _tokenize(source, out, tokenizer, *extra):
    return main(["tokenize", "--source", source, "--out", str(out), "--tokenizer", str(tokenizer),
                 "--val-fraction", "0.2", "--min-val-tokens", "500", "--shard-tokens", "20000", *extra])


def test_compressed_files_read_like_plain_ones(tmp_path, docs, data_dir):
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        _write_jsonl(tmp_path / name, docs)
    (tmp_path / "d.txt.gz").write_bytes(gzip.compress(docs[0].encode()))
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        assert list(documents(f"files:{tmp_path}/{name}")) == docs
    assert list(documents(f"files:{tmp_path}/*.txt.gz")) == [docs[0]]
    for name in ("a.jsonl", "c.jsonl.zst"):
        assert _tokenize(f"files:{tmp_path}/{name}", tmp_path / name.replace(".", "_"), data_dir) == 0
    assert _bins(tmp_path / "a_jsonl") == _bins(tmp_path / "c_jsonl_zst")
    (tmp_path / "e.parquet.gz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"e\.parquet\.gz: unsupported file type '\.parquet\.gz'"):
        documents(f"files:{tmp_path}/e.*")


def test_reading_errors_name_the_file_and_line(tmp_path, data_dir, capsys):
    cases = {"a.txt": ("first line\nsecond\nthird caf\xe9\n".encode("latin-1"),
                       r"a\.txt:3: byte 0xe9 at column 10 is not UTF-8 .*expected UTF-8 text"),
             "b.jsonl": (b'{"text": "ok"}\n{"text": "no closing quote}\n',
                         r"b\.jsonl:2: not valid JSON \(Unterminated string starting at: column 10\); expected one JSON object per line"),
             "c.jsonl.gz": (gzip.compress('{"text": "ok"}\n\n{"text": "caf\xe9"}\n'.encode("latin-1")),
                            r"c\.jsonl\.gz:3: byte 0xe9 at column 14 is not UTF-8"),
             "d.jsonl.gz": (b"not gzip at all", r"d\.jsonl\.gz: cannot read it \(Not a gzipped file")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        out = tmp_path / f"out_{name}"
        assert _tokenize(f"files:{tmp_path}/{name}", out, data_dir) == 1
        assert not out.exists()
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / name}:") and re.search(message, err), err


def test_hf_sources_with_data_files_data_dir_and_disk(tmp_path, docs, data_dir):
    datasets, pq = pytest.importorskip("datasets"), pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"body": docs[:20]}), tmp_path / "pq" / "a.parquet")
    pq.write_table(pa.table({"body": docs[20:]}), tmp_path / "pq" / "b.parquet")
    _write_jsonl(tmp_path / "a.jsonl", docs)
    assert list(documents("hf:parquet", "body", HFOptions(data_dir=str(tmp_path / "pq")))) == docs
    assert list(documents("hf:json", "text", HFOptions(data_files=[str(tmp_path / "a.jsonl")]))) == docs
    with pytest.raises(ValueError, match="hf:parquet reads files of one format: give them with --hf-data-files"):
        documents("hf:parquet")
    with pytest.raises(ValueError, match="apply only to hf: sources"):
        documents(f"files:{tmp_path}/a.jsonl", hf=HFOptions(revision="main"))

    one = datasets.Dataset.from_dict({"body": docs, "n": list(range(len(docs)))})
    one.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": one.select(range(5)), "validation": one}).save_to_disk(str(tmp_path / "dict"))
    assert list(documents(f"hf-disk:{tmp_path}/one", "body")) == docs
    assert list(documents(f"hf-disk:{tmp_path}/dict", "body", HFOptions(split="validation"))) == docs
    with pytest.raises(ValueError, match=r"no split 'test' \(splits: \['train', 'validation'\]\); choose one with --hf-split"):
        documents(f"hf-disk:{tmp_path}/dict", "body", HFOptions(split="test"))
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['body', 'n'\]\)"):
        documents(f"hf-disk:{tmp_path}/one")
    with pytest.raises(ValueError, match="not a dataset saved with save_to_disk"):
        documents(f"hf-disk:{tmp_path}/nope")
    # Through the CLI: the same documents give the same shards whatever the source.
    assert _tokenize(f"files:{tmp_path}/a.jsonl", tmp_path / "from_files", data_dir) == 0
    assert _tokenize(f"hf-disk:{tmp_path}/dict", tmp_path / "from_disk", data_dir, "--text-field", "body",
                     "--hf-split", "validation") == 0
    assert _tokenize("hf:parquet", tmp_path / "from_hf", data_dir, "--text-field", "body",
                     "--hf-data-files", f"{tmp_path}/pq/*.parquet") == 0
    assert _bins(tmp_path / "from_files") == _bins(tmp_path / "from_disk") == _bins(tmp_path / "from_hf")


def _hf_tokenizer(path, docs):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    return path


def _sentencepiece_without_sep(path, docs):
    import sentencepiece as spm

    path.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_prefix=str(path / "m"), vocab_size=600,
                                   model_type="unigram", minloglevel=2)
    return path / "m.model"


@pytest.mark.parametrize("kind", ["huggingface", "sentencepiece"])
def test_a_foreign_tokenizer_without_sep_trains_but_refuses_bi_induct(tmp_path, docs, kind, capsys):
    make = _hf_tokenizer if kind == "huggingface" else _sentencepiece_without_sep
    given = make(tmp_path / "tok", docs)
    out = tmp_path / "out"
    src = tmp_path / "a.jsonl"
    _write_jsonl(src, docs)
    assert _tokenize(f"files:{src}", out, given) == 0
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(str(out))
    assert meta["tokenizer"]["file"] == ("tokenizer.json" if kind == "huggingface" else "tokenizer.model")
    assert isinstance(tok, HFTokenizer) == (kind == "huggingface")
    assert meta["special_ids"]["sep"] is None and meta["special_ids"]["eos"] == tok.eos_id is not None
    train = TokenShards(out, "train")
    stream = train.slice(0, train.num_tokens)
    assert stream[-1] == tok.eos_id and stream.max() < tok.vocab_size
    first = stream[:int(np.flatnonzero(stream == tok.eos_id)[0])]
    if kind == "huggingface":  # byte-level BPE decodes back exactly (this sentencepiece normalizes)
        assert tok.decode(first) == next(d for d in docs if _split_of(d, 0.2) == "train")
    WindowLoader(train, 32, seed=0, global_batch_size=2).sample(0)  # plain training reads it
    with pytest.raises(DataError, match=rf"Bi-Induct needs a <sep> token, and the tokenizer of {out} "
                                        rf"\({out / meta['tokenizer']['file']}\) has none"):
        WindowLoader(train, 32, seed=0, global_batch_size=2, bi_induct={"mode": "forward", "rate": 0.3})
    assert main(["bi-induct", "--in", str(out), "--out", str(tmp_path / "bi"), "--mode", "forward",
                 "--seq-len", "64"]) == 1
    assert "Bi-Induct needs a <sep> token" in capsys.readouterr().err and not (tmp_path / "bi").exists()


def test_bad_tokenizer_files_and_a_missing_library_are_clear_errors(tmp_path, docs, monkeypatch):
    (tmp_path / "x.model").write_bytes(b"\x00 not a model")
    with pytest.raises(ValueError, match=r"x\.model: not a sentencepiece model .*expected a sentencepiece "
                                         r"\.model or a Hugging Face tokenizer\.json"):
        load_tokenizer(str(tmp_path / "x.model"))
    (tmp_path / "y.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=r"y\.json: not a valid tokenizer\.json"):
        load_tokenizer(str(tmp_path / "y.json"))
    path = _hf_tokenizer(tmp_path / "tok", docs) / "tokenizer.json"
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as if not installed
    with pytest.raises(ValueError, match=r"tokenizer\.json: reading it needs the tokenizers package "
                                         r"\(pip install tokenizers\)"):
        load_tokenizer(str(path))


def test_workers_give_the_same_bytes(tmp_path, data_topics, data_dir):
    paragraphs = [p for d in data_topics for p in d.split("\n\n") if p.strip()]
    assert len(paragraphs) > 3 * 512  # several batches, so the workers share the work
    src = tmp_path / "p.jsonl"
    _write_jsonl(src, paragraphs)
    outs = [tmp_path / f"w{n}" for n in (1, 2, 3)]
    for n, out in zip((1, 2, 3), outs):
        assert _tokenize(f"files:{src}", out, data_dir, "--workers", str(n)) == 0
    files = [{f.name: f.read_bytes() for f in out.iterdir()} for out in outs]
    assert files[0] == files[1] == files[2] and len(files[0]) > 6
    assert _tokenize(f"files:{src}", tmp_path / "w0", data_dir, "--workers", "0") == 1
