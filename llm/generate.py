"""Decoding through the recurrent caches: prefill the prompts once, then one token per step.

`generate` is the one decoding loop: `python -m llm generate` (`main`) samples with it and the
lm-eval adapter decodes greedily with it (temperature 0), passing its stop strings as `stop`.
"""
import argparse
import sys
from typing import Callable

import torch

from llm import HelpFormatter
from llm.checkpoint import add_trust_argument


def next_tokens(logits, temperature: float, top_k: int | None, generator: torch.Generator) -> list[int]:
    """One token per row of logits [B, V]: the argmax at temperature 0 or top-k 1, otherwise a draw
    from softmax(logits / temperature) over the top_k largest (all if None), on CPU with
    `generator` so a seed gives the same text on any device."""
    if temperature <= 0 or top_k == 1:
        return logits.argmax(-1).tolist()
    logits = logits.float().cpu() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0].tolist()


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, eos_id: int | None = None, seed: int = 0,
             stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """The new tokens after each of the equal-length `prompts` (one batch, one cache). A row ends
    at `eos_id` (not included), after max_new_tokens, or once `stop(row, its new tokens)` is true;
    decoding ends when every row has."""
    if not prompts or not all(prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if len(set(map(len, prompts))) > 1:
        raise ValueError(f"generate: the prompts of one batch share a cache and need equal lengths, "
                         f"got lengths {sorted(set(map(len, prompts)))}")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    logits, cache = model.forward_step(torch.tensor(prompts, device=device), model.init_cache(len(prompts)))
    new = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        tokens = next_tokens(logits[:, -1], temperature, top_k, generator)
        for row, token in enumerate(tokens):
            if done[row]:
                continue
            done[row] = token == eos_id
            if not done[row]:
                new[row].append(token)
                done[row] = stop is not None and stop(row, new[row])
        if all(done):
            break
        logits, cache = model.forward_step(torch.tensor(tokens, device=device)[:, None], cache)
    return new


def at_least(lo: float, kind=int):
    """An argparse type: a number of `kind` that is >= lo."""
    def parse(text: str):
        value = kind(text)
        if not value >= lo:  # also rejects nan
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} >= {lo}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m llm generate", formatter_class=HelpFormatter,
                                description="Sample a continuation from a run's newest checkpoint or an export directory.")
    p.add_argument("run_dir", help="run directory (train.out_dir) or export directory (python -m llm export)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=at_least(0), default=50,
                   help="tokens to generate at most (EOS ends earlier); past the trained context "
                        "(data.seq_len) a warning is printed and decoding goes on (quality may drop)")
    p.add_argument("--temperature", type=at_least(0.0, float), default=0.8, help="softmax temperature; 0: greedy")
    p.add_argument("--top-k", type=at_least(0), default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=at_least(0), default=0, help="sampling seed (the same text on any device)")
    p.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    add_trust_argument(p)
    a = p.parse_args(argv)
    from llm.eval import decode_continuation, load_run

    model, cfg, tok, _ = load_run(a.run_dir, a.tag, trust=a.trust_checkpoint)
    prompt = tok.encode(a.prompt)
    if len(prompt) + a.max_new_tokens > cfg.data.seq_len:
        print(f"warning: the prompt ({len(prompt)} tokens) plus --max-new-tokens {a.max_new_tokens} is past the "
              f"{cfg.data.seq_len} tokens the model was trained on (data.seq_len); the text beyond them is "
              f"extrapolation", file=sys.stderr)
    [new] = generate(model, [prompt], a.max_new_tokens, a.temperature, a.top_k, tok.eos_id, a.seed)
    print(a.prompt + decode_continuation(tok, prompt, new))
