from string import ascii_lowercase

import pytest
import torch
from torch import nn

from llm.eval.icl import KS, STORE, TASKS, icl_accuracy, make_episodes, probe_vocab, score_episodes


@pytest.fixture(scope="module")
def tok(data_dir):
    from llm.data import load_tokenizer
    return load_tokenizer(data_dir)


@pytest.fixture(scope="module")
def vocab(tok):
    return probe_vocab(tok)


class Lookup(nn.Module):
    """Predicts the next token of any prefix it was given (an oracle); otherwise flat logits."""

    def __init__(self, sequences, vocab_size):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.next = {tuple(s[:t + 1]): s[t + 1] for s in sequences for t in range(len(s) - 1)}
        self.vocab_size = vocab_size

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab_size)
        for b, row in enumerate(x.tolist()):
            for t in range(len(row)):
                if tuple(row[:t + 1]) in self.next:
                    logits[b, t, self.next[tuple(row[:t + 1])]] = 1.0
        return logits


def test_vocab_items_are_single_token_words(tok, vocab):
    assert len(vocab.words) >= 2 * STORE
    for w in vocab.words:
        text = tok.decode([w])
        assert text.isalpha() and tok.encode(text) == [w]
    assert all(tok.encode(c) == [i] for c, i in vocab.letters.items())
    assert tok.decode(vocab.arrow).strip() == "->" and tok.decode(vocab.newline) == "\n"


def test_episodes_are_deterministic_and_correct(tok, vocab):
    for task in TASKS:
        for k in KS:
            eps = make_episodes(task, k, vocab, 20, seed=3)
            assert eps == make_episodes(task, k, vocab, 20, seed=3)
            assert eps != make_episodes(task, k, vocab, 20, seed=4)
            for prompt, answer, choices in eps:
                assert answer[0] in choices
                lines = tok.decode(prompt).split("\n")
                demos, query = lines[-k - 1:-1], lines[-1]
                assert len(demos) == k and query.endswith(" ->")
                q = query[:-3].strip()
                assert all(d.split(" -> ")[0].strip() != q for d in demos)  # the query is new
                a = tok.decode(answer).strip()
                for d in demos + [f"{q} -> {a}"]:  # every demonstration and the answer obey the task
                    x, y = (s.strip().split() for s in d.split(" -> "))
                    if task == "copy":
                        assert y == x
                    elif task == "reverse":
                        assert y == x[::-1] and len(x) == 3
                    elif task == "letter_shift":
                        assert ascii_lowercase.index(y[0]) == (ascii_lowercase.index(x[0]) + 1) % 26
                    else:
                        context = lines[0].split()
                        assert len(context) == (2 * STORE if task == "kv_recall" else STORE)
                        i = context.index(x[0])
                        assert context[i + 1] == y[0] and (task == "next_token" or i % 2 == 0)


def test_scores_of_oracle_and_flat_models(vocab, tok):
    eps = [e for task in TASKS for e in make_episodes(task, 2, vocab, 40, seed=0)]
    oracle = Lookup([p + a for p, a, _ in eps], tok.vocab_size)
    got = score_episodes(oracle, eps, batch_size=16)
    assert got["greedy"] == 1.0 and got["choice"] == 1.0
    flat = score_episodes(Lookup([], tok.vocab_size), eps, batch_size=16)
    assert flat["greedy"] == 0.0  # argmax of flat logits is token 0 (<unk>), never an answer
    assert abs(flat["choice"] - flat["chance"]) < 0.1  # ties go to a shuffled slot, not the answer


def test_icl_accuracy_table(vocab, tok):
    torch.manual_seed(0)
    from llm.model import build_model
    model = build_model({"vocab_size": tok.vocab_size, "d_model": 32, "n_layers": 1, "n_heads": 2}).eval()
    res = icl_accuracy(model, vocab, ks=(0, 2), episodes=8, seed=0)
    assert set(res) == set(TASKS) | {"mean"}
    for k in (0, 2):
        assert res["mean"][k]["chance"] == pytest.approx(sum(res[t][k]["chance"] for t in TASKS) / len(TASKS))
        assert all(0 <= res[t][k]["choice"] <= 1 for t in TASKS)
