"""lm-eval's own CLI through `python -m llm.eval.harness` (offline, on a local task), and the
adapter's handling of what that CLI passes: --device (default cuda:0), --batch_size (also auto),
model_args that name them too."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from fake_run import make_run
from llm.eval.harness import DEFAULT_BATCH, LLMAdapter

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 24
DOCS = [{"question": "The value of the", "choices": ["object", "class", "def"], "label": 0},
        {"question": "A function of the class " * 8, "choices": ["name", "is", "for"], "label": 1},  # > SEQ_LEN
        {"question": "x = 1 and y", "choices": ["= 2", "is not", "value"], "label": 2}]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("run")
    make_run(root, data_dir, {"layer_pattern": ["softmax", "gated_deltanet"]}, SEQ_LEN)
    return root


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "tiny.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (d / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {d / 'tiny.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    return d


def expected_accuracy(run) -> float:
    lm = LLMAdapter(run_dir=str(run), device="cpu")
    correct = 0
    for d in DOCS:  # lm-eval joins context and choice with a space
        reqs = [Instance("loglikelihood", {}, (d["question"], " " + c), 0) for c in d["choices"]]
        scores = [lp for lp, _ in lm.loglikelihood(reqs)]
        correct += max(range(3), key=scores.__getitem__) == d["label"]
    return correct / len(DOCS)


def test_lm_eval_cli_runs_the_llm_model(run, task_dir, tmp_path):
    """lm-eval's defaults included (device cuda:0 on a machine that may have no CUDA, batch size
    given both on the command line and in model_args), on an export directory."""
    from llm.__main__ import main as llm_main

    export = tmp_path / "export"
    llm_main(["export", str(run), "--out", str(export)])
    cmd = [sys.executable, "-m", "llm.eval.harness", "run", "--model", "llm",
           "--model_args", f"run_dir={export},batch_size=2", "--tasks", "tiny_mc",
           "--include_path", str(task_dir), "--batch_size", "auto", "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    print(output[-3000:])
    assert proc.returncode == 0, output[-3000:]
    assert "|tiny_mc|" in output
    assert f"3 of 9 requests were longer than max_length={SEQ_LEN} and were truncated from the left" in output
    if not torch.cuda.is_available():
        assert "device cuda:0 requested but CUDA is not available; using cpu" in output
    [results] = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(results.read_text())["results"]["tiny_mc"]["acc,none"]
    assert acc == pytest.approx(expected_accuracy(run))


def test_cli_arguments_meet_model_args(run):
    lm = LLMAdapter.create_from_arg_string(f"run_dir={run},batch_size=3,device=cpu",
                                           {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"})
    assert lm.batch_size == 3 and lm.device == torch.device("cpu")  # model_args win
    lm = LLMAdapter.create_from_arg_string(f"run_dir={run}", {"batch_size": "5", "device": "cpu"})
    assert lm.batch_size == 5 and lm.max_length == SEQ_LEN
    if not torch.cuda.is_available():
        assert LLMAdapter.create_from_arg_string(f"run_dir={run}", {"batch_size": "auto"}).batch_size == DEFAULT_BATCH
    with pytest.raises(ValueError, match="batch_size must be a positive integer, auto or auto:N"):
        LLMAdapter(run_dir=str(run), batch_size="many", device="cpu")
