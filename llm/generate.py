"""Sampling with the recurrent caches: prefill the prompt once, then one token per step."""
import torch


@torch.no_grad()
def sample(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, eos_id: int | None = None, seed: int = 0) -> list[int]:
    """Continue `prompt_ids`; temperature 0 is greedy. Stops early at `eos_id`."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    cache = model.init_cache(1)
    logits, cache = model.forward_step(torch.tensor([prompt_ids], device=device), cache)
    out = []
    for _ in range(max_new_tokens):
        next_logits = logits[0, -1].float().cpu()
        if temperature <= 0:
            token = int(next_logits.argmax())
        else:
            next_logits = next_logits / temperature
            if top_k:
                kth = torch.topk(next_logits, min(top_k, next_logits.numel())).values[-1]
                next_logits = next_logits.masked_fill(next_logits < kth, float("-inf"))
            token = int(torch.multinomial(next_logits.softmax(-1), 1, generator=gen))
        if token == eos_id:
            break
        out.append(token)
        logits, cache = model.forward_step(torch.tensor([[token]], device=device), cache)
    return out
