"""Synthetic probes of what a mixer is for (a CLI, not tests).

state-tracking: the finite-state tasks of the PD-SSM paper (parity, even pairs, cycle navigation
over 5 positions, modular arithmetic mod 5 without brackets, and the A5 / S5 word problems).
Small models train on lengths 3-40 with the state after every prefix as the label, and are
tested on longer sequences (40-256) by the accuracy of the final state: a model that tracks the
state generalises in length; one that pattern-matches does not.

induction: one layer, random tokens whose first L (random per sequence) repeat right after
themselves. Predicting the second copy needs an induction head; one softmax layer cannot form one
(its keys know only their own token), momentum attention can (see mixers/momentum.py).

    python -m llm.eval.probes state-tracking --tasks parity,cycle_nav --steps 300
    python -m llm.eval.probes induction --gammas 0.25,0.5,1,2
"""
import argparse
import itertools
import json
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from llm import HelpFormatter
from llm.config import OptimConfig
from llm.engine import PlainEngine, lm_loss, train_step
from llm.model import build_model
from llm.model.mixers import MIXERS


# --- tasks: (generator, batch, length) -> ids [B, L], labels [B, L], mask [B, L] (label defined) ---

@dataclass
class Task:
    alphabet: int  # input tokens
    n_classes: int  # labels
    sample: Callable


def _parity(g, B, L):
    x = torch.randint(0, 2, (B, L), generator=g)
    return x, x.cumsum(1) % 2, torch.ones(B, L, dtype=torch.bool)


def _even_pairs(g, B, L):
    # the number of "ab" plus "ba" pairs is even exactly when the last token equals the first
    x = torch.randint(0, 2, (B, L), generator=g)
    return x, (x == x[:, :1]).long(), torch.ones(B, L, dtype=torch.bool)


def _cycle_nav(g, B, L):
    x = torch.randint(0, 3, (B, L), generator=g)  # stay, +1, -1 on a cycle of 5 positions
    return x, torch.tensor([0, 1, -1])[x].cumsum(1) % 5, torch.ones(B, L, dtype=torch.bool)


def _mod_arith(g, B, L):
    """d op d op ... d with digits 0-4 and ops + - * (tokens 5, 6, 7), * before + and -; the label
    at each digit is the value of the expression so far, mod 5. Odd lengths only (L is rounded up)."""
    L = L | 1
    x = torch.randint(0, 5, (B, L), generator=g)
    x[:, 1::2] = torch.randint(5, 8, (B, L // 2), generator=g)
    labels, mask = torch.zeros_like(x), torch.zeros(B, L, dtype=torch.bool)
    total, term = torch.zeros(B, dtype=torch.long), x[:, 0].clone()  # closed sum, open product
    labels[:, 0], mask[:, 0::2] = term, True
    for i in range(1, L, 2):
        op, digit = x[:, i], x[:, i + 1]
        total = torch.where(op == 7, total, (total + term) % 5)
        term = torch.where(op == 7, term * digit, torch.where(op == 5, digit, -digit)) % 5
        labels[:, i + 1] = (total + term) % 5
    return x, labels, mask


def _group(even_only: bool):
    perms = [p for p in itertools.permutations(range(5))
             if not even_only or sum(a > b for a, b in itertools.combinations(p, 2)) % 2 == 0]
    index = {p: i for i, p in enumerate(perms)}
    table = torch.tensor([[index[tuple(a[b[i]] for i in range(5))] for b in perms] for a in perms])

    def sample(g, B, L):  # the label is the product of the prefix's group elements
        x = torch.randint(0, len(perms), (B, L), generator=g)
        labels = x.clone()
        for t in range(1, L):
            labels[:, t] = table[labels[:, t - 1], x[:, t]]
        return x, labels, torch.ones(B, L, dtype=torch.bool)

    return Task(len(perms), len(perms), sample)


TASKS = {
    "parity": Task(2, 2, _parity),
    "even_pairs": Task(2, 2, _even_pairs),
    "cycle_nav": Task(3, 5, _cycle_nav),
    "mod_arith": Task(8, 5, _mod_arith),
    "a5": _group(even_only=True),
    "s5": _group(even_only=False),
}


def induction_task(vocab: int) -> Task:
    def sample(g, B, T):
        """Random tokens; the first L (random in [T/8, T/2) per row) repeat right after themselves.
        Labels are next tokens, scored inside the second copy, where only recall predicts them."""
        L = torch.randint(T // 8, T // 2, (B, 1), generator=g)
        pos = torch.arange(T + 1)
        second = (pos >= L) & (pos < 2 * L)
        x = torch.randint(0, vocab, (B, T + 1), generator=g).gather(1, torch.where(second, pos - L, pos))
        return x[:, :-1], x[:, 1:], second[:, 1:] & second[:, :-1]

    return Task(vocab, vocab, sample)


def mqar_task(vocab: int, pairs: int) -> Task:
    """Multi-query associative recall (Arora et al., Zoology): `pairs` key-value pairs (distinct keys
    from the first half of the vocabulary, values from the second), then queries: the keys again in
    a random order, each followed by its value. Scored on predicting each query's value, which only
    recall of the pair seen earlier gives; sequences are 4 * pairs tokens (the `length` is ignored)."""
    if vocab % 2 or pairs > vocab // 2:
        raise ValueError(f"mqar: expected an even vocab >= 2 * pairs, got vocab={vocab}, pairs={pairs}")

    def sample(g, B, _length):
        keys = torch.rand(B, vocab // 2, generator=g).argsort(-1)[:, :pairs]
        values = torch.randint(vocab // 2, vocab, (B, pairs), generator=g)
        order = torch.rand(B, pairs, generator=g).argsort(-1)
        context = torch.stack([keys, values], -1).flatten(1)
        queries = torch.stack([keys.gather(1, order), values.gather(1, order)], -1).flatten(1)
        x = torch.cat([context, queries], 1)
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask[:, 2 * pairs::2] = True  # at each query key: its value comes next
        return x, x.roll(-1, 1), mask

    return Task(vocab, vocab, sample)


# --- training and scoring -------------------------------------------------------------------------

def default_device() -> torch.device:
    """Where the probes train: the GPU when there is one (the weights are drawn on the CPU either
    way, so a seed gives the same initial model on both)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    """The default device in words, for the records."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def make_model(task: Task, mixer: str, mixer_args: dict, d_model: int, n_layers: int, n_heads: int, seed: int,
               device=None):
    """A GPT over the task's alphabet, on `device` (default_device()); with an untied head whose first
    n_classes outputs score labels."""
    torch.manual_seed(seed)
    model = build_model({"vocab_size": max(task.alphabet, task.n_classes), "d_model": d_model,
                         "n_layers": n_layers, "n_heads": n_heads, "mixer": mixer,
                         "mixer_args": mixer_args, "tie_embeddings": False})
    return model.to(device or default_device())


class LabelHead(nn.Module):
    """The model's first n_classes outputs, which score the task's labels."""

    def __init__(self, model, n_classes: int):
        super().__init__()
        self.model, self.n_classes = model, n_classes

    def forward(self, x, doc_start=None, *, targets=None, z_loss: float = 0.0):
        """Label scores, or with targets (-100: unlabelled) the (loss, cross-entropy) on them."""
        logits = self.model(x, doc_start)[..., :self.n_classes]
        return logits if targets is None else lm_loss(logits, targets, z_loss)


def train(model, task: Task, lengths: tuple, steps: int, batch: int, lr: float, seed: int) -> float:
    """The trainer's step (llm.engine.train_step: lm_loss, clipping at 1, AdamW) with its LR
    schedule (linear warmup over the first tenth, then cosine to zero) on fresh batches, each of
    one length drawn from `lengths` (inclusive range); cross-entropy on every labelled position.
    Returns seconds."""
    g = torch.Generator().manual_seed(seed)
    optim_cfg = OptimConfig(lr=lr, weight_decay=0.0, betas=[0.9, 0.98], warmup_steps=max(1, steps // 10),
                            schedule="cosine", min_lr_ratio=0.0, grad_clip=1.0)
    engine = PlainEngine(LabelHead(model, task.n_classes), optim_cfg, steps)

    def labelled_batch(_):
        L = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        x, y, mask = task.sample(g, batch, L)
        return x, torch.where(mask, y, -100)  # -100: no label (lm_loss ignores it)

    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(engine, labelled_batch, accum=1)
    return time.perf_counter() - start


def steps_within(seconds: float, make_model, task: Task, lengths: tuple, batch: int, lr: float, seed: int,
                 pilot: int = 50) -> int:
    """How many `train` steps of a model from `make_model()` fit in `seconds`: timed over `pilot`
    steps of a throwaway model, after as many of another (the first kernels and allocations are slow)."""
    train(make_model(), task, lengths, pilot, batch, lr, seed)
    return max(1, int(seconds * pilot / train(make_model(), task, lengths, pilot, batch, lr, seed)))


@torch.no_grad()
def accuracy(model, task: Task, length: int, n: int, seed: int, final_only: bool) -> float:
    model.eval()
    x, y, mask = task.sample(torch.Generator().manual_seed(seed), n, length)
    if final_only:
        mask = torch.zeros_like(mask)
        mask[:, -1] = True
    pred = model(x.to(next(model.parameters()).device))[..., :task.n_classes].argmax(-1).cpu()
    return (pred[mask] == y[mask]).float().mean().item()


# --- the two probes -------------------------------------------------------------------------------

def state_tracking_models(state_size: int, dict_size: int) -> dict:
    pd = {"state_size": state_size, "dict_size": dict_size}
    # what length generalization needs (mixers/pdssm.py)
    exact = {"state_norm": True, "phase": False, "magnitude_init": 0.99}
    models = {"pdssm": ("pdssm", {"pdssm": {**pd, **exact}}),
              "pdssm_defaults": ("pdssm", {"pdssm": pd}),
              "pdssm_discrete": ("pdssm", {"pdssm": {**pd, **exact, "selection": "discrete"}}),
              "pdssm_diag": ("pdssm", {"pdssm": {**pd, "selection": "identity"}}),
              "softmax": ("softmax", {})}
    if "gated_deltanet" in MIXERS:
        models["gated_deltanet"] = ("gated_deltanet", {})
        # beta in (0, 2): transition eigenvalues down to -1, which parity needs
        models["gated_deltanet_neg"] = ("gated_deltanet", {"gated_deltanet": {"allow_neg_eigval": True}})
    return models


def state_tracking(a) -> list[dict]:
    available = state_tracking_models(a.state_size, a.dict_size)
    rows = []
    for task_name in a.tasks.split(","):
        task = TASKS[task_name]
        for name in a.models.split(","):
            if name not in available:
                print(f"skipping {name}: not registered (available: {', '.join(available)})")
                continue
            mixer, mixer_args = available[name]
            model = make_model(task, mixer, mixer_args, a.d_model, a.layers, a.heads, a.seed)
            seconds = train(model, task, (3, 40), a.steps, a.batch, a.lr, a.seed)
            acc = {L: accuracy(model, task, L, a.eval_batch, a.seed + 1, final_only=True) for L in a.test_lengths}
            rows.append({"task": task_name, "model": name, "train_s": round(seconds), **acc})
            print(_row(rows[-1]), flush=True)
    return rows


def induction(a) -> list[dict]:
    task = induction_task(a.vocab)
    configs = [("softmax", "softmax", {})]
    configs += [(f"momentum gamma={g:g}", "momentum", {"momentum": {"gamma": g}}) for g in a.gammas]
    configs.append((f"momentum learned gamma (init {a.learn_gamma:g})", "momentum",
                    {"momentum": {"gamma": a.learn_gamma, "learn_gamma": True}}))
    rows = []
    for name, mixer, mixer_args in configs:
        model = make_model(task, mixer, mixer_args, a.d_model, 1, a.heads, a.seed)
        seconds = train(model, task, (a.seq_len, a.seq_len), a.steps, a.batch, a.lr, a.seed)
        row = {"model": name, "train_s": round(seconds),
               "copy_acc": accuracy(model, task, a.seq_len, a.eval_batch, a.seed + 1, final_only=False)}
        if getattr(model.blocks[0].mixer.args, "learn_gamma", False):
            row["learned_gamma"] = [round(v, 2) for v in model.blocks[0].mixer.gamma.tolist()]
        rows.append(row)
        print(_row(row), flush=True)
    return rows


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _row(row: dict) -> str:
    return "  ".join(f"{k}={_fmt(v)}" for k, v in row.items())


def _markdown(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + " --- |" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows])


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",")]


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",")]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m llm probe", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="probe", required=True)
    st = sub.add_parser("state-tracking", help="finite-state tasks: train on lengths 3-40, test longer",
                        formatter_class=HelpFormatter)
    st.add_argument("--tasks", default="parity,even_pairs,cycle_nav,mod_arith,a5,s5",
                    help=f"comma-separated, from {', '.join(TASKS)}")
    st.add_argument("--models", default="pdssm,pdssm_diag,gated_deltanet,softmax",
                    help="comma-separated, from pdssm (state_norm, no phase, |d| init 0.99), pdssm_defaults, "
                         "pdssm_discrete, pdssm_diag, softmax, gated_deltanet, gated_deltanet_neg")
    st.add_argument("--test-lengths", type=_ints, default=[40, 64, 128, 256],
                    help="comma-separated sequence lengths the final-state accuracy is measured at")
    st.add_argument("--layers", type=int, default=2, help="layers per model")
    st.add_argument("--state-size", type=int, default=16, help="PD-SSM states per head (N)")
    st.add_argument("--dict-size", type=int, default=8, help="PD-SSM dictionary matrices per head (M)")
    ind = sub.add_parser("induction", help="one-layer associative recall: momentum vs softmax",
                         formatter_class=HelpFormatter)
    ind.add_argument("--gammas", type=_floats, default=[0.25, 0.5, 1.0, 2.0, 4.0],
                     help="comma-separated fixed momentum shears, one run each")
    ind.add_argument("--learn-gamma", type=float, default=0.5, help="init of the learned-gamma run")
    ind.add_argument("--vocab", type=int, default=32, help="random tokens to draw from")
    ind.add_argument("--seq-len", type=int, default=64, help="sequence length (train and test)")
    for q, steps in ((st, 300), (ind, 400)):
        q.add_argument("--steps", type=int, default=steps, help="training steps per model")
        q.add_argument("--batch", type=int, default=32, help="training sequences per step")
        q.add_argument("--eval-batch", type=int, default=128, help="test sequences per length")
        q.add_argument("--d-model", type=int, default=64, help="model width")
        q.add_argument("--heads", type=int, default=4, help="heads per layer")
        q.add_argument("--lr", type=float, default=3e-3, help="learning rate")
        q.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
        q.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads (1 is fastest for these tiny models on a shared machine)")
        q.add_argument("--json", help="also write the rows to this file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    rows = state_tracking(a) if a.probe == "state-tracking" else induction(a)
    print(f"{_markdown(rows)}\ntotal {time.perf_counter() - start:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
