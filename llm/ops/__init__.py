"""Functional ops in [B, T, H, D] layout: a torch reference for each, with GPU kernels behind the
same signatures where the kernel libraries are installed (see `use_kernel`)."""
import importlib.util

import torch

_HALF = (torch.float16, torch.bfloat16)


def kernel_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def use_kernel(backend: str, module: str, *tensors) -> bool:
    """Whether to call the GPU library `module` for these inputs.

    backend: "torch" never, "fla" always (error if impossible), "auto" when the inputs are CUDA
    half-precision tensors and the library is installed.
    """
    ok = all(t.is_cuda and t.dtype in _HALF for t in tensors) and kernel_available(module)
    if backend == "fla" and not ok:
        raise RuntimeError(f"model.kernels=fla but {module} cannot run here: it needs CUDA bf16/fp16 "
                           f"inputs and the package installed (pip install -e .[gpu])")
    return backend != "torch" and ok
