"""`python -m data_prep tokenize|bi-induct`: build a token-shard directory, or rewrite one."""
import argparse
import hashlib
import itertools
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from data_prep.sources import documents
from llm.data import shards
from llm.data.bi_induct import MODES, RewriteStats, check_args, rewrite
from llm.data.tokenizer import load_tokenizer, train_tokenizer
from llm.files import write_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tokenize", help="source -> sentencepiece tokenizer + train/val token shards")
    t.add_argument("--source", required=True, help="builtin:python-docs | files:<glob> | hf:<name>[:<config>]")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--tokenizer", help="use this tokenizer (.model file or data directory) instead of training one")
    t.add_argument("--val-fraction", type=float, default=0.05,
                   help="expected fraction of documents held out (chosen by a hash of their text)")
    t.add_argument("--min-val-tokens", type=int, default=4096, help="fail if the held-out split is smaller")
    t.add_argument("--text-field", default="text", help="the text field of jsonl / parquet / hf rows")
    t.add_argument("--hf-split", default="train", help="split of an hf: source")
    t.add_argument("--max-documents", type=int, help="read at most this many documents")
    t.add_argument("--tokenizer-sample-chars", type=int, default=20_000_000,
                   help="train the tokenizer on the first documents up to this many characters")
    t.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file")
    t.set_defaults(run=tokenize)

    b = sub.add_parser("bi-induct", help="rewrite a directory's train split with Bi-Induct snippets")
    b.add_argument("--in", dest="in_dir", required=True, help="a directory made by `tokenize`")
    b.add_argument("--out", required=True, help="output directory (validation copied unchanged)")
    b.add_argument("--mode", required=True, choices=MODES)
    b.add_argument("--rate", type=float, default=0.5, help="fraction of tokens inside snippets")
    b.add_argument("--span", type=int, nargs=2, default=[20, 20], metavar=("LO", "HI"),
                   help="snippet half length L ~ U[LO, HI]")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--seq-len", type=int, required=True,
                   help="the training data.seq_len: snippets never cross its windows")
    b.set_defaults(run=bi_induct)

    args = p.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _split_of(doc: str, val_fraction: float) -> str:
    """A document's split from a hash of its text: deterministic, order-free, and duplicates of a
    document always land in the same split."""
    u = int.from_bytes(hashlib.sha1(doc.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2.0 ** 64
    return "val" if u < val_fraction else "train"


def tokenize(args) -> None:
    started = time.time()
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction: expected a number in (0, 1), got {args.val_fraction}")
    out = args.out
    docs = documents(args.source, args.text_field, args.hf_split)
    if args.max_documents:
        docs = itertools.islice(docs, args.max_documents)
    shards.begin(out)
    tok_path = os.path.join(out, shards.TOKENIZER_FILE)
    head = []
    if args.tokenizer:
        shards.copy_file(load_tokenizer(args.tokenizer).path, tok_path)
    else:
        head_chars = 0
        for doc in docs:  # the first documents are the tokenizer's training sample
            head.append(doc)
            head_chars += len(doc)
            if head_chars >= args.tokenizer_sample_chars:
                break
        if not head:
            raise ValueError(f"--source {args.source}: no documents")
        sample = [d for d in head if _split_of(d, args.val_fraction) == "train"]  # held-out text unseen
        print(f"training a {args.vocab_size}-piece tokenizer on {len(sample)} documents "
              f"({sum(map(len, sample)):,} chars)", flush=True)
        train_tokenizer(sample, tok_path, args.vocab_size)
    tok = load_tokenizer(tok_path)

    writers = {s: shards.ShardWriter(out, s, tok.vocab_size, tok.sha256, args.shard_tokens) for s in shards.SPLITS}
    counts = dict.fromkeys(shards.SPLITS, 0)
    chars = 0
    stream = itertools.chain(head, docs)
    with tqdm(desc="tokenizing", unit=" docs", disable=None) as bar:
        while batch := list(itertools.islice(stream, 512)):
            by_split = {s: [] for s in shards.SPLITS}
            for doc in batch:
                by_split[_split_of(doc, args.val_fraction)].append(doc)
            for split, part in by_split.items():
                ids = tok.encode_batch(part)
                writers[split].write(np.fromiter(
                    itertools.chain.from_iterable(i + [tok.eos_id] for i in ids), dtype=np.int64))
                counts[split] += len(part)
            chars += sum(map(len, batch))
            bar.update(len(batch))
    splits = {s: {**w.close(), "documents": counts[s]} for s, w in writers.items()}
    if splits["val"]["tokens"] < args.min_val_tokens:
        raise ValueError(f"the held-out split has {splits['val']['tokens']} tokens "
                         f"({counts['val']} documents), fewer than --min-val-tokens={args.min_val_tokens}: "
                         f"raise --val-fraction (now {args.val_fraction})")
    shards.finish(out, {
        "format": shards.FORMAT, "source": args.source, "text_field": args.text_field,
        "vocab_size": tok.vocab_size, "dtype": shards.token_dtype(tok.vocab_size).name,
        "tokenizer": {"file": shards.TOKENIZER_FILE, "sha256": tok.sha256, "trained": not args.tokenizer},
        "special_ids": tok.special_ids(), "val_fraction": args.val_fraction, "splits": splits,
        "bi_induct": None})
    print(f"{args.source}: {sum(counts.values()):,} documents, {chars:,} characters")
    for split, entry in splits.items():
        print(f"  {split:<5} {entry['documents']:>8,} documents {entry['tokens']:>12,} tokens "
              f"in {len(entry['shards'])} shard(s)")
    print(f"wrote {out} ({_dir_mb(out):.1f} MB) in {time.time() - started:.1f} s")


def bi_induct(args) -> None:
    started = time.time()
    if os.path.abspath(args.in_dir) == os.path.abspath(args.out):
        raise ValueError("--out must differ from --in (the natural shards stay as they are)")
    source = {s: shards.TokenShards(args.in_dir, s) for s in shards.SPLITS}
    train = source["train"]
    check_args(args.mode, args.rate, args.span, train.sep_id, args.seq_len)
    if train.bi_induct:
        raise ValueError(f"{args.in_dir} is already rewritten ({train.bi_induct['mode']}); start from natural shards")
    shards.begin(args.out)
    shards.copy_file(train.tokenizer_path, os.path.join(args.out, train.meta["tokenizer"]["file"]))

    sha, T = train.meta["tokenizer"]["sha256"], args.seq_len
    chunk = T * 4096  # whole windows, so block indices line up with the loader's
    stats = RewriteStats()
    splits = {}
    for split, data in source.items():
        shard_tokens = max(1, max(len(a) for a in data.arrays))
        writer = shards.ShardWriter(args.out, split, data.vocab_size, sha, shard_tokens)
        for start in tqdm(range(0, data.num_tokens, chunk), desc=split, unit=" chunks", disable=None):
            tokens = data.slice(start, min(start + chunk, data.num_tokens))
            if split == "train":  # the held-out split is never rewritten
                done = rewrite(tokens, args.mode, args.rate, args.span, args.seed, train.sep_id, T, start)
                tokens = done.tokens
                stats.add(done.stats)
            writer.write(tokens)
        splits[split] = {**writer.close(), "documents": data.meta["splits"][split].get("documents")}
    record = {"mode": args.mode, "rate": args.rate, "span": list(args.span), "seed": args.seed,
              "seq_len": T, "sep_id": train.sep_id, "source": os.path.abspath(args.in_dir),
              "stats": stats.as_dict()}
    write_json(os.path.join(args.out, "bi_induct_stats.json"), record)
    shards.finish(args.out, {**train.meta, "splits": splits, "bi_induct": record})
    s = record["stats"]
    print(f"bi-induct {args.mode} rate {args.rate} span {args.span} seed {args.seed} seq_len {T}: "
          f"{s['snippets']:,} snippets, {s['snippet_tokens']:,} of {s['tokens']:,} train tokens "
          f"({s['token_fraction']:.2%}) in snippets; directions {s['directions']}; half lengths {s['span_hist']}")
    print(f"wrote {args.out} ({_dir_mb(args.out):.1f} MB) in {time.time() - started:.1f} s")


def _dir_mb(path: str) -> float:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file()) / 1e6
