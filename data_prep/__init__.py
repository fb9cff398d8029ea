"""Corpus preparation: document sources and the `python -m data_prep` CLI, which trains a
sentencepiece tokenizer, writes memory-mappable token shards and rewrites them with Bi-Induct
through `llm.data` (the format, tokenizer and rewrite live there). Run `python -m data_prep --help`."""
