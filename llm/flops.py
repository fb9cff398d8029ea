"""FLOPs per token of a model (forward + backward) and model FLOPs utilization.

Each mixer reports its own forward FLOPs per token (`Mixer.flops_per_token`); the MLP and the
vocabulary head are counted here. Backward costs twice the forward, so training is 3x forward.
"""
import torch

from llm.model.mixers import MIXERS
from llm.model.spec import model_spec

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per device, from the vendors' data sheets,
# matched in this order as a substring of torch.cuda.get_device_name() (most specific first:
# "A100" before "A10", "L40S" before "L4", the H100 variants before the SXM default).
GPU_PEAK_FLOPS = (
    ("B200", 2250e12), ("H200", 989e12),  # also GH200
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),  # H100 SXM: "H100 80GB HBM3"
    ("A100", 312e12), ("A10", 125e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("MI300X", 1307e12), ("MI250X", 383e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12),
)


def forward_flops_per_token(model_cfg, seq_len: int) -> float:
    """Of a ModelSpec or any model config `llm.model.spec.model_spec` takes."""
    spec = model_spec(model_cfg)
    d = spec.d_model
    total = 2 * d * spec.vocab_size  # head (the embedding lookup is free)
    for name, args in spec.layers:
        total += MIXERS[name].flops_per_token(spec, args, seq_len)
        total += 2 * 3 * d * spec.mlp_hidden  # SwiGLU: gate, up, down
    return float(total)


def train_flops_per_token(model_cfg, seq_len: int) -> float:
    return 3.0 * forward_flops_per_token(model_cfg, seq_len)


def device_peak_flops(name: str):
    """Dense bf16 peak FLOP/s of a device by its CUDA name, or None if it is not in the table."""
    return next((value for key, value in GPU_PEAK_FLOPS if key in name), None)


def peak_flops(configured=None):
    """Peak FLOP/s of one device for MFU: the configured value (logging.peak_flops), else the GPU
    table's; None on CPU and on GPUs not in the table (MFU is then not reported)."""
    if configured:
        return float(configured)
    return device_peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def mfu(flops_per_token: float, tokens_per_s: float, peak, devices: int = 1):
    """Model FLOPs utilization, or None without a peak to compare against."""
    return flops_per_token * tokens_per_s / (peak * devices) if peak else None
