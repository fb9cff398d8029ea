"""The one training step (llm.engine) on the plain-torch engine the probes use, the JSONL logs'
truncation on resume, the GPU peak table and the bench record of the trainer's step."""
import json
import math
from pathlib import Path

import pytest
import torch

from llm import bench
from llm.config import OptimConfig, load_config
from llm.engine import PlainEngine, lm_loss, train_step
from llm.flops import device_peak_flops, mfu, peak_flops, train_flops_per_token
from llm.logs import JsonlLog
from llm.model import build_model

QUICK = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
TINY = {"vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 2}


def test_plain_engine_step_is_clipped_adamw_on_the_schedule():
    """train_step on PlainEngine = the model's loss, clipping, AdamW and optim.lr_schedule by hand."""
    optim = OptimConfig(lr=1e-2, weight_decay=0.0, betas=[0.9, 0.98], warmup_steps=2, schedule="cosine",
                        min_lr_ratio=0.0, grad_clip=0.5)
    torch.manual_seed(0)
    ours, ref = build_model(TINY), build_model(TINY)
    ref.load_state_dict(ours.state_dict())
    engine = PlainEngine(ours, optim, max_steps=5)
    opt = torch.optim.AdamW(ref.parameters(), lr=optim.lr, betas=(0.9, 0.98), weight_decay=0.0)
    batches = [torch.randint(64, (2, 9)) for _ in range(5)]
    targets = [torch.where(torch.rand(2, 8) < 0.3, -100, b[:, 1:]) for b in batches]  # some unlabelled
    for step, (b, y) in enumerate(zip(batches, targets)):
        stats = train_step(engine, lambda i: (b[:, :-1], y), accum=1)
        multiplier = (step + 1) / 2 if step < 2 else 0.5 * (1 + math.cos(math.pi * (step - 2) / 3))  # warmup 2, cosine
        for g in opt.param_groups:
            g["lr"] = optim.lr * multiplier
        loss, _ = ref(b[:, :-1], targets=y)  # the model's own loss (tests/test_loss.py checks it)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        assert stats["ce"] == pytest.approx(loss.item(), rel=1e-6) and stats["z"] == 0.0
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_z_loss_term_is_reported_apart_from_the_cross_entropy():
    logits, targets = torch.randn(2, 3, 5), torch.randint(5, (2, 3))
    loss, ce = lm_loss(logits, targets, 1e-2)
    assert loss.item() == pytest.approx(ce.item() + 1e-2 * torch.logsumexp(logits, -1).pow(2).mean().item())


def test_jsonl_log_keeps_records_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "log.jsonl"
    log = JsonlLog(str(path), start_step=0)
    log.append([{"step": s, "x": s * 2} for s in range(0, 8)])
    JsonlLog(str(path), start_step=5, active=False).append([{"step": 99}])  # not rank 0: untouched
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == list(range(8))
    JsonlLog(str(path), start_step=5)  # resumed from the step-5 checkpoint
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3, 4, 5]
    JsonlLog(str(path), start_step=0)  # a fresh run starts over
    assert path.read_text() == ""


def test_jsonl_log_drops_a_partial_last_line_only(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # killed mid-append
    JsonlLog(str(path), start_step=5)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert f"note: {path}: dropped a partial last line" in capsys.readouterr().out
    path.write_text('{"step": 1}\n{"step": 2, \n{"step": 3}\n')  # damaged elsewhere: not ours to drop
    with pytest.raises(ValueError, match=f"{path}: line 2 is not JSON"):
        JsonlLog(str(path), start_step=5)
    assert path.read_text() == '{"step": 1}\n{"step": 2, \n{"step": 3}\n'


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("Some New GPU", None)])
def test_gpu_peak_table(name, peak):
    assert device_peak_flops(name) == peak


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_no_mfu_on_cpu_unless_a_peak_is_configured():
    assert peak_flops(None) is None and mfu(1e9, 1e3, None) is None
    assert peak_flops(2e12) == 2e12 and mfu(1e9, 1e3, 2e12) == pytest.approx(0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_bench_record_of_the_trainers_step(tmp_path):
    out = tmp_path / "results.json"
    tiny = ["model.d_model=64", "model.n_layers=1", "data.seq_len=32", "train.micro_batch_size=2",
            "train.global_batch_size=4"]
    assert bench.main([str(QUICK), *tiny, "--steps", "2", "--out", str(out)]) == 0
    assert bench.main([str(QUICK), *tiny, "logging.peak_flops=1e12", "--steps", "2", "--out", str(out)]) == 0
    plain, peaked = json.loads(out.read_text())
    assert plain["mfu"] is None and plain["device"] == "cpu" and plain["dtype"] == "fp32"
    assert plain["grad_accumulation"] == 2 and plain["zero_stage"] == 1  # the trainer's step: 2 micro-batches
    assert plain["peak_memory_bytes"] > 0 and plain["memory_kind"] == "process_peak_rss"
    cfg = load_config(QUICK, tiny)
    f = train_flops_per_token(cfg.model, 32)
    assert peaked["mfu"] == pytest.approx(f * peaked["tokens_per_s"] / 1e12)
    assert "MFU n/a on CPU" in bench.describe(plain) and "MFU" in bench.describe(peaked)
