import ast
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import llm
from llm.data import DataError, TokenShards, WindowLoader, eval_windows, load_tokenizer, rank_batches

T = 32


@pytest.fixture
def data_copy(tmp_path, data_dir):
    return shutil.copytree(data_dir, tmp_path / "shards")


def _raw(shards):
    return np.concatenate([np.fromfile(f, dtype=np.uint16) for f in shards.files])


def test_shards_concatenate_and_validate(data_dir):
    train = TokenShards(data_dir, "train")
    assert len(train.files) > 1 and train.num_tokens == len(_raw(train))
    raw = _raw(train)
    edge = int(train.offsets[1])  # a slice across the first shard boundary
    assert np.array_equal(train.slice(edge - 5, edge + 7), raw[edge - 5:edge + 7])
    assert np.array_equal(train.slice(0, train.num_tokens), raw)
    assert train.slice(3, 3).shape == (0,)
    with pytest.raises(IndexError):
        train.slice(0, train.num_tokens + 1)
    assert train.tokenizer_path.endswith("tokenizer.model") and train.bi_induct is None


def test_missing_directory_names_path_and_command(tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(DataError) as e:
        TokenShards(path, "train")
    assert str(path) in str(e.value)
    assert f"python -m data_prep tokenize --source builtin:python-docs --out {path}" in str(e.value)


def test_truncated_shard_names_the_file(data_copy):
    shard = data_copy / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(DataError, match=r"train-00001\.bin: \d+ bytes, expected \d+ .*truncated"):
        TokenShards(data_copy, "train")
    TokenShards(data_copy, "val")  # the other split is fine


def test_header_from_another_tokenizer_is_refused(data_copy):
    head = data_copy / "val-00000.json"
    h = json.loads(head.read_text())
    head.write_text(json.dumps({**h, "tokenizer_sha256": "0" * 64}))
    with pytest.raises(DataError, match=r"val-00000\.json: tokenizer_sha256='0000"):
        TokenShards(data_copy, "val")


def test_meta_and_tokenizer_are_checked_by_one_reader(data_copy):
    # TokenShards and load_tokenizer read a data directory's meta.json and tokenizer the same way.
    meta_path = data_copy / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "tokenizer": {"file": "tokenizer.model"}}))
    for read in (lambda: TokenShards(data_copy, "train"), lambda: load_tokenizer(str(data_copy))):
        with pytest.raises(DataError, match=r"meta\.json: missing field tokenizer\.sha256; remake it with: "
                                            r"python -m data_prep tokenize"):
            read()
    meta_path.write_text(json.dumps({**meta, "format": 2}))
    with pytest.raises(DataError, match=r"meta\.json: format 2, this code reads format 1"):
        load_tokenizer(str(data_copy))
    meta_path.write_text(json.dumps(meta))
    assert load_tokenizer(str(data_copy)).sha256 == meta["tokenizer"]["sha256"]
    shutil.copyfile(data_copy / "train-00000.bin", data_copy / "tokenizer.model")  # a foreign file
    for read in (lambda: TokenShards(data_copy, "val"), lambda: load_tokenizer(str(data_copy))):
        with pytest.raises(DataError, match=r"tokenizer\.model: missing or not the tokenizer meta\.json names"):
            read()


def test_writing_data_needs_neither_torch_nor_the_config_and_llm_never_imports_data_prep():
    code = ("import sys, data_prep.cli, llm.data; "
            "print(sorted({'torch', 'omegaconf', 'llm.config'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    llm_root = pathlib.Path(llm.__file__).parent
    for path in llm_root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "data_prep" for n in names), f"{path} imports {names}"


def test_out_of_vocab_token_names_the_shard(data_copy):
    shard = data_copy / "train-00001.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[10] = 60000  # same size, so only reading the window can notice
    tokens.tofile(shard)
    train = TokenShards(data_copy, "train")
    loader = WindowLoader(train, T, seed=0, global_batch_size=4)
    bad = (int(train.offsets[1]) + 10) // T
    with pytest.raises(DataError, match=r"train-00001\.bin: token id 60000 >= vocab_size 512"):
        loader.sample(int(np.flatnonzero(loader.permutation(0) == bad)[0]))


def test_windows_follow_a_seeded_permutation_per_epoch(data_dir):
    train = TokenShards(data_dir, "train")
    loader = WindowLoader(train, T, seed=7, global_batch_size=8)
    n = loader.num_windows
    assert n == (train.num_tokens - 1) // T
    raw = torch.from_numpy(_raw(train).astype(np.int64))
    epoch0 = [loader.window_index(g) for g in range(n)]
    epoch1 = [loader.window_index(g) for g in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n)) and epoch0 != epoch1
    for g in (0, 5, n + 3):
        w = loader.window_index(g)
        assert torch.equal(loader.sample(g), raw[w * T:w * T + T + 1])  # windows share their edge token
    same = WindowLoader(train, T, seed=7, global_batch_size=8)
    other = WindowLoader(train, T, seed=8, global_batch_size=8)
    assert all(torch.equal(loader.sample(g), same.sample(g)) for g in range(0, 3 * n, 7))
    assert [other.window_index(g) for g in range(n)] != epoch0


def test_step_reads_the_same_samples_for_any_rank_count(data_dir):
    loader = WindowLoader(TokenShards(data_dir, "train"), T, seed=1, global_batch_size=8)
    straddle = loader.num_windows // 8  # this step's samples run from epoch 0 into epoch 1
    assert loader.num_windows % 8
    for step in (0, 3, straddle):
        expected = None
        for world, micro in ((1, 8), (1, 2), (2, 2), (4, 1), (4, 2)):
            rows, indices = [], []
            for rank in range(world):
                for m in range(8 // (micro * world)):
                    indices += list(loader.sample_indices(step, m, rank, world, micro))
                    x, y = loader.micro_batch(step, m, rank, world, micro)
                    assert x.shape == y.shape == (micro, T) and x.dtype == torch.long
                    assert torch.equal(x[:, 1:], y[:, :-1])
                    rows += [tuple(r) for r in torch.cat([x, y[:, -1:]], 1).tolist()]
            assert sorted(indices) == list(range(step * 8, step * 8 + 8))
            expected = expected or sorted(rows)
            assert sorted(rows) == expected
    with pytest.raises(ValueError, match="not divisible by micro_batch_size"):
        loader.micro_batch(0, 0, 0, 3, 2)


def test_eval_windows_in_order_and_rank_split(data_dir):
    val = TokenShards(data_dir, "val")
    raw = torch.from_numpy(_raw(val).astype(np.int64))
    total = (val.num_tokens - 1) // T
    w = eval_windows(val, T, 5)
    assert w.shape == (5, T + 1)
    assert all(torch.equal(w[i], raw[i * T:i * T + T + 1]) for i in range(5))
    assert eval_windows(val, T, 0).shape == eval_windows(val, T, 10 ** 6).shape == (total, T + 1)
    windows = eval_windows(val, T, 11)
    for world in (1, 2, 3):
        per_rank = [list(rank_batches(windows, 2, r, world)) for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1  # same number of forwards everywhere
        used = torch.cat([b for p in per_rank for b, weight in p if weight])
        assert sorted(map(tuple, used.tolist())) == sorted(map(tuple, windows.tolist()))


def test_seq_len_longer_than_the_data_is_a_clear_error(data_dir):
    val = TokenShards(data_dir, "val")
    n = val.num_tokens
    assert val.num_windows(n - 1) == 1 and eval_windows(val, n - 1, 0).shape == (1, n)
    for make in (lambda: WindowLoader(val, n, seed=0, global_batch_size=1), lambda: eval_windows(val, n, 0)):
        with pytest.raises(DataError, match=rf"data\.seq_len={n} is longer than the data: .*val holds {n} "
                                            rf"tokens, fewer than one window of seq_len \+ 1 = {n + 1}"):
            make()
