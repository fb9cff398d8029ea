"""Training-time options applied to a built GPT in place: per-block torch.compile and activation
checkpointing. Neither changes a parameter's name (the state dict, checkpoints and exports stay the
same) nor, beyond float rounding under compile, the numbers."""
import re


def checkpointed_blocks(mode: str, n_layers: int) -> frozenset[int]:
    """The block indices that `train.activation_checkpointing` = `mode` recomputes in backward:
    none; full (every block); every:N (blocks 0, N, 2N, ...: one in every N)."""
    if mode == "none":
        return frozenset()
    if mode == "full":
        return frozenset(range(n_layers))
    match = re.fullmatch(r"every:([0-9]+)", mode)
    if not match or int(match[1]) < 1:
        raise ValueError(f"got {mode!r}, expected none, full or every:N with N >= 1")
    return frozenset(range(0, n_layers, int(match[1])))


def apply_training_options(model, *, compile: bool = False, activation_checkpointing: str = "none"):
    """Compile each block (in place, `nn.Module.compile`: fla's kernels may break the graph,
    the rest of a block is fused) and/or mark blocks for recomputation in backward. Returns model."""
    model.checkpointed = checkpointed_blocks(activation_checkpointing, len(model.blocks))
    if compile:
        for block in model.blocks:
            block.compile()
    return model
