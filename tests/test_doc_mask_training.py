"""data.doc_mask through the trainer: the one step (llm.engine) and the held-out evaluation feed the
model the document starts derived from EOS, and a real DeepSpeed run trains with them."""
import pytest
import torch

from llm.config import OptimConfig
from llm.data import doc_starts
from llm.engine import PlainEngine, forward
from llm.model import build_model
from multiproc import metrics, train, write_config

TINY = {"vocab_size": 16, "d_model": 32, "n_layers": 2, "n_heads": 2}
EOS = 2


def test_forward_with_eos_feeds_the_document_starts():
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    engine = PlainEngine(model, OptimConfig(), max_steps=1)
    x = torch.randint(3, 16, (2, 12))
    x[0, 4] = x[1, 7] = EOS
    masked = forward(engine, x, EOS)
    torch.testing.assert_close(masked, model(x, doc_start=doc_starts(x, EOS)), rtol=0, atol=0)
    torch.testing.assert_close(forward(engine, x), model(x), rtol=0, atol=0)
    # positions after an EOS no longer see the document before it; those before it are unchanged
    assert not torch.allclose(masked[0, 5:], model(x)[0, 5:])
    torch.testing.assert_close(masked[0, :5], model(x)[0, :5])


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory, data_topics):
    """A tokenized directory of one-paragraph documents, so that most training windows hold an EOS."""
    from data_prep.cli import main

    root = tmp_path_factory.mktemp("short_docs")
    paragraphs = [p for doc in data_topics[:20] for p in doc.split("\n\n") if p.strip()]
    for i, paragraph in enumerate(paragraphs):
        (root / f"doc{i:04d}.txt").write_text(paragraph)
    assert main(["tokenize", "--source", f"files:{root}/*.txt", "--out", str(root / "shards"),
                 "--vocab-size", "512", "--val-fraction", "0.2", "--min-val-tokens", "1000"]) == 0
    return root / "shards"


@pytest.mark.slow
def test_a_run_with_doc_mask_trains_on_masked_documents(tmp_path, short_docs):
    """One rank, two steps, with and without the mask: the windows hold EOS, so the step-0
    held-out loss and the first step's loss (both before any update) differ, and training runs."""
    config = write_config(tmp_path / "tiny.yaml", short_docs)
    runs = {mask: tmp_path / f"mask_{mask}" for mask in (True, False)}
    for mask, run in runs.items():
        train(config, run, "train.max_steps=2", f"data.doc_mask={str(mask).lower()}", nproc=1)
    with_mask, without = (metrics(runs[m]) for m in (True, False))
    assert list(with_mask) == list(without) == [1, 2]
    assert with_mask[1]["loss"] != without[1]["loss"]
    assert with_mask[2]["val_loss"] != without[2]["val_loss"]
