"""Token data, from disk to training batches; `data_prep` builds its directories with these modules.

    shards.py     the directory format: its writer (ShardWriter) and its reader (TokenShards)
    tokenizer.py  the sentencepiece tokenizer: training it, and load_tokenizer (the one way to load it)
    bi_induct.py  the Bi-Induct rewrite of a token stream
    loader.py     the training sampler (WindowLoader) and held-out windows (eval_windows, rank_batches)
    docs.py       document starts in a window (doc_starts), for data.doc_mask

The loader (and docs) need torch, the loader the config schema too, so their names are imported on
first use: writing a directory (`python -m data_prep`) loads neither.
"""
from llm.data.shards import DataError, TokenShards
from llm.data.tokenizer import load_tokenizer

LOADER_NAMES = ("WindowLoader", "eval_windows", "rank_batches")
__all__ = ["DataError", "TokenShards", "load_tokenizer", *LOADER_NAMES, "doc_starts"]


def __getattr__(name: str):
    if name in LOADER_NAMES:
        from llm.data import loader

        return getattr(loader, name)
    if name == "doc_starts":
        from llm.data.docs import doc_starts

        return doc_starts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
