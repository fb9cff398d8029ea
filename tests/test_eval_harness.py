import json

import pytest
import torch
from lm_eval.api.instance import Instance

from llm.eval.harness import LLMAdapter
from llm.model import build_model

MAX_LEN = 24


@pytest.fixture(scope="module")
def tok(data_dir):
    from llm.data import load_tokenizer
    return load_tokenizer(data_dir)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return build_model({"vocab_size": tok.vocab_size, "d_model": 32, "n_layers": 2, "n_heads": 4,
                        "layer_pattern": ["softmax", "gated_deltanet"]}).eval()


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@torch.no_grad()
def direct(model, ids, n_scored):
    """Log-prob of the last n_scored tokens of ids (left-truncated to MAX_LEN + 1) and greediness."""
    ids = torch.tensor(ids[-(MAX_LEN + 1):])
    logp = model(ids[None, :-1])[0].log_softmax(-1)[-n_scored:]
    target = ids[-n_scored:]
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def test_loglikelihood_matches_direct_scoring(model, tok):
    lm = LLMAdapter(model=model, tokenizer=tok, max_length=MAX_LEN, batch_size=3)
    cases = [("The object", " is a class"), ("A", " name"), ("", "return value"),
             ("For each value of the function the loop returns a new object, and so on for", " the class"),
             ("x = 1\n", "def f():")]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in cases])
    for (ctx, cont), (lp, greedy) in zip(cases, got):
        whole = tok.encode(ctx + cont)
        ctx_ids = tok.encode(ctx) if ctx else []
        assert whole[:len(ctx_ids)] == ctx_ids  # these contexts tokenize the same inside the whole
        ids = (ctx_ids or [tok.eos_id]) + whole[len(ctx_ids):]
        want_lp, want_greedy = direct(model, ids, len(whole) - len(ctx_ids))
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy
    assert len(tok.encode(cases[3][0] + cases[3][1])) > MAX_LEN + 1  # the left-truncated case


def test_rolling_loglikelihood_is_the_sum_over_tokens(model, tok):
    lm = LLMAdapter(model=model, tokenizer=tok, max_length=MAX_LEN, batch_size=2)
    short, long = "The value of the object", "The value of the object is a class name. " * 6
    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", short), request("loglikelihood_rolling", long)])
    ids = tok.encode(short)
    assert got[0] == pytest.approx(direct(model, [tok.eos_id] + ids, len(ids))[0], abs=1e-4)
    ids = tok.encode(long)
    assert len(ids) > 2 * MAX_LEN
    # every token predicted once; the first MAX_LEN from the start, the rest by windows ending there
    want = direct(model, [tok.eos_id] + ids[:MAX_LEN], MAX_LEN)[0]
    done = MAX_LEN
    while done < len(ids):
        n = min(MAX_LEN, len(ids) - done)
        want += direct(model, ids[:done + n], n)[0]
        done += n
    assert got[1] == pytest.approx(want, abs=1e-3)


def test_generate_until_is_greedy_decoding(model, tok):
    lm = LLMAdapter(model=model, tokenizer=tok, max_length=MAX_LEN, batch_size=4)
    prompts = ["The class", "A function of the value", "The name"]

    def greedy(prompt, n):
        ids = tok.encode(prompt)
        out = []
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            out.append(nxt)
        return tok.decode(ids + out)[len(tok.decode(ids)):]

    free = lm.generate_until([request("generate_until", p, {"max_gen_toks": 6, "until": []}) for p in prompts])
    assert free == [greedy(p, 6) for p in prompts]
    stop = free[1][3:5]  # a stop string inside the second generation cuts it before its first occurrence
    cut = lm.generate_until([request("generate_until", prompts[1], {"max_gen_toks": 6, "until": [stop]})])
    assert cut == [free[1][:free[1].index(stop)]]


def test_simple_evaluate_offline_with_a_local_task(model, tok, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    docs = [{"question": "The value of the", "choices": ["object", "class", "def"], "label": 0},
            {"question": "A function", "choices": ["name", "is", "for"], "label": 1},
            {"question": "x = 1 and y", "choices": ["= 2", "is not", "value"], "label": 2}]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    lm = LLMAdapter(model=model, tokenizer=tok, max_length=MAX_LEN)
    out = simple_evaluate(model=lm, tasks=["tiny_mc"], num_fewshot=0,
                          task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                          log_samples=False)
    correct = 0
    for d in docs:  # lm-eval joins context and choice with a space
        scores = [lm.loglikelihood([request("loglikelihood", d["question"], " " + c)])[0][0] for c in d["choices"]]
        correct += max(range(3), key=scores.__getitem__) == d["label"]
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(correct / len(docs))
