import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests use tiny tensors: extra OpenMP threads only contend (multi-rank tests run in
    subprocesses, which torchrun gives one thread each)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_topics():
    """Real English documents: the pydoc topics (about 0.45 MB), sorted by name."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, data_topics):
    """A small tokenized directory (512-piece tokenizer, several train shards), made through the CLI.
    Shared: copy it before changing anything in it."""
    from data_prep.cli import main

    root = tmp_path_factory.mktemp("data_corpus")
    for i, doc in enumerate(data_topics[:40]):
        (root / f"doc{i:03d}.txt").write_text(doc)
    out = root / "shards"
    assert main(["tokenize", "--source", f"files:{root}/*.txt", "--out", str(out), "--vocab-size", "512",
                 "--val-fraction", "0.2", "--min-val-tokens", "1000", "--shard-tokens", "20000"]) == 0
    return out
