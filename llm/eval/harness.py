"""lm-evaluation-harness adapter, registered as model type `llm`.

From lm-eval's own CLI (this module registers the model, then runs lm-eval's argument parser):

    python -m llm.eval.harness run --model llm --model_args run_dir=RUN_OR_EXPORT_DIR \
        --tasks lambada_openai,hellaswag --device cpu --batch_size auto

`LLMAdapter(run_dir=...)` loads a run's newest checkpoint (or an export directory) and tokenizer;
once this module is imported, lm-eval also builds it by name (`simple_evaluate(model="llm",
model_args="run_dir=...")`). `LLMAdapter(model=..., tokenizer=..., max_length=...)` wraps objects
in memory. The CLI's --device and --batch_size (an integer, `auto` or `auto:N`) are accepted;
model_args win where both give one. Inputs longer than `max_length` (default: the run's
data.seq_len, the length it was trained on) are truncated from the left, with a warning that
counts them. Log-likelihoods come from batched, right-padded parallel forwards (every mixer is
causal, so padding never reaches a scored position); generation is greedy through
`llm.generate.generate` (the caches of init_cache / forward_step), batching prompts of equal length.
"""
import logging
from collections import defaultdict

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llm.eval import decode_continuation, load_run, padded_logits, split_encode
from llm.generate import generate

log = logging.getLogger(__name__)


DEFAULT_BATCH = 16
AUTO_MAX_BATCH = 64


def pick_device(requested) -> torch.device:
    """The device asked for, or CPU (with a warning) where it asks for CUDA on a machine without:
    lm-eval's CLI passes `cuda:0` unless told otherwise."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("llm adapter: device %s requested but CUDA is not available; using cpu", requested)
        return torch.device("cpu")
    return device


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@register_model("llm")
class LLMAdapter(LM):
    def __init__(self, run_dir=None, tag=None, model=None, tokenizer=None, max_length=None,
                 batch_size=DEFAULT_BATCH, device=None, max_batch_size=None):
        super().__init__()
        if model is None:
            if run_dir is None:
                raise ValueError("llm adapter: give run_dir=RUN_DIR, or a model and a tokenizer")
            model, cfg, run_tokenizer, _ = load_run(run_dir, tag)
            tokenizer = tokenizer or run_tokenizer
            max_length = max_length or cfg.data.seq_len
        if tokenizer is None or max_length is None:
            raise ValueError("llm adapter: a model given directly needs tokenizer= and max_length=")
        auto = str(batch_size).startswith("auto")
        if not auto and (not str(batch_size).isdigit() or int(batch_size) < 1):
            raise ValueError(f"llm adapter: batch_size must be a positive integer, auto or auto:N, got {batch_size!r}")
        self._device = pick_device(device)
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.batch_size = self.auto_batch_size(int(max_batch_size or AUTO_MAX_BATCH)) if auto else int(batch_size)
        self.truncated = 0  # requests cut from the left to max_length, for the warning
        # Documents are joined by EOS in the training shards, so EOS is what precedes a document.
        self.prefix_id = tokenizer.eos_id

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        """lm-eval's CLI passes its --batch_size / --device / --max_batch_size (defaults included)
        beside model_args; model_args win instead of clashing ("got multiple values")."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    def auto_batch_size(self, largest: int) -> int:
        """`--batch_size auto`: on CUDA the largest power of two up to `largest` whose full-length
        forward fits in memory; elsewhere the default (memory is not the limit there)."""
        if self._device.type != "cuda":
            log.info("llm adapter: batch_size auto on %s -> %d", self._device, DEFAULT_BATCH)
            return DEFAULT_BATCH
        size = 1 << (max(1, largest).bit_length() - 1)
        while size > 1:
            try:
                padded_logits(self.model, [[0] * (self.max_length + 1)] * size).log_softmax(-1)
                break
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                size //= 2
        log.info("llm adapter: batch_size auto -> %d", size)
        return size

    def warn_truncated(self, n_requests: int) -> None:
        if self.truncated:
            log.warning("llm adapter: %d of %d requests were longer than max_length=%d and were truncated "
                        "from the left", self.truncated, n_requests, self.max_length)
            self.truncated = 0

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "path", type(self.tokenizer).__name__)

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log-prob of the continuation, whether greedy decoding yields it) for each
        (context ids, continuation ids); longest first, so each batch has little padding."""
        results = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        self.truncated += sum(len(c) + len(x) > self.max_length + 1 for c, x in pairs)
        for batch in _batches(order, self.batch_size):
            seqs = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):] for i in batch]
            logprobs = padded_logits(self.model, seqs).log_softmax(-1).cpu()
            for r, i in enumerate(batch):
                n = min(len(pairs[i][1]), len(seqs[r]) - 1)  # a continuation longer than the window is clipped
                lp = logprobs[r, len(seqs[r]) - 1 - n:len(seqs[r]) - 1]
                target = torch.tensor(seqs[r][-n:])
                results[i] = (lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = []
        for req in requests:
            ctx, cont = split_encode(self.tokenizer, *req.args)
            pairs.append((ctx or [self.prefix_id], cont))
        results = self.score(pairs)
        self.warn_truncated(len(requests))
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        windows, owner = [], []
        for i, req in enumerate(requests):
            ids = self.tokenizer.encode(req.args[0])
            for w in get_rolling_token_windows(ids, self.prefix_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self.score(windows)):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False):
        groups = defaultdict(list)  # equal prompt lengths and settings share a batched cache
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") and kwargs.get("temperature", 0) > 0:
                log.warning("llm adapter: sampling requested (%s); decoding greedily", kwargs)
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            ids = self.tokenizer.encode(context) or [self.prefix_id]
            keep = max(1, self.max_length - max_new)  # prompt + generation within max_length
            self.truncated += len(ids) > keep
            ids = ids[-keep:]
            groups[(len(ids), max_new, until)].append((i, ids))
        self.warn_truncated(len(requests))
        out = [None] * len(requests)
        for (_, max_new, until), members in groups.items():
            for batch in _batches(members, self.batch_size):
                texts = self.greedy([ids for _, ids in batch], max_new, until)
                for (i, _), text in zip(batch, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def greedy(self, prompts: list[list[int]], max_new: int, until=()) -> list[str]:
        """Greedy continuations of equal-length prompts, each cut before its first stop string
        (or EOS)."""
        def text(row, new):
            return decode_continuation(self.tokenizer, prompts[row][-1:], new)

        def stopped(row, new):
            return any(u in text(row, new) for u in until)

        new = generate(self.model, prompts, max_new, temperature=0, eos_id=self.tokenizer.eos_id,
                       stop=stopped)
        texts = [text(row, n) for row, n in enumerate(new)]
        return [min((t.split(u)[0] for u in until), key=len, default=t) for t in texts]


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
