"""What the ops share: the kernel dispatch rule, shape checks, the chunked layout and document
boundaries (`doc_start`, in the chunk forms and as the varlen layout of the kernels)."""
import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)


def kernel_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def kernel_inputs_ok(*tensors) -> bool:
    """Whether GPU kernels can take these inputs: CUDA tensors in half precision. (Tests that run
    the kernels under Triton's CPU interpreter lift this one condition.)"""
    return all(t.is_cuda and t.dtype in _HALF for t in tensors)


def use_kernel(backend: str, module, *tensors) -> bool:
    """Whether to take the fast GPU path for these inputs, through the library `module` (None: the
    path needs no extra library, e.g. SDPA's flash kernel). The one meaning of `model.kernels`:

    "torch": never; "auto": when the inputs are CUDA bf16/fp16 tensors and `module` is installed;
    "fla": always, and a RuntimeError when the inputs or the installation do not allow it.
    """
    inputs_ok = kernel_inputs_ok(*tensors)  # looked up at call time: tests may patch it
    installed = module is None or kernel_available(module)
    if backend == "fla" and not (inputs_ok and installed):
        need = "CUDA bf16/fp16 inputs" if not inputs_ok else f"the {module} package (pip install -e .[gpu])"
        raise RuntimeError(f"model.kernels=fla requires the fast GPU path{f' ({module})' if module else ''}, "
                           f"which needs {need}; use kernels=auto or torch to fall back to the reference")
    return backend != "torch" and inputs_ok and installed


def check_shapes(q, k, v, **per_token):
    """Raise ValueError unless q, k are [B, T, H, K], v is [B, T, H, V] and every per-token tensor
    (None skipped) is [B, T, H]; return (B, T, H, K, V)."""
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k [B, T, H, K] and v [B, T, H, V] with the same B, T, H; got "
                         f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    B, T, H, K = q.shape
    if T == 0:
        raise ValueError("expected at least one token (T >= 1)")
    for name, t in per_token.items():
        if t is not None and t.shape != (B, T, H):
            raise ValueError(f"{name}: expected shape [B, T, H] = {[B, T, H]}, got {list(t.shape)}")
    return B, T, H, K, v.shape[-1]


def check_state(name, t, shape):
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")


def to_chunks(x, chunk_size):
    """[B, T, H, ...] -> fp32 [B, H, N, C, ...], zero-padded at the end to N * C tokens.

    Zero padding is neutral for these recurrences: a zero key writes nothing, g = 0 does not decay."""
    x = x.float().movedim(1, 2)
    pad = -x.shape[2] % chunk_size
    x = F.pad(x, [0, 0] * (x.ndim - 3) + [0, pad])
    return x.unflatten(2, (x.shape[2] // chunk_size, chunk_size))


def check_doc_start(doc_start, B, T):
    """doc_start (None or bool [B, T]: True where a document begins) or a ValueError."""
    if doc_start is not None and (doc_start.dtype != torch.bool or tuple(doc_start.shape) != (B, T)):
        raise ValueError(f"doc_start: expected a bool tensor [B, T] = {[B, T]} (True where a document begins), "
                         f"got {doc_start.dtype} {list(doc_start.shape)}")


def doc_begin(doc_start):
    """The position of the latest document start at or before each position, long [B, T] (0 where
    the row has none up to there): what a position may see begins there."""
    pos = torch.arange(doc_start.shape[1], device=doc_start.device)
    return torch.where(doc_start, pos, 0).cummax(1).values


class ChunkDecays:
    """The decay factors of the chunk forms, from the within-chunk cumulative log-decay G [B, H, N, C]
    of log-decay g [B, T, H] (None: no decay), in the layout of `like` (any chunked [B, H, N, C, ...]
    input):

    within [B, H, N, C, C]  exp(G_i - G_j) for j <= i, 0 above the diagonal: key j as position i reads it
    start  [B, H, N, C]     exp(G_i): the chunk-start state as position i reads it
    end    [B, H, N, C]     exp(G_C - G_j): key j in the chunk-end state
    whole  [B, H, N]        exp(G_C): the chunk-start state in the chunk-end state

    With doc_start [B, T] each factor is 0 where a document start lies after the earlier of its two
    positions, up to the later one: the state is dropped there, not decayed by exp(-inf), which would
    give inf - inf = NaN in exp(G_i - G_j). The exponent of `within` is masked before exp, so no
    large positive number is ever exponentiated; for j <= i it is a sum of log-decays, <= 0 whenever
    g <= 0, so strong decay underflows to 0. start / end / whole are made on first use, so each
    caller keeps its own order of operations (and the rounding of its gradients)."""

    def __init__(self, g, like, doc_start=None):
        C = like.shape[3]
        self.G = G = like.new_zeros(like.shape[:4]) if g is None else to_chunks(g, C).cumsum(-1)
        visible = torch.ones(C, C, dtype=torch.bool, device=G.device).tril()
        # the document index of each position within its chunk [B, 1, N, C]
        self.doc = None if doc_start is None else to_chunks(doc_start[..., None], C).cumsum(-1)
        if self.doc is not None:
            visible = visible & (self.doc[..., :, None] == self.doc[..., None, :])
        self.within = (G[..., :, None] - G[..., None, :]).masked_fill(~visible, float("-inf")).exp()

    def _cut(self, factor, kept):
        return factor if self.doc is None else factor * kept()

    @functools.cached_property
    def start(self):
        return self._cut(self.G.exp(), lambda: self.doc == 0)

    @functools.cached_property
    def end(self):
        return self._cut((self.G[..., -1:] - self.G).exp(), lambda: self.doc == self.doc[..., -1:])

    @functools.cached_property
    def whole(self):
        return self._cut(self.G[..., -1].exp(), lambda: self.doc[..., -1] == 0)


@dataclass
class Segments:
    """A batch cut at its document starts and laid end to end as one row: the variable-length
    layout (`cu_seqlens`, batch size 1) of fla's and flash-attn's kernels. Every row start begins a
    segment too; a row's given initial state goes to its first segment unless the row opens with a
    document start, and its final state is that of its last segment."""
    cu_seqlens: torch.Tensor  # [N + 1] long: segment boundaries in the B * T flattened tokens
    first: torch.Tensor  # [B]: each row's first segment
    last: torch.Tensor  # [B]: each row's last segment
    opens: torch.Tensor  # [B] bool: the row opens with a document start

    @classmethod
    def of(cls, doc_start):
        B, T = doc_start.shape
        starts = doc_start.clone()
        starts[:, 0] = True
        cu_seqlens = F.pad(starts.flatten().nonzero().squeeze(1), (0, 1), value=B * T)
        ends = starts.sum(1).cumsum(0)
        return cls(cu_seqlens, ends - starts.sum(1), ends - 1, doc_start[:, 0])

    @staticmethod
    def flat(x):
        """[B, T, ...] -> [1, B * T, ...] (None stays None)."""
        return None if x is None else x.reshape(1, -1, *x.shape[2:])

    def initial_states(self, state):
        """Per-row [B, ...] -> per-segment [N, ...] initial states (None stays None: zeros)."""
        if state is None:
            return None
        kept = torch.where(self.opens.view(-1, *[1] * (state.ndim - 1)), 0, state)
        return state.new_zeros(len(self.cu_seqlens) - 1, *state.shape[1:]).index_copy(0, self.first, kept)

    def final_states(self, state):
        """Per-segment [N, ...] -> per-row [B, ...] final states (None stays None)."""
        return None if state is None else state[self.last]
