"""FLOPs per token of a model (forward + backward) and model FLOPs utilization.

Each mixer reports its own forward FLOPs per token (`Mixer.flops_per_token`); the MLP and the
vocabulary head are counted here. Backward costs twice the forward, so training is 3x forward.
"""
import torch

from llm.model.mixers import MIXERS
from llm.model.spec import model_spec

# Dense bf16 peak FLOP/s per device (no sparsity), by substring of the CUDA device name.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12,
                  "L4": 121e12, "V100": 125e12, "4090": 165e12, "3090": 71e12}


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


def peak_flops(configured=None) -> float:
    """Peak FLOP/s of one device: the configured value, the GPU table, or a short CPU matmul probe."""
    if configured:
        return float(configured)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
        return 100e12
    return _cpu_matmul_flops()


def _cpu_matmul_flops(n: int = 512, trials: int = 5) -> float:
    """Best of a few timed matmuls: the fastest trial is the least disturbed by other processes."""
    import time
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best
