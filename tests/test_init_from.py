"""train.init_from: a run starts from a Llama / Qwen3 checkpoint directory (here our own export of a
run), and a checkpoint that does not fit the model is refused before training starts."""
import json

import pytest
import torch
import torch.nn.functional as F

from fake_run import make_run
from llm.data import TokenShards, eval_windows
from llm.export import export
from multiproc import TINY, launch, metrics, train, write_config


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("init_from")
    (root / "run").mkdir()
    model = make_run(root / "run", data_dir, {}, seq_len=TINY["data"]["seq_len"])
    assert export(str(root / "run"), str(root / "hf"), fmt="hf") == "llama"
    return root / "hf", model


@pytest.mark.slow
def test_training_starts_from_the_checkpoint(tmp_path, data_dir, llama_dir):
    hf_dir, model = llama_dir
    out = train(write_config(tmp_path / "tiny.yaml", data_dir), tmp_path / "run", "model.n_heads=4",
                "train.max_steps=1", f"train.init_from={hf_dir}", nproc=1)
    assert f"initialized from {hf_dir}" in out
    windows = eval_windows(TokenShards(str(data_dir), "val"), TINY["data"]["seq_len"], TINY["eval"]["windows"])
    with torch.no_grad():
        expected = F.cross_entropy(model(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten()).item()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step0 = next(r for r in records if r["step"] == 0)
    assert step0["val_loss"] == pytest.approx(expected, rel=1e-5)  # the held-out loss of the imported weights
    assert list(metrics(tmp_path / "run")) == [1]


@pytest.mark.slow
def test_a_checkpoint_of_another_shape_is_refused_by_name(tmp_path, data_dir, llama_dir):
    hf_dir, _ = llama_dir
    run = launch(write_config(tmp_path / "tiny.yaml", data_dir), tmp_path / "run", "model.n_heads=4",
                 "model.d_model=64", f"train.init_from={hf_dir}", nproc=1)
    assert run.wait() == 2
    assert f"train.init_from={hf_dir}" in run.output() and "does not fit the model config" in run.output()
    assert not (tmp_path / "run" / "checkpoints").exists()
