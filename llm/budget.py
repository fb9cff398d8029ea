"""Compute-matched run length: `train.budget` -> max_steps.

One step trains G x T tokens (train.global_batch_size x data.seq_len). With at most one budget set:

    tokens             max_steps = floor(tokens / (G T))
    flops              max_steps = floor(flops / (G T f)), f = llm.flops.train_flops_per_token(model, T)
                       (per mixer, attention's T-dependent term included)
    accelerator_hours  max_steps = floor(hours * 3600 * r / (G T)), r = the tokens/s that
                       `python -m llm bench` measured for this config on train.budget.reference_device
                       (per device, so hours are device-hours whatever the rank count)

and with none, train.max_steps stands.
"""
import math

from llm.bench import find_throughput
from llm.config import ConfigError
from llm.flops import train_flops_per_token

KINDS = ("tokens", "flops", "accelerator_hours")


def resolve_max_steps(cfg, results_path=None) -> tuple[int, dict]:
    """(max_steps, info); info is {} without a budget, else the budget kind and value, the steps,
    and the tokens and FLOPs the run will train on. `results_path`: the bench results file
    (default benchmarks/results.json)."""
    t = cfg.train
    given = [k for k in KINDS if t.budget[k] is not None]
    if not given:
        return t.max_steps, {}
    if len(given) > 1:
        raise ConfigError(f"train.budget: set at most one of {', '.join('train.budget.' + k for k in KINDS)}; "
                          f"got {', '.join(f'train.budget.{k}={t.budget[k]:g}' for k in given)}")
    kind, value = given[0], float(t.budget[given[0]])
    if value <= 0:
        raise ConfigError(f"train.budget.{kind}: expected a positive number, got {value:g}")
    seq_len = cfg.data.seq_len
    tokens_per_step = t.global_batch_size * seq_len
    flops_per_token = train_flops_per_token(cfg.model, seq_len)
    info = {"kind": kind, "budget": value}
    if kind == "tokens":
        tokens = value
    elif kind == "flops":
        tokens = value / flops_per_token
    else:
        if not t.budget.reference_device:
            raise ConfigError("train.budget.accelerator_hours needs train.budget.reference_device: the "
                              "device name its throughput was measured on (python -m llm bench --device-name)")
        record = find_throughput(cfg, t.budget.reference_device, results_path)
        tokens = value * 3600 * record["tokens_per_s"]
        info.update(reference_device=t.budget.reference_device, tokens_per_s=record["tokens_per_s"])
    # The epsilon keeps a budget of exactly k steps from losing one to floating-point rounding.
    max_steps = math.floor(tokens / tokens_per_step + 1e-9)
    if max_steps < 1:
        raise ConfigError(f"train.budget.{kind}={value:g} buys {tokens:.3g} tokens, less than one step of "
                          f"train.global_batch_size x data.seq_len = {tokens_per_step} tokens")
    if t.stop_at_step is not None and t.stop_at_step > max_steps:
        raise ConfigError(f"train.stop_at_step={t.stop_at_step} is beyond the {max_steps} steps "
                          f"train.budget.{kind} allows")
    info.update(max_steps=max_steps, tokens_per_step=tokens_per_step, flops_per_token=flops_per_token,
                tokens=max_steps * tokens_per_step, flops=max_steps * tokens_per_step * flops_per_token)
    return max_steps, info
