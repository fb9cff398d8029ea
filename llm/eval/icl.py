"""Function-style in-context probes built from the model's own vocabulary.

An episode is an optional context, k demonstrations `input -> output` (one per line), then a
query `input ->` whose output the model must produce. Items are single tokens: word pieces that
encode to one id on their own (e.g. "▁the") and single-letter tokens. Tasks:

    copy          x -> x
    reverse       a b c -> c b a
    kv_recall     context "k1 v1 k2 v2 ..." (10 pairs); k -> its value
    next_token    context: 10 distinct words; x -> the word after x there
    letter_shift  c -> the next letter (a -> b, ..., z -> a)

A query's input never appears among its demonstrations, so the demonstrations teach the format
and never give the answer away. Two accuracies come from one teacher-forced forward:

    greedy  every answer token is the argmax next token (= exact match of greedy decoding)
    choice  restricted choice: the first answer token has the highest logit among the episode's
            candidates (copy: the answer and 7 other words; reverse: the query's words; kv_recall:
            the values; next_token: the context's words; letter_shift: all letters); `chance` is
            the mean of 1 / number of candidates.

Episodes are generated deterministically from (seed, task, k); nothing is downloaded.
"""
import random
from dataclasses import dataclass
from string import ascii_lowercase

import torch

from llm.eval import padded_logits, split_encode

KS = (0, 1, 2, 4, 8)
STORE = 10  # context size of the lookup tasks: more than the largest k, so the query is always new
REVERSE_LEN = 3
COPY_CHOICES = 8


@dataclass
class ProbeVocab:
    words: list[int]  # single-token word pieces
    letters: dict[str, int]  # letter -> its single token
    arrow: list[int]  # " ->" as tokenized after a word
    newline: list[int]  # "\n" as tokenized after a word


def probe_vocab(tokenizer) -> ProbeVocab:
    """Items from the tokenizer: lower-case ASCII words of 2-8 letters and single letters that
    encode to exactly one token."""
    words, seen = [], set()
    for i in range(tokenizer.vocab_size):
        s = tokenizer.decode([i])
        if s not in seen and 2 <= len(s) <= 8 and s.isascii() and s.isalpha() and s.islower():
            seen.add(s)
            ids = tokenizer.encode(s)
            if len(ids) == 1:
                words.append(ids[0])
    letters = {c: ids[0] for c in ascii_lowercase if len(ids := tokenizer.encode(c)) == 1}
    need = 2 * STORE
    if len(words) < need:
        raise ValueError(f"ICL probes: the tokenizer has {len(words)} single-token words, "
                         f"at least {need} are needed (a vocabulary this small cannot be probed)")
    return ProbeVocab(words, letters, split_encode(tokenizer, "x", " ->")[1],
                      split_encode(tokenizer, "x", "\n")[1])


# Each task: (vocab, k, rng) -> (context ids, [(input ids, output ids)] * (k + 1), candidates).
def _copy(v, k, rng):
    xs = rng.sample(v.words, k + 1)
    others = rng.sample([w for w in v.words if w != xs[-1]], COPY_CHOICES - 1)
    return [], [([x], [x]) for x in xs], [xs[-1]] + others


def _reverse(v, k, rng):
    xs = rng.sample(v.words, (k + 1) * REVERSE_LEN)
    seqs = [xs[i:i + REVERSE_LEN] for i in range(0, len(xs), REVERSE_LEN)]
    return [], [(s, s[::-1]) for s in seqs], seqs[-1]


def _kv_recall(v, k, rng):
    xs = rng.sample(v.words, 2 * STORE)
    keys, values = xs[:STORE], xs[STORE:]
    context = [t for pair in zip(keys, values) for t in pair] + v.newline
    return context, [([keys[j]], [values[j]]) for j in rng.sample(range(STORE), k + 1)], values


def _next_token(v, k, rng):
    seq = rng.sample(v.words, STORE)
    picks = rng.sample(range(STORE - 1), k + 1)
    return seq + v.newline, [([seq[j]], [seq[j + 1]]) for j in picks], seq


def _letter_shift(v, k, rng):
    succ = {c: ascii_lowercase[(i + 1) % 26] for i, c in enumerate(ascii_lowercase)}
    pairs = [([v.letters[c]], [v.letters[succ[c]]]) for c in v.letters if succ[c] in v.letters]
    if len(pairs) < k + 1:
        raise ValueError(f"letter_shift: {k + 1} letter pairs needed, the tokenizer has {len(pairs)}")
    return [], rng.sample(pairs, k + 1), list(v.letters.values())


TASKS = {"copy": _copy, "reverse": _reverse, "kv_recall": _kv_recall, "next_token": _next_token,
         "letter_shift": _letter_shift}


def make_episodes(task: str, k: int, vocab: ProbeVocab, n: int, seed: int = 0) -> list[tuple]:
    """n episodes (prompt ids, answer ids, candidate ids for the first answer token)."""
    if task not in TASKS:
        raise ValueError(f"unknown ICL task {task!r}; expected one of {', '.join(TASKS)}")
    rng = random.Random(f"{seed}/{task}/{k}")
    out = []
    for _ in range(n):
        context, pairs, choices = TASKS[task](vocab, k, rng)
        prompt = list(context)
        for inp, outp in pairs[:-1]:
            prompt += inp + vocab.arrow + outp + vocab.newline
        prompt += pairs[-1][0] + vocab.arrow
        choices = list(choices)
        rng.shuffle(choices)  # argmax ties (a flat model) must not favour the answer's slot
        out.append((prompt, pairs[-1][1], choices))
    return out


@torch.no_grad()
def score_episodes(model, episodes, batch_size: int = 64) -> dict:
    """Greedy and restricted-choice accuracy (see the module docstring) and chance level."""
    greedy = choice = 0
    for start in range(0, len(episodes), batch_size):
        batch = episodes[start:start + batch_size]
        logits = padded_logits(model, [p + a for p, a, _ in batch]).cpu()
        for r, (prompt, answer, choices) in enumerate(batch):
            pred = logits[r, len(prompt) - 1:len(prompt) - 1 + len(answer)]
            greedy += pred.argmax(-1).tolist() == answer
            choice += choices[int(pred[0, choices].argmax())] == answer[0]
    n = len(episodes)
    return {"greedy": greedy / n, "choice": choice / n,
            "chance": sum(1 / len(set(c)) for _, _, c in episodes) / n}


def icl_accuracy(model, vocab: ProbeVocab, ks=KS, episodes: int = 100, seed: int = 0,
                 tasks=tuple(TASKS), batch_size: int = 64) -> dict:
    """{task: {k: accuracies}} plus "mean" over tasks per k."""
    out = {t: {k: score_episodes(model, make_episodes(t, k, vocab, episodes, seed), batch_size)
               for k in ks} for t in tasks}
    out["mean"] = {k: {m: sum(out[t][k][m] for t in tasks) / len(tasks) for m in ("greedy", "choice", "chance")}
                   for k in ks}
    return out
