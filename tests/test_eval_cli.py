"""`python -m llm eval` end to end on a run directory written here (config + checkpoints in the
layout llm.checkpoint reads), and `python -m llm plot` on what it wrote."""
import json

import pytest
import torch

from llm.__main__ import main as llm_main
from llm.config import build_config, save_config
from llm.model import build_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("run")
    cfg = build_config({"model": {"vocab_size": 512, "d_model": 32, "n_layers": 3, "n_heads": 4,
                                  "layer_pattern": ["softmax", "gated_deltanet", "momentum"]},
                        "data": {"path": str(data_dir), "seq_len": 64}, "train": {"out_dir": str(run)}})
    save_config(cfg, run / "config.yaml")
    for step in (1, 2):
        torch.manual_seed(step)
        tag = run / "checkpoints" / f"step_{step:08d}"
        tag.mkdir(parents=True)
        torch.save({"module": build_model(cfg.model).state_dict()}, tag / "mp_rank_00_model_states.pt")
        (tag / "complete.json").write_text(json.dumps({"step": step}))
    (run / "checkpoints" / "latest").write_text("step_00000002")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "val_loss": 6.3, "val_ppl": 545.0},
        {"step": 1, "loss": 6.2, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1e3, "mfu": 0.01, "tokens": 1024},
        {"step": 2, "loss": 6.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1e3, "mfu": 0.01, "tokens": 2048,
         "val_loss": 6.1, "val_ppl": 446.0}]))
    return run


def read(run, name):
    return json.loads((run / "eval" / f"{name}.json").read_text())


def test_ppl_icl_and_induction(run_dir, data_dir, capsys):
    llm_main(["eval", str(run_dir), "--ppl", "--shards", str(data_dir), "--icl", "--icl-k", "2",
              "--icl-episodes", "4", "--induction", "--ablate", "--ablate-seeds", "2", "--all-checkpoints",
              "--repeat-batch", "4", "--windows", "4"])
    printed = capsys.readouterr().out
    assert "bpb" in printed and "greedy" in printed and "induction heads off" in printed

    ppl = read(run_dir, "ppl")
    assert ppl["tag"] == "step_00000002" and list(ppl["datasets"]) == [str(data_dir)]  # same dir: one entry
    res = ppl["datasets"][str(data_dir)]
    assert res["windows"] == 4 and res["seq_len"] == 64 and 0 < res["bits_per_byte"] < 20

    icl = read(run_dir, "icl")
    assert set(icl["results"]["copy"]) == {"2"} and "->" in icl["examples_k2"]["copy"]

    ind = read(run_dir, "induction")
    assert ind["repeat_len"] == 32
    assert [("induction" in e) for e in ind["layers"]] == [True, False, True]
    assert all(len(e["induction"]) == 4 for e in ind["layers"] if "induction" in e)
    ab = ind["ablation"]
    assert ab["induction_heads"].keys() == {"0", "2"} and set(ab["baseline"]) == {
        "val_loss", "copy_loss_second", "icl_greedy", "icl_choice"}
    assert ab["change_induction"]["val_loss"] != 0  # zeroing heads changes the model
    assert [c["step"] for c in ind["checkpoints"]] == [1, 2]
    assert ind["checkpoints"][1]["induction"][0] == pytest.approx(ind["layers"][0]["induction"])
    assert ind["checkpoints"][0]["induction"][0] != pytest.approx(ind["layers"][0]["induction"])
    assert ind["checkpoints"][0]["induction"][1] is None

    llm_main(["plot", str(run_dir)])
    plots = sorted(p.name for p in (run_dir / "plots").iterdir())
    assert plots == ["loss_curves.png", f"{run_dir.name}_induction.png", f"{run_dir.name}_induction_evolution.png"]


def test_harness_offline_with_local_task(run_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"q": q, "choices": c, "label": 0}) + "\n" for q, c in [
        ("The value", ["of", "class"]), ("A function", ["name", "is"])]))
    (tmp_path / "mc.yaml").write_text(
        f"task: local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    llm_main(["eval", str(run_dir), "--tasks", "local_mc", "--include-path", str(tmp_path)])
    res = read(run_dir, "harness")["tasks"]["local_mc"]
    assert res["acc,none"] in (0.0, 0.5, 1.0) and res["tag"] == "step_00000002" and res["num_fewshot"] == 0


def test_adapter_is_registered_and_loads_a_run(run_dir):
    from lm_eval.api.registry import get_model

    from llm.eval.harness import LLMAdapter
    assert get_model("llm") is LLMAdapter
    lm = LLMAdapter.create_from_arg_string(f"run_dir={run_dir},batch_size=4")
    assert lm.max_length == 64 and lm.batch_size == 4 and len(lm.model.blocks) == 3


def test_generate_command_continues_the_prompt(run_dir, capsys):
    from llm.eval import decode_continuation, load_run
    from llm.generate import generate

    model, _, tok, tag = load_run(run_dir)
    assert tag == "step_00000002"
    prompt = tok.encode("The value of")
    want = "The value of" + decode_continuation(tok, prompt, generate(model, [prompt], 6)[0])
    llm_main(["generate", str(run_dir), "--prompt", "The value of", "--max-new-tokens", "6", "--temperature", "0"])
    assert capsys.readouterr().out == want + "\n"
    sampled = [llm_main(["generate", str(run_dir), "--prompt", "The value of", "--seed", "3"]) or
               capsys.readouterr().out for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0].startswith("The value of")


def test_usage_errors(run_dir):
    with pytest.raises(SystemExit):
        llm_main(["eval", str(run_dir)])
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        llm_main(["eval", str(run_dir / "checkpoints"), "--ppl"])
