"""Corpus preparation: sources -> sentencepiece tokenizer -> memory-mappable token shards, and the
Bi-Induct rewrite of a token stream. Run `python -m data_prep --help`."""
