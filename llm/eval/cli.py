"""`python -m llm eval RUN_DIR [--ppl] [--tasks ...] [--induction [--ablate]] [--icl]`.

Each evaluation writes RUN_DIR/eval/<name>.json (ppl, harness, induction, icl) and prints a table.
"""
import argparse
import json
import os

import torch

from llm import HelpFormatter
from llm.checkpoint import add_trust_argument
from llm.eval import format_table, load_run, save_result, token_losses
from llm.logs import log_eval_results


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m llm eval", formatter_class=HelpFormatter,
                                description="Evaluate a trained run or an export directory.")
    p.add_argument("run_dir", help="run directory (train.out_dir) or export directory (python -m llm export); "
                                   "results go to its eval/")
    p.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    add_trust_argument(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    p.add_argument("--seq-len", type=int, help="context length (default: the run's data.seq_len)")
    p.add_argument("--windows", type=int, default=0,
                   help="held-out windows for --ppl and --ablate; 0: the whole val split")
    p.add_argument("--seed", type=int, default=0, help="seed of sampled windows, tokens and episodes")
    g = p.add_argument_group("perplexity")
    g.add_argument("--ppl", action="store_true", help="loss, perplexity, bits per byte, loss by position")
    g.add_argument("--shards", nargs="+", default=[], metavar="DIR",
                   help="more tokenized data directories (their val split) besides the run's data.path")
    g = p.add_argument_group("lm-evaluation-harness")
    g.add_argument("--tasks", help="comma-separated lm-eval task names, e.g. lambada_openai,hellaswag")
    g.add_argument("--num-fewshot", type=int, default=0, help="demonstrations before each example")
    g.add_argument("--include-path", help="directory of local task YAMLs (runs offline)")
    g.add_argument("--limit", type=float, help="examples per task (testing only)")
    g = p.add_argument_group("induction telemetry")
    g.add_argument("--induction", action="store_true", help="induction / anti-induction / copy scores")
    g.add_argument("--ablate", action="store_true", help="also ablate the top induction heads vs random heads")
    g.add_argument("--ablate-fraction", type=float, default=0.02, help="heads per layer to ablate (at least 1)")
    g.add_argument("--ablate-seeds", type=int, default=3, help="random-head control draws")
    g.add_argument("--all-checkpoints", action="store_true", help="scores of every complete checkpoint too")
    g.add_argument("--repeat-len", type=int, help="random tokens per copy (default: seq_len // 2)")
    g.add_argument("--repeat-batch", type=int, default=32, help="repeated sequences scored")
    g = p.add_argument_group("in-context probes")
    g.add_argument("--icl", action="store_true", help="function-style ICL probe accuracy by k")
    g.add_argument("--icl-k", default="0,1,2,4,8", help="numbers of demonstrations")
    g.add_argument("--icl-episodes", type=int, default=100, help="episodes per task and k")
    a = p.parse_args(argv)
    a.induction = a.induction or a.ablate or a.all_checkpoints
    if not (a.ppl or a.tasks or a.induction or a.icl):
        p.error("nothing to do: give one or more of --ppl, --tasks, --induction, --icl")
    return a


def run_ppl(a, model, cfg, tok, tag) -> dict:
    from llm.data import TokenShards, eval_windows
    from llm.eval.ppl import perplexity

    datasets = {}
    for path in dict.fromkeys([cfg.data.path, *a.shards]):
        shards = TokenShards(path, "val")
        if shards.meta["tokenizer"]["sha256"] != tok.sha256:
            raise ValueError(f"{path}: tokenized with another tokenizer than the run's data ({cfg.data.path}); "
                             f"the model reads only its own token ids")
        windows = eval_windows(shards, a.seq_len or cfg.data.seq_len, a.windows)
        datasets[path] = perplexity(model, windows, tok, a.batch_size)
    buckets = [b["positions"] for b in next(iter(datasets.values()))["by_position"]]
    rows = [[p, r["tokens"], r["loss"], r["ppl"], r["bits_per_byte"], *(b["loss"] for b in r["by_position"])]
            for p, r in datasets.items()]
    print(format_table(["data (val)", "tokens", "loss", "ppl", "bpb", *(f"loss@{b}" for b in buckets)], rows))
    return {"tag": tag, "datasets": datasets}


def run_harness(a, model, cfg, tok, tag) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from llm.eval.harness import LLMAdapter

    lm = LLMAdapter(model=model, tokenizer=tok, max_length=a.seq_len or cfg.data.seq_len,
                    batch_size=a.batch_size, device=a.device)
    tasks = a.tasks.split(",")
    # Indexing lm-eval's ~15k built-in task configs takes ~20 s: skip it when the local ones suffice.
    manager = TaskManager(include_path=a.include_path, include_defaults=False) if a.include_path else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=a.include_path)
    out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=a.num_fewshot,
                          task_manager=manager, limit=a.limit, log_samples=False, random_seed=a.seed)
    print(make_table(out))
    # One file keeps the newest result of every task evaluated on this run.
    path = os.path.join(a.run_dir, "eval", "harness.json")
    saved = json.load(open(path))["tasks"] if os.path.isfile(path) else {}
    for name, metrics in out["results"].items():
        saved[name] = {**metrics, "tag": tag, "num_fewshot": out["n-shot"].get(name), "limit": a.limit}
    return {"tasks": saved}


def icl_ks(a) -> list[int]:
    return [int(k) for k in a.icl_k.split(",")]


def icl_table(results: dict, ks) -> str:
    rows = []
    for task, by_k in results.items():
        rows.append([task, "greedy", *(by_k[k]["greedy"] for k in ks)])
        rows.append(["", "choice", *(by_k[k]["choice"] for k in ks)])
        rows.append(["", "chance", *(by_k[k]["chance"] for k in ks)])
    return format_table(["task", "accuracy", *(f"k={k}" for k in ks)], rows)


def run_icl(a, model, cfg, tok, tag) -> dict:
    from llm.eval.icl import TASKS, icl_accuracy, make_episodes, probe_vocab

    vocab = probe_vocab(tok)
    ks = icl_ks(a)
    results = icl_accuracy(model, vocab, ks, a.icl_episodes, a.seed, batch_size=4 * a.batch_size)
    print(icl_table(results, ks))
    examples = {t: tok.decode(sum(make_episodes(t, 2, vocab, 1, a.seed)[0][:2], [])) for t in TASKS}
    return {"tag": tag, "ks": ks, "episodes": a.icl_episodes, "seed": a.seed, "results": results,
            "examples_k2": examples}


def run_induction(a, model, cfg, tok, tag) -> dict:
    from llm.eval.icl import icl_accuracy, probe_vocab
    from llm.eval.induction import (checkpoint_scores, copy_losses, head_ablation, induction_report,
                                    repeated_tokens)

    seq_len = a.seq_len or cfg.data.seq_len
    special = set(tok.special_ids().values())
    candidates = [i for i in range(tok.vocab_size) if i not in special]
    length = a.repeat_len or seq_len // 2
    tokens = repeated_tokens(candidates, a.repeat_batch, length, a.seed)
    report = {"tag": tag, "repeat_len": length, **induction_report(model, tokens, a.batch_size)}
    rows = []
    for e in report["layers"]:
        heads = e.get("induction")
        best = max(range(len(heads)), key=heads.__getitem__) if heads else None
        anti = e.get("anti_induction")
        rows.append([e["layer"], e["mixer"], heads and heads[best], best, anti and max(anti),
                     e["copy_score_ablated"], e["copy_score_change"]])
    print(f"copy loss: first copy {report['copy_loss_first']:.3f}, second copy {report['copy_loss_second']:.3f} "
          f"(copy score {report['copy_score']:.3f} nats)")
    print(format_table(["layer", "mixer", "max induction", "head", "max anti-ind.", "copy score (layer ablated)",
                        "change"], rows))
    if a.ablate:
        from llm.data import TokenShards, eval_windows
        val = eval_windows(TokenShards(cfg.data.path, "val"), seq_len, a.windows)
        vocab = probe_vocab(tok)

        def metrics():
            icl = icl_accuracy(model, vocab, icl_ks(a), a.icl_episodes, a.seed, batch_size=4 * a.batch_size)["mean"]
            return {"val_loss": token_losses(model, val, a.batch_size).mean().item(),
                    "copy_loss_second": copy_losses(model, tokens, a.batch_size)[1],
                    "icl_greedy": sum(m["greedy"] for m in icl.values()) / len(icl),
                    "icl_choice": sum(m["choice"] for m in icl.values()) / len(icl)}

        ab = report["ablation"] = head_ablation(model, report, metrics, a.ablate_fraction, a.ablate_seeds)
        print(f"ablated induction heads {ab['induction_heads']} vs {a.ablate_seeds} random draws:")
        print(format_table(["metric", "baseline", "induction heads off", "random heads off", "random std"],
                           [[k, ab["baseline"][k], ab["induction_ablated"][k], ab["random_mean"][k],
                             ab["random_std"][k]] for k in ab["baseline"]]))
    if a.all_checkpoints:
        report["checkpoints"] = checkpoint_scores(a.run_dir, tokens, a.batch_size, a.device)
        print(format_table(["checkpoint", "step", *(f"L{i} max induction" for i in range(len(model.blocks)))],
                           [[c["tag"], c["step"], *(s and max(s) for s in c["induction"])]
                            for c in report["checkpoints"]]))
    return report


def main(argv=None):
    a = parse(argv)
    model, cfg, tok, tag = load_run(a.run_dir, a.tag, a.device, a.trust_checkpoint)
    print(f"{a.run_dir} @ {tag}: layers {[b.mixer.name for b in model.blocks]}")
    results = {}
    for name, wanted, run in [("ppl", a.ppl, run_ppl), ("harness", a.tasks, run_harness),
                              ("icl", a.icl, run_icl), ("induction", a.induction, run_induction)]:
        if wanted:
            print(f"\n== {name} ==")
            results[name] = run(a, model, cfg, tok, tag)
            print(f"wrote {save_result(a.run_dir, name, results[name])}")
    log_eval_results(cfg, a.run_dir, results)  # to the run's wandb run, if it has one
