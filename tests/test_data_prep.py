import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep.cli import _split_of, main
from data_prep.sources import documents, python_docs
from llm.data import TokenShards
from llm.data.shards import file_sha256
from llm.data.tokenizer import load_tokenizer, train_tokenizer


def test_tokenizer_round_trip_and_special_ids(tmp_path, data_topics):
    tok = train_tokenizer(data_topics[:30], str(tmp_path / "a.model"), vocab_size=600)
    texts = [data_topics[40][:2000], "  leading spaces,\ttabs\n\n\nand   runs",
             "ünïcødé 日本語 🙂 – “quotes”",
             "def f(x):\n    return x ** 2  # 12345", ""]
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.vocab_size == 600
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.sep_id) == (0, 1, 2, 3)
    assert tok.encode("a<sep>b").count(tok.sep_id) == 1
    # Merges learned: fewer pieces than characters even at this small vocabulary (bytes would be 1:1).
    assert len(tok.encode(data_topics[40])) < len(data_topics[40]) / 1.5
    assert tok.sha256 == hashlib.sha256((tmp_path / "a.model").read_bytes()).hexdigest()
    # Deterministic training; load by file or by data directory.
    again = train_tokenizer(data_topics[:30], str(tmp_path / "b.model"), vocab_size=600)
    assert again.sha256 == tok.sha256
    assert load_tokenizer(str(tmp_path / "a.model")).encode(texts[0]) == tok.encode(texts[0])
    with pytest.raises(FileNotFoundError, match="python -m data_prep tokenize"):
        load_tokenizer(str(tmp_path))


def _decoded_documents(shards):
    tok = load_tokenizer(shards.path)
    stream = shards.slice(0, shards.num_tokens)
    assert stream[-1] == tok.eos_id
    docs = np.split(stream, np.flatnonzero(stream == tok.eos_id) + 1)[:-1]  # each ends with eos
    return [tok.decode(d[:-1]) for d in docs]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_tokenize_files_end_to_end(tmp_path, data_topics, kind):
    docs = [d for d in data_topics[:40] if d.strip()]
    src = tmp_path / "src"
    src.mkdir()
    if kind == "txt":
        for i, d in enumerate(docs):
            (src / f"{i:03d}.txt").write_text(d)
        extra = []
    elif kind == "jsonl":
        with open(src / "a.jsonl", "w") as f:
            for d in docs:
                f.write(json.dumps({"id": 1, "body": d}) + "\n")
        extra = ["--text-field", "body"]
    else:
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table({"body": docs}), src / "a.parquet")
        extra = ["--text-field", "body"]
    out = tmp_path / "out"
    rc = main(["tokenize", "--source", f"files:{src}/*.{kind}", "--out", str(out), "--vocab-size", "512",
               "--val-fraction", "0.2", "--min-val-tokens", "500", "--shard-tokens", "15000", *extra])
    assert rc == 0
    meta = json.loads((out / "meta.json").read_text())
    expected = {s: [d for d in docs if _split_of(d, 0.2) == s] for s in ("train", "val")}
    for split in ("train", "val"):
        shards = TokenShards(out, split)
        assert shards.vocab_size == 512 and shards.eos_id == 2 and shards.sep_id == 3
        assert shards.num_tokens == meta["splits"][split]["tokens"]
        assert meta["splits"][split]["documents"] == len(expected[split]) > 0
        # Documents come back in order, joined by eos, through the memory-mapped shards.
        assert _decoded_documents(shards) == expected[split]
        for name in meta["splits"][split]["shards"]:
            head = json.loads((out / name.replace(".bin", ".json")).read_text())
            assert head["dtype"] == "uint16" and head["vocab_size"] == 512
            assert head["tokenizer_sha256"] == file_sha256(str(out / "tokenizer.model"))
            assert os.path.getsize(out / name) == 2 * head["tokens"]
    assert len(meta["splits"]["train"]["shards"]) > 1


def test_builtin_python_docs_is_real_english_and_deterministic():
    docs = python_docs()
    text = "\n".join(docs)
    assert len(text.encode()) > 1_000_000
    assert len(docs) > 300
    words = text.lower().split()
    assert sum(w in ("the", "a", "of", "is", "to", "and") for w in words) > 0.08 * len(words)
    assert any(d.startswith("json\n\nJSON (JavaScript Object Notation)") for d in docs)
    digest = hashlib.sha256(text.encode()).hexdigest()
    # Same text in a fresh interpreter (import order and cached modules do not matter).
    code = ("import hashlib; from data_prep.sources import python_docs; "
            "print(hashlib.sha256('\\n'.join(python_docs()).encode()).hexdigest())")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == digest


def test_source_errors(tmp_path):
    with pytest.raises(ValueError, match="builtin:python-docs, files:<glob> or hf:"):
        documents("builtin:nope")
    with pytest.raises(ValueError, match="no files match"):
        list(documents(f"files:{tmp_path}/*.txt"))
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl:1: expected a string field 'text'.*--text-field"):
        list(documents(f"files:{tmp_path}/*.jsonl"))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match=r"a.csv: unsupported file type"):
        list(documents(f"files:{tmp_path}/*.csv"))


def _files(path):
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def test_failed_run_keeps_the_old_directory(tmp_path, data_dir, data_topics, capsys, monkeypatch):
    # A run into a complete directory builds beside it: failing (held-out split too small, a source
    # that matches nothing, a source that breaks mid-way) leaves the old directory byte-identical.
    out = tmp_path / "out"
    args = ["tokenize", "--source", f"files:{data_dir.parent}/*.txt", "--out", str(out),
            "--tokenizer", str(data_dir), "--val-fraction", "0.2", "--min-val-tokens", "1000"]
    assert main(args + ["--shard-tokens", "3000"]) == 0
    old = _files(out)
    assert len(old) > 10 and TokenShards(out, "train").num_tokens > 0
    assert main(args[:-1] + ["10000000"]) == 1
    assert "raise --val-fraction" in capsys.readouterr().err
    assert main(["tokenize", "--source", f"files:{tmp_path}/nothing/*.txt", "--out", str(out)]) == 1
    assert "no files match" in capsys.readouterr().err

    def breaking_source(*_):  # the second batch never comes: killed after shards were written
        yield from (doc[:300] for doc in (data_topics * 10)[:600])
        assert list(tmp_path.glob("out.tmp.*/train-*.bin"))  # mid-build indeed
        raise KeyboardInterrupt

    monkeypatch.setattr("data_prep.cli.documents", breaking_source)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--shard-tokens", "3000"])
    monkeypatch.undo()
    assert _files(out) == old and os.listdir(tmp_path) == ["out"]  # no temporary left either
    assert TokenShards(out, "train").num_tokens == TokenShards(data_dir.parent / "shards", "train").num_tokens
    # A reused tokenizer is copied unchanged; a successful rerun replaces the directory whole
    # (no shard of the old run stays).
    assert file_sha256(str(out / "tokenizer.model")) == file_sha256(str(data_dir / "tokenizer.model"))
    assert main(args) == 0
    meta = json.loads((out / "meta.json").read_text())
    listed = {n for e in meta["splits"].values() for n in e["shards"]}
    assert {f.name for f in out.glob("*.bin")} == listed and len(listed) < len([n for n in old if n.endswith(".bin")])


def test_out_holding_other_files_is_refused(tmp_path, data_dir, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["tokenize", "--source", f"files:{data_dir.parent}/*.txt", "--out", str(mine),
                 "--tokenizer", str(data_dir)]) == 1
    assert "holds files a data directory does not (notes.txt)" in capsys.readouterr().err
    assert _files(mine) == {"notes.txt": b"keep me"}


def test_failed_bi_induct_keeps_the_old_directory(tmp_path, data_dir, monkeypatch):
    out = tmp_path / "bi"
    args = ["bi-induct", "--in", str(data_dir), "--out", str(out), "--mode", "forward", "--rate", "0.3",
            "--span", "4", "8", "--seq-len", "32"]
    assert main(args) == 0
    old = _files(out)

    def failing_rewrite(*_, **__):
        raise OSError("No space left on device")

    monkeypatch.setattr("data_prep.cli.rewrite", failing_rewrite)
    with pytest.raises(OSError, match="No space left"):
        main(args[:-1] + ["64"])
    assert _files(out) == old and os.listdir(tmp_path) == ["bi"]
    assert TokenShards(out, "train").bi_induct["seq_len"] == 32
    assert main(["bi-induct", "--in", str(tmp_path / "nope"), *args[3:]]) == 1  # a missing source
    assert _files(out) == old
