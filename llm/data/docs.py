"""Document boundaries in a token window, for `data.doc_mask` (GPT.forward's `doc_start`)."""
import torch


def doc_starts(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """bool [B, T], True where a document begins: at the token after each EOS (the EOS ends its own
    document). Position 0 is left False: nothing precedes it in the window anyway."""
    if tokens.ndim != 2:
        raise ValueError(f"doc_starts: expected tokens [B, T], got shape {list(tokens.shape)}")
    starts = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
    starts[:, 1:] = tokens[:, :-1] == eos_id
    return starts
