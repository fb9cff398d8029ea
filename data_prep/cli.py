"""`python -m data_prep tokenize|bi-induct`: build a token-shard directory, or rewrite one."""
import argparse
import collections
import hashlib
import itertools
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from tqdm import tqdm

from data_prep.sources import HFOptions, documents
from llm.data import shards
from llm.data.bi_induct import MODES, RewriteStats, check_args, rewrite
from llm.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from llm.files import write_json

BATCH_DOCUMENTS = 512  # documents per encoding task


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tokenize", help="source -> sentencepiece tokenizer + train/val token shards")
    t.add_argument("--source", required=True,
                   help="builtin:python-docs | files:<glob> | hf:<name>[:<config>] | hf-disk:<path>")
    t.add_argument("--out", required=True,
                   help="output directory (built beside it and swapped in when complete)")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--tokenizer", help="use this tokenizer instead of training one: a sentencepiece .model, "
                                       "a Hugging Face tokenizer.json (or a directory holding it), or a data directory")
    t.add_argument("--val-fraction", type=float, default=0.05,
                   help="expected fraction of documents held out (chosen by a hash of their text)")
    t.add_argument("--min-val-tokens", type=int, default=4096, help="fail if the held-out split is smaller")
    t.add_argument("--text-field", default="text", help="the text field of jsonl / parquet / hf rows")
    t.add_argument("--hf-split", default="train", help="split of an hf: or hf-disk: source")
    t.add_argument("--hf-data-files", action="append", metavar="GLOB",
                   help="data_files of an hf: source (repeatable), e.g. hf:parquet --hf-data-files 'dir/*.parquet'")
    t.add_argument("--hf-data-dir", metavar="DIR", help="data_dir of an hf: source")
    t.add_argument("--hf-revision", metavar="REV", help="revision (branch, tag or commit) of an hf: source")
    t.add_argument("--max-documents", type=int, help="read at most this many documents")
    t.add_argument("--tokenizer-sample-chars", type=int, default=20_000_000,
                   help="train the tokenizer on the first documents up to this many characters")
    t.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file")
    t.add_argument("--workers", type=int, default=1,
                   help="tokenizing processes (the output is the same for any number)")
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
    except (ValueError, FileNotFoundError) as e:  # DataError is a ValueError
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
    if args.workers < 1:
        raise ValueError(f"--workers: expected a positive number, got {args.workers}")
    # The source and a given tokenizer are checked before anything is written.
    hf = HFOptions(args.hf_split, args.hf_data_files, args.hf_data_dir, args.hf_revision)
    docs = documents(args.source, args.text_field, hf)
    given = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if args.max_documents:
        docs = itertools.islice(docs, args.max_documents)
    with shards.building(args.out) as out:
        if given:
            tok, head = given, []
            shards.copy_file(given.path, os.path.join(out, given.file_name))
        else:
            tok, head = _train_tokenizer(args, docs, out)
        splits, chars = _write_splits(args, out, tok, itertools.chain(head, docs))
        if splits["val"]["tokens"] < args.min_val_tokens:
            raise ValueError(f"the held-out split has {splits['val']['tokens']} tokens "
                             f"({splits['val']['documents']} documents), fewer than --min-val-tokens="
                             f"{args.min_val_tokens}: raise --val-fraction (now {args.val_fraction})")
        shards.finish(out, {
            "format": shards.FORMAT, "source": args.source, "text_field": args.text_field,
            "vocab_size": tok.vocab_size, "dtype": shards.token_dtype(tok.vocab_size).name,
            "tokenizer": {"file": tok.file_name, "sha256": tok.sha256, "trained": not args.tokenizer},
            "special_ids": tok.special_ids(), "val_fraction": args.val_fraction, "splits": splits,
            "bi_induct": None})
    print(f"{args.source}: {sum(e['documents'] for e in splits.values()):,} documents, {chars:,} characters")
    for split, entry in splits.items():
        print(f"  {split:<5} {entry['documents']:>8,} documents {entry['tokens']:>12,} tokens "
              f"in {len(entry['shards'])} shard(s)")
    print(f"wrote {args.out} ({_dir_mb(args.out):.1f} MB) in {time.time() - started:.1f} s")


def _train_tokenizer(args, docs, out: str) -> tuple[Tokenizer, list[str]]:
    """Train on the first documents (returned too: they are tokenized like the rest)."""
    head, head_chars = [], 0
    for doc in docs:
        head.append(doc)
        head_chars += len(doc)
        if head_chars >= args.tokenizer_sample_chars:
            break
    if not head:
        raise ValueError(f"--source {args.source}: no documents")
    sample = [d for d in head if _split_of(d, args.val_fraction) == "train"]  # held-out text unseen
    print(f"training a {args.vocab_size}-piece tokenizer on {len(sample)} documents "
          f"({sum(map(len, sample)):,} chars)", flush=True)
    return train_tokenizer(sample, os.path.join(out, shards.TOKENIZER_FILE), args.vocab_size), head


def _write_splits(args, out: str, tok: Tokenizer, stream) -> tuple[dict, int]:
    """Tokenize `stream` into the train / val shards of `out`; (meta.json's splits, characters)."""
    writers = {s: shards.ShardWriter(out, s, tok.vocab_size, tok.sha256, args.shard_tokens) for s in shards.SPLITS}
    counts = dict.fromkeys(shards.SPLITS, 0)
    chars = 0
    batches = iter(lambda: list(itertools.islice(stream, BATCH_DOCUMENTS)), [])
    with tqdm(desc="tokenizing", unit=" docs", disable=None) as bar:
        for batch_chars, encoded in _encoded(batches, tok, args.val_fraction, args.workers):
            for split, (tokens, n_docs) in encoded.items():
                writers[split].write(tokens)
                counts[split] += n_docs
            chars += batch_chars
            bar.update(sum(n for _, n in encoded.values()))
    return {s: {**w.close(), "documents": counts[s]} for s, w in writers.items()}, chars


def _encode(tok: Tokenizer, batch: list[str], val_fraction: float) -> tuple[int, dict]:
    """(characters, {split: (its documents' tokens, each followed by eos; document count)})."""
    by_split = {s: [] for s in shards.SPLITS}
    for doc in batch:
        by_split[_split_of(doc, val_fraction)].append(doc)
    encoded = {}
    for split, part in by_split.items():
        ids = tok.encode_batch(part)
        encoded[split] = (np.fromiter(itertools.chain.from_iterable(i + [tok.eos_id] for i in ids),
                                      dtype=np.int64), len(part))
    return sum(map(len, batch)), encoded


def _encoded(batches, tok: Tokenizer, val_fraction: float, workers: int):
    """`_encode` of each batch, in order; by `workers` processes (at most 2 tasks each in flight).
    A process pool, unlike multiprocessing.Pool, fails (BrokenProcessPool) rather than hangs when a
    worker dies."""
    if workers == 1:
        yield from (_encode(tok, batch, val_fraction) for batch in batches)
        return
    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _start_worker, (tok.path,)) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.submit(_worker_encode, batch, val_fraction))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


_worker_tokenizer = None  # a tokenizing process's own tokenizer


def _start_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _worker_encode(batch: list[str], val_fraction: float) -> tuple[int, dict]:
    return _encode(_worker_tokenizer, batch, val_fraction)


def bi_induct(args) -> None:
    started = time.time()
    if os.path.abspath(args.in_dir) == os.path.abspath(args.out):
        raise ValueError("--out must differ from --in (the natural shards stay as they are)")
    source = {s: shards.TokenShards(args.in_dir, s) for s in shards.SPLITS}
    train = source["train"]
    check_args(args.mode, args.rate, args.span, train.require_sep(), args.seq_len)
    if train.bi_induct:
        raise ValueError(f"{args.in_dir} is already rewritten ({train.bi_induct['mode']}); start from natural shards")
    sha, T = train.meta["tokenizer"]["sha256"], args.seq_len
    chunk = T * 4096  # whole windows, so block indices line up with the loader's
    stats = RewriteStats()
    splits = {}
    with shards.building(args.out) as out:
        shards.copy_file(train.tokenizer_path, os.path.join(out, train.meta["tokenizer"]["file"]))
        for split, data in source.items():
            shard_tokens = max(1, max(len(a) for a in data.arrays))
            writer = shards.ShardWriter(out, split, data.vocab_size, sha, shard_tokens)
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
        write_json(os.path.join(out, "bi_induct_stats.json"), record)
        shards.finish(out, {**train.meta, "splits": splits, "bi_induct": record})
    s = record["stats"]
    print(f"bi-induct {args.mode} rate {args.rate} span {args.span} seed {args.seed} seq_len {T}: "
          f"{s['snippets']:,} snippets, {s['snippet_tokens']:,} of {s['tokens']:,} train tokens "
          f"({s['token_fraction']:.2%}) in snippets; directions {s['directions']}; half lengths {s['span_hist']}")
    print(f"wrote {args.out} ({_dir_mb(args.out):.1f} MB) in {time.time() - started:.1f} s")


def _dir_mb(path: str) -> float:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file()) / 1e6
