"""`llm export --format hf` of DeltaNet / Gated DeltaNet / Mesa models: fla's own model classes
(loaded through `transformers` after `import fla`) give our logits, on CPU under Triton's
interpreter with the test shim of tests/triton_cpu.py.

Runs in a pytest process of its own, because TRITON_INTERPRET must be set before fla is imported:
    TRITON_INTERPRET=1 python -m pytest -q tests/test_export_fla.py
(needs flash-linear-attention, fla's model classes, besides the kernels-cpu extra).
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("fla's models run on CPU only under the interpreter, in a process of its own: "
                "TRITON_INTERPRET=1 python -m pytest tests/test_export_fla.py", allow_module_level=True)
try:  # asked for explicitly: fail, not skip, where fla's model classes are missing
    import fla.models  # noqa: F401  (registers fla's model types with transformers)
except ImportError as missing:
    raise ImportError("the fla export test needs fla's model classes: pip install flash-linear-attention") from missing

import torch

import triton_cpu  # tests/ is on sys.path
from fake_run import make_run
from llm.__main__ import main as llm_main

triton_cpu.install()

SEQ_LEN = 32  # fla's layers decode short inputs with their fused recurrent kernels, which take fp32
# Relative to the largest logit, fp32 both sides: DeltaNet and Gated DeltaNet agree to float error;
# fla's Mesa keeps its chunk states in bf16 inside the kernel (the same error at the layer alone).
CASES = {
    "delta_net": ({"mixer": "deltanet", "mixer_args": {"deltanet": {"use_gate": True}}}, 1e-5),
    "gated_deltanet": ({"mixer": "gated_deltanet", "mixer_args": {"gated_deltanet": {"use_gate": True}}}, 1e-5),
    "mesa_net": ({"mixer": "mesa"}, 1e-2),
}


@pytest.mark.parametrize("fmt", list(CASES))
def test_fla_models_give_our_logits(fmt, tmp_path, data_dir):
    from transformers import AutoModelForCausalLM

    fields, tol = CASES[fmt]
    model = make_run(tmp_path, data_dir, {**fields, "d_model": 64, "n_heads": 2}, SEQ_LEN)
    llm_main(["export", str(tmp_path), "--out", str(tmp_path / "hf"), "--format", "hf"])
    fla_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert fla_model.config.model_type == fmt
    x = torch.randint(0, 512, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        diff = (fla_model(x).logits.float() - ours).abs().max().item()
    scale = ours.abs().max().item()
    print(f"{fmt}: max |logit diff| through fla's model classes {diff:.2e} (largest logit {scale:.2f})")
    assert diff < tol * scale
