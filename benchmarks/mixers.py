"""Training throughput of every mixer at the 125M and 350M shapes, as a Markdown table.

    python benchmarks/mixers.py                                   # GPU: 125m, 350m x T = 2048, 4096
    python benchmarks/mixers.py --quick --seq-lens 64,128 --steps 2   # CPU: a tiny shape

Each cell is one `python -m llm bench` in a fresh process (so no allocator state or DeepSpeed
engine carries over from the last): the trainer's own step on the DeepSpeed engine, dtype as the
config resolves it (bf16 on GPU), `--tokens` tokens per step (micro batch = tokens // T, no
gradient accumulation). Columns: tokens/s per device, MFU against the device's dense bf16 peak
(n/a on CPU), peak memory (CUDA allocator peak; on CPU the process's peak resident set), and
with `--compile`, the same step under `train.compile=true` (each block compiled; its own fresh
process, timed after the warm-up steps that compile it) and its speedup over eager. A failed cell
(out of memory, a mixer that cannot run the shape) shows the reason and the table goes on.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=2"]


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",")]


def bench_cell(config: Path, overrides: list[str], steps: int, out: Path):
    """The bench record of one cell, or the reason it failed."""
    cmd = [sys.executable, "-m", "llm", "bench", str(config), *overrides, "--steps", str(steps), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        return "out of memory" if "out of memory" in proc.stderr.lower() else f"failed: {tail[-1][:80]}"
    return json.loads(out.read_text())[-1]


def row(mixer: str, size: str, seq_len: int, record, compiled=None) -> dict:
    """A table row; `compiled` (the record under train.compile, or its failure) adds two columns."""
    cells = {"mixer": mixer, "model": size, "T": seq_len}
    if isinstance(record, str):
        cells.update({"tokens/s": record, "MFU": "", "peak memory": ""})
    else:
        memory = record["peak_memory_bytes"]
        cells.update({"tokens/s": f"{record['tokens_per_s']:,.0f}",
                      "MFU": f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a",
                      "peak memory": f"{memory / 2 ** 30:.2f} GiB" if memory is not None else "n/a"})
    if compiled is not None:
        ok = not isinstance(compiled, str)
        cells["compiled tokens/s"] = f"{compiled['tokens_per_s']:,.0f}" if ok else compiled
        cells["compiled / eager"] = (f"{compiled['tokens_per_s'] / record['tokens_per_s']:.2f}x"
                                     if ok and not isinstance(record, str) else "")
    return cells


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows])


def main(argv=None) -> str:
    from llm.model.mixers import MIXERS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mixers", default=",".join(MIXERS), help="comma-separated mixer names")
    p.add_argument("--sizes", default="125m,350m", help="configs/model/<size>.yaml shapes")
    p.add_argument("--seq-lens", type=_ints, default=[2048, 4096])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step (micro batch = tokens // T)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per cell (after 2 warm-up steps)")
    p.add_argument("--quick", action="store_true", help=f"a tiny shape instead of --sizes ({' '.join(TINY)})")
    p.add_argument("--compile", action="store_true", help="also time each cell with train.compile=true")
    p.add_argument("--json", help="also write the bench records to this file")
    a = p.parse_args(argv)
    sizes = {"tiny": TINY} if a.quick else {s: [] for s in a.sizes.split(",")}
    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size, shape in sizes.items():
            config = ROOT / "configs" / "model" / ("small.yaml" if a.quick else f"{size}.yaml")
            for seq_len in a.seq_lens:
                batch = max(1, a.tokens // seq_len)
                for mixer in a.mixers.split(","):
                    overrides = [*shape, f"model.mixer={mixer}", f"data.seq_len={seq_len}",
                                 f"train.micro_batch_size={batch}", f"train.global_batch_size={batch}"]
                    name = Path(tmp) / f"{size}_{seq_len}_{mixer}"
                    record = bench_cell(config, overrides, a.steps, name.with_suffix(".json"))
                    compiled = bench_cell(config, [*overrides, "train.compile=true"], a.steps,
                                          name.with_suffix(".compiled.json")) if a.compile else None
                    records += [r for r in (record, compiled) if r is not None]
                    rows.append(row(mixer, size, seq_len, record, compiled))
                    print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), file=sys.stderr, flush=True)
    table = markdown(rows)
    print(table)
    if a.json:
        Path(a.json).write_text(json.dumps(records, indent=1))
    return table


if __name__ == "__main__":
    main()
