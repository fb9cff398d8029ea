"""Training-step time of our softmax GPT against nanoGPT's GPT at the same shape, on CPU.

    python benchmarks/nanogpt_step.py --nanogpt /path/to/nanoGPT/model.py          # ours vs nanoGPT
    python benchmarks/nanogpt_step.py --nanogpt ... --compile                      # + ours compiled
    python benchmarks/nanogpt_step.py --nanogpt ... --profile                      # where ours spends time

nanoGPT's model.py is not part of this project: fetch karpathy/nanoGPT beside it and pass the
file's path. Its GPT runs with bias off and dropout 0. A step is forward, loss, backward and an
AdamW step (the same torch.optim.AdamW settings for every model). The models are timed in
interleaved rounds in one process (so drifting machine load hits all of them alike) after warm-up
steps, by the process's CPU time (on a shared machine wall time mostly measures the neighbours;
with one thread CPU time is the work done) and by wall time. Per model: the median step time over
the rounds, and the median over rounds of the ratio ours / this model (paired within a round).
"""
import argparse
import importlib.util
import json
import statistics
import time

import torch

from llm.model import build_model
from llm.model.wrap import apply_training_options


def load_nanogpt(path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ours(a, compile=False):
    model = build_model({"vocab_size": a.vocab, "d_model": a.d, "n_layers": a.layers,
                         "n_heads": a.heads, "mixer": "softmax"})
    apply_training_options(model, compile=compile)
    return model, lambda x, y: model(x, targets=y)[0]


def nanogpt(a):
    nano = load_nanogpt(a.nanogpt)
    model = nano.GPT(nano.GPTConfig(block_size=a.T, vocab_size=a.vocab, n_layer=a.layers, n_head=a.heads,
                                    n_embd=a.d, dropout=0.0, bias=False))
    return model, lambda x, y: model(x, y)[1]


def make_step(model, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(x, y):
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def time_steps(step, batch, n):
    """(CPU seconds, wall seconds) per step."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        step(*batch)
    return (time.process_time() - cpu) / n, (time.perf_counter() - wall) / n


def profile(step, batch, rows):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step(*batch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", required=True, help="path to nanoGPT's model.py")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--T", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=3, help="steps per model per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time our model under train.compile")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print our step's top ops and exit")
    p.add_argument("--json", help="also write the table to this file")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.randint(a.vocab, (a.batch, a.T + 1))
    batch = (x[:, :-1].contiguous(), x[:, 1:].contiguous())
    models = {"ours": ours(a), "nanogpt": nanogpt(a)}
    if a.compile:
        models["ours_compiled"] = ours(a, compile=True)
    steps = {name: make_step(*m) for name, m in models.items()}
    if a.profile:
        time_steps(steps["ours"], batch, a.warmup)
        return profile(steps["ours"], batch, a.profile)
    for name, step in steps.items():
        print(f"{name}: {sum(p.numel() for p in models[name][0].parameters()) / 1e6:.2f}M params", flush=True)
        time_steps(step, batch, a.warmup)
    times = {name: [] for name in steps}
    for _ in range(a.rounds):
        for name, step in steps.items():
            times[name].append(time_steps(step, batch, a.steps))
    table = {}
    for name, t in times.items():
        row, table[name] = [f"{name:>14}:"], {}
        for clock, label in ((0, "cpu"), (1, "wall")):
            step_ms = 1e3 * statistics.median(r[clock] for r in t)
            ratio = statistics.median(o[clock] / m[clock] for o, m in zip(times["ours"], t))
            table[name].update({f"{label}_ms_per_step": round(step_ms, 2), f"ours_over_this_{label}": round(ratio, 4)})
            row.append(f"{label} {step_ms:7.1f} ms/step, ours / this {ratio:.3f};")
        print(" ".join(row))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": {k: getattr(a, k) for k in ("d", "layers", "heads", "vocab", "T", "batch", "threads")},
                       "rounds": a.rounds, "steps_per_round": a.steps, "torch": torch.__version__, "models": table},
                      f, indent=1)


if __name__ == "__main__":
    main()
