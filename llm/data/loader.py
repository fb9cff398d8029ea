"""The deterministic, resumable window sampler over token shards, and held-out evaluation windows.

The training stream is cut into non-overlapping windows of seq_len + 1 tokens that share their
edge token: window w is tokens [w*T, w*T + T + 1), T = seq_len (inputs are its first T tokens,
targets its last T). Epoch e reads the windows in the order of a permutation seeded by (seed, e),
and the g-th sample of the run (g counts across epochs) is window perm_e[g mod N], e = g // N. An
optimizer step consumes global samples [step*G, (step+1)*G), however they are split over ranks
and micro-steps, so the data position is one number (g) and any rank count reads the same stream.
"""
import numpy as np
import torch
from omegaconf import OmegaConf

from llm.config import BiInductConfig
from llm.data.bi_induct import RewriteStats, check_args, rewrite
from llm.data.shards import DataError, TokenShards


class WindowLoader:
    """Training windows by global sample index g; see the module docstring for the order.

    `bi_induct` is the config's data.bi_induct node (or None). With mode != none and apply=online,
    each training window is rewritten by `llm.data.bi_induct.rewrite` from (bi_induct.seed, its
    window index) at the rate of the step that reads it (annealed linearly to zero over max_steps
    when anneal=linear), so a resumed run reads exactly the same tokens. apply=prep expects the
    shards to hold that rewrite already (`python -m data_prep bi-induct`) and checks they do.
    """

    def __init__(self, shards: TokenShards, seq_len: int, seed: int, global_batch_size: int,
                 max_steps=None, bi_induct=None):
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.global_batch_size, self.max_steps = global_batch_size, max_steps
        self.num_windows = shards.num_windows(seq_len)
        self.bi = _bi_induct_plan(bi_induct, shards, seq_len, max_steps)
        self.stats = RewriteStats()
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a step straddles at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return self._perms[epoch]

    def window_index(self, g: int) -> int:
        return int(self.permutation(g // self.num_windows)[g % self.num_windows])

    def rate(self, g: int) -> float:
        """The Bi-Induct rate at global sample g (0 when not rewriting online)."""
        if self.bi is None:
            return 0.0
        if self.bi.anneal == "none":
            return self.bi.rate
        progress = min(1.0, (g // self.global_batch_size) / self.max_steps)
        return self.bi.rate * (1.0 - progress)

    def sample(self, g: int) -> torch.Tensor:
        """Global sample g: LongTensor[seq_len + 1]."""
        w, T = self.window_index(g), self.seq_len
        tokens = self.shards.slice(w * T, w * T + T + 1)
        if self.bi is not None:
            bi = self.bi
            done = rewrite(tokens[:T], bi.mode, self.rate(g), bi.span, bi.seed, self.shards.sep_id,
                           window=T, offset=w * T)
            tokens[:T] = done.tokens
            self.stats.add(done.stats)
        return torch.from_numpy(tokens.astype(np.int64))

    def sample_indices(self, step: int, micro_step: int, rank: int, world_size: int,
                       micro_batch_size: int) -> np.ndarray:
        m, G = micro_batch_size, self.global_batch_size
        if G % (m * world_size):
            raise ValueError(f"global_batch_size={G} is not divisible by micro_batch_size ({m}) x "
                             f"world_size ({world_size})")
        if not 0 <= micro_step < G // (m * world_size) or not 0 <= rank < world_size:
            raise ValueError(f"micro_step={micro_step} / rank={rank} out of range for "
                             f"{G // (m * world_size)} micro-steps x {world_size} ranks")
        return step * G + micro_step * m * world_size + rank * m + np.arange(m)

    def micro_batch(self, step: int, micro_step: int, rank: int, world_size: int, micro_batch_size: int):
        """(inputs [m, seq_len], targets [m, seq_len]) of this rank's micro-step of `step`."""
        idx = self.sample_indices(step, micro_step, rank, world_size, micro_batch_size)
        batch = torch.stack([self.sample(int(g)) for g in idx])
        return batch[:, :-1], batch[:, 1:]

    def rewrite_stats(self, reset: bool = True) -> dict:
        """Bi-Induct statistics of the windows sampled since the last reset (empty if not online)."""
        if self.bi is None:
            return {}
        stats = self.stats.as_dict()
        if reset:
            self.stats = RewriteStats()
        return stats


def _bi_induct_plan(bi_induct, shards: TokenShards, seq_len: int, max_steps):
    """The data.bi_induct node if the loader must rewrite online, else None; checks the shards fit."""
    bi = OmegaConf.merge(OmegaConf.structured(BiInductConfig), bi_induct or {})
    done = shards.bi_induct
    if bi.mode != "none" and bi.apply == "prep":
        want = {"mode": bi.mode, "rate": bi.rate, "span": list(bi.span), "seed": bi.seed, "seq_len": seq_len}
        have = {k: (done or {}).get(k) for k in want}
        if have != want or bi.anneal != "none":
            raise DataError(
                f"data.bi_induct.apply=prep needs shards rewritten with {want} and anneal=none "
                f"(the shards at {shards.path} hold {done and have}): make them with: python -m data_prep "
                f"bi-induct --in <natural data dir> --out {shards.path} --mode {bi.mode} --rate {bi.rate} "
                f"--span {bi.span[0]} {bi.span[1]} --seed {bi.seed} --seq-len {seq_len}")
        return None
    if done:
        raise DataError(f"{shards.path} holds Bi-Induct-rewritten shards ({done['mode']}, rate {done['rate']}) "
                        f"but data.bi_induct is mode={bi.mode}, apply={bi.apply}: point data.path at the "
                        f"natural shards, or set data.bi_induct to match with apply=prep")
    if bi.mode == "none":
        return None
    if bi.anneal == "linear" and not max_steps:
        raise DataError("data.bi_induct.anneal=linear needs max_steps (the schedule it anneals over)")
    sep = shards.require_sep()
    try:
        check_args(bi.mode, bi.rate, list(bi.span), sep, seq_len)
    except ValueError as e:
        raise DataError(f"data.bi_induct with data.seq_len={seq_len}: {e}") from None
    return OmegaConf.to_object(bi)  # a plain BiInductConfig: read once per sample


def eval_windows(shards: TokenShards, seq_len: int, n: int) -> torch.Tensor:
    """The first n windows of a held-out split in order, LongTensor[n, seq_len + 1] (n <= 0 or more
    than there are: all). Never rewritten."""
    total = shards.num_windows(seq_len)
    n = total if n <= 0 or n > total else n
    tokens = torch.from_numpy(shards.slice(0, n * seq_len + 1).astype(np.int64))
    return tokens.unfold(0, seq_len + 1, seq_len).contiguous()


def rank_batches(windows: torch.Tensor, micro_batch_size: int, rank: int, world_size: int):
    """This rank's share of `windows` as (batch, weight) pairs: round r gives rank k the windows
    [(r*W + k)*m, (r*W + k + 1)*m). Every rank yields the same number of batches (collectives stay
    in step); a rank whose share has run out gets windows[:1] with weight 0."""
    per_round = micro_batch_size * world_size
    for start in range(0, len(windows), per_round):
        batch = windows[start + rank * micro_batch_size:start + (rank + 1) * micro_batch_size]
        yield (batch, 1.0) if len(batch) else (windows[:1], 0.0)
