"""Functional ops in [B, T, H, D] layout: a torch reference for each, with GPU kernels behind the
same signatures where the kernel libraries are installed (see `llm.ops.utils.use_kernel`)."""
