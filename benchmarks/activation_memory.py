"""Peak memory and speed of a training step under train.activation_checkpointing, on CPU.

    python benchmarks/activation_memory.py                                   # 350M, 1 x 256
    python benchmarks/activation_memory.py --model configs/model/small.yaml --batch 4 --modes none full

Each mode runs in a fresh process: build the model, one untimed step (forward, loss, backward,
AdamW: the gradients and optimizer state now exist), then the step's memory = growth of the
process's peak resident set (Linux VmHWM, reset just before) over the resident set before it: the
activations saved for backward plus the temporaries, as the OS sees them. tokens/s = tokens per step
/ the best of --steps steps, by CPU time (with one thread, the work done; on a shared machine wall
time mostly measures the neighbours) and by wall time.
"""
import argparse
import ctypes
import json
import subprocess
import sys
import time

import torch

from llm.config import load_config
from llm.model import build_model
from llm.model.wrap import apply_training_options


def _status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def worker(a):
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build_model(load_config(a.model).model)
    apply_training_options(model, activation_checkpointing=a.worker)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(model.spec.vocab_size, (a.batch, a.T + 1))

    def step():
        loss, _ = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradient buffers: they are not the step's

    step()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _status("VmRSS")
    cpu, wall = [], []
    for _ in range(a.steps):
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - cpu_start)
        wall.append(time.perf_counter() - wall_start)
    print(json.dumps({"mem": _status("VmHWM") - base, "base": base, "tokens_per_s": a.batch * a.T / min(cpu),
                      "wall_tokens_per_s": a.batch * a.T / min(wall)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="configs/model/350m.yaml", help="a YAML with a model: section")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=["none", "every:4", "every:2", "full"])
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one mode in this process
    a = p.parse_args()
    if a.worker:
        return worker(a)
    print(f"{a.model}: batch {a.batch} x {a.T}, {a.threads} thread(s)")
    rows = {}
    for mode in a.modes:
        args = [f"--model={a.model}", f"--batch={a.batch}", f"--T={a.T}", f"--steps={a.steps}",
                f"--threads={a.threads}", f"--worker={mode}"]
        out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"mode {mode} failed:\n{out.stderr}")
        rows[mode] = r = json.loads(out.stdout.strip().splitlines()[-1])
        base = rows[a.modes[0]]
        print(f"  {mode:>8s}: step peak {r['mem'] / 2 ** 20:8.1f} MiB above {r['base'] / 2 ** 30:.2f} GiB resident"
              f" ({r['mem'] / base['mem']:.2f}x), {r['tokens_per_s']:7.1f} tokens/s by CPU time"
              f" ({r['tokens_per_s'] / base['tokens_per_s']:.2f}x), {r['wall_tokens_per_s']:7.1f} by wall"
              f" ({r['wall_tokens_per_s'] / base['wall_tokens_per_s']:.2f}x)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "batch": a.batch, "T": a.T, "threads": a.threads, "modes": rows}, f, indent=1)


if __name__ == "__main__":
    main()
