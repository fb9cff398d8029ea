"""PD-SSM (Terzic et al.): a complex SSM whose transition P_t D_t is column-one-hot times diagonal.

Per head: h_t = P_t D_t h_{t-1} + B x_t, y_t = readout([Re h_t, Im h_t]) + skip * x_t, then an
output projection. D_t = sigmoid(MLP(x_t)) * exp(2 pi i sigmoid(MLP(x_t))) has modulus < 1, so the
recurrence is BIBO-stable. P_t is chosen per step (`selection`):

- dense: the columns of sum_m softmax(W_s x_t)_m A_m (a dictionary of M N x N matrices) go through
  a softmax over rows; the forward uses each column's argmax, the backward the softmax (straight-
  through estimator). One layer of N states can follow any N-state automaton this way.
- discrete (Flash PD-SSM's variant): one of M learned column-one-hot matrices (argmax of
  colsoftmax(A_m)) is picked per step by argmax of softmax(W_s x_t), straight-through on both the
  pick and the matrix; the forward is O(N) per step after an O(M N^2) pass over the dictionary.
- identity: P_t = I, the diagonal-only ablation.

Length generalization on state tracking wants `state_norm: true, phase: false, magnitude_init:
0.99` (the defaults keep the paper's mixer): a trained model's state grows with the accumulated
inputs and shrinks by prod |d_t|, so an unnormalized readout meets scales at test lengths it never
saw; an automaton run on learned (continuous) phases drifts by the phase error at every step, while
P_t is discrete; and a token that must be kept to the end (even pairs: the first) fades as
prod |d_t|. Diagnosis and numbers: docs/reproductions.md.

The scan runs on the integer `perm` (llm.ops.pd_ssm); the straight-through gradient of a dense P_t
is (adjoint of h_t)(D_t h_{t-1})^T, which we obtain by adding the zero-valued term
(P~_t - P~_t.detach()) (D_t h_{t-1}) to the scan input, with h from a first, no-grad scan.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llm.model.mixers.base import Mixer, register_mixer
from llm.model.roles import set_role
from llm.ops.pd_ssm import pd_matvec, pd_scan

SELECTIONS = ("dense", "discrete", "identity")


def _gelu_mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


def _real_matvec(a, z):
    """a^T z for real a [..., j, i] and complex z [..., j], without a complex copy of a."""
    return torch.view_as_complex((a.transpose(-1, -2) @ torch.view_as_real(z)).contiguous())


@register_mixer("pdssm")
class PDSSM(Mixer):
    @dataclass(frozen=True)
    class Args:
        state_size: int = 32  # N (complex) states per head
        dict_size: int = 8  # M dictionary matrices per head
        heads: Optional[int] = None  # None: model.n_heads
        selection: str = "dense"  # dense | discrete | identity (diagonal-only ablation)
        chunk_size: int = 64  # scan chunk length
        # Readout of each head's state divided by its RMS: invariant to the state's overall scale,
        # which the |d| < 1 decay shrinks and input accumulation grows with the sequence length.
        state_norm: bool = False
        # |d| at init. 0.95 is a memory of ~20 steps; an automaton's signal is the start state times
        # prod |d_t|, which must survive the longest test length: state tracking wants 0.99 (0.999
        # lets the accumulated input grow ~t, and learns worse).
        magnitude_init: float = 0.95
        # Learned phases of d. A learned phase is continuous: an automaton run on rotations drifts by
        # its error at every step. False: d is real and positive, so state changes come from the
        # discrete P_t alone.
        phase: bool = True

        def check(self, model_cfg):
            if self.selection not in SELECTIONS:
                raise ValueError(f"selection: got {self.selection!r}, expected one of {', '.join(SELECTIONS)}")
            for key in ("state_size", "dict_size", "heads"):
                value = getattr(self, key)
                if value is not None and value < 1:
                    raise ValueError(f"{key}: expected a positive integer, got {value}")
            if not 0 < self.magnitude_init < 1:
                raise ValueError(f"magnitude_init: expected a value in (0, 1), got {self.magnitude_init}")
            if self.chunk_size < 2:
                raise ValueError(f"chunk_size: expected >= 2, got {self.chunk_size}")

    def __init__(self, spec, layer_idx, args):
        super().__init__(spec, layer_idx, args)
        d = spec.d_model
        H, N, M = args.heads or spec.n_heads, args.state_size, args.dict_size
        self.H, self.N, self.M = H, N, M
        # B x and the readout carry content, like attention's v and o projections.
        self.in_proj = set_role(nn.Linear(d, 2 * H * N, bias=False), "vo")  # real, imaginary parts
        self.magnitude = set_role(_gelu_mlp(d, 2 * H * N, H * N), "mixer_other")
        if args.phase:
            self.phase = set_role(_gelu_mlp(d, 2 * H * N, H * N), "mixer_other")
        if args.selection != "identity":
            self.select = set_role(nn.Linear(d, H * M, bias=False), "mixer_other")
            # [H, M, column j, row i]: each column's logits over the row its 1 goes to
            self.dictionary = set_role(nn.Parameter(torch.randn(H, M, N, N) / math.sqrt(N)), "mixer_other")
        # Every sequence starts from state 0 of each head's automaton (one-hot e_0, as in the paper's
        # reference): from h = 0 a linear recurrence could not tell the first token from the others.
        self.register_buffer("start", F.one_hot(torch.zeros(H, dtype=torch.long), N).float(), persistent=False)
        self.readout = set_role(nn.Linear(2 * H * N, d, bias=False), "vo")
        self.skip = set_role(nn.Parameter(torch.ones(d)), "no_decay")
        self.o_proj = set_role(nn.Linear(d, d, bias=False), "vo")

    @property
    def n_heads(self):
        return self.H

    def reset_parameters(self):
        """The magnitude MLP's output bias gives |d| = magnitude_init at init (the model zeroes biases)."""
        m = self.args.magnitude_init
        nn.init.constant_(self.magnitude[-1].bias, math.log(m / (1 - m)))

    def coefficients(self, x):
        """Diagonal d_t and input u_t = B x_t, complex [B, T, H, N] (float32 whatever x's dtype)."""
        shape = (*x.shape[:2], self.H, self.N)
        magnitude = torch.sigmoid(self.magnitude(x).float())
        phase = 2 * math.pi * torch.sigmoid(self.phase(x).float()) if self.args.phase else 0 * magnitude
        re, im = self.in_proj(x).float().chunk(2, dim=-1)
        return torch.polar(magnitude, phase).view(shape), torch.complex(re, im).view(shape)

    def transitions(self, x):
        """perm [B, T, H, N] of the hard P_t, and ste(z) -> (P~_t - P~_t.detach()) z: zero, with the
        straight-through gradient of the soft P~_t (None where P_t has no parameters)."""
        B, T, _ = x.shape
        H, N, M = self.H, self.N, self.M
        if self.args.selection == "identity":
            return torch.arange(N, device=x.device).expand(B, T, H, N), None
        w = self.select(x).float().view(B, T, H, M).softmax(-1)
        if self.args.selection == "dense":
            soft = torch.einsum("bthm,hmji->bthji", w, self.dictionary.float()).softmax(-1)
            return soft.argmax(-1), lambda z: _real_matvec(soft - soft.detach(), z)
        soft = self.dictionary.float().softmax(-1)  # [H, M, N, N]
        hard = soft.argmax(-1)  # [H, M, N]: the M column-one-hot matrices
        k = w.argmax(-1)  # [B, T, H]: the pick

        def ste(z):
            # d(P_t z)/dw_m = P_m z (every candidate), d(P_t z)/dsoft_m = [m = k_t] z^T
            candidates = pd_matvec(hard.expand(B, T, H, M, N), z[:, :, :, None].expand(B, T, H, M, N))
            picked_z = F.one_hot(k, M).to(z.dtype)[..., None] * z[..., None, :]  # [B, T, H, M, N]
            return (torch.einsum("bthm,bthmi->bthi", (w - w.detach()).to(z.dtype), candidates)
                    + torch.einsum("hmji,bthmj->bthi", (soft - soft.detach()).to(z.dtype), picked_z))

        return hard[torch.arange(H, device=x.device), k], ste

    def forward(self, x, doc_start=None):
        return self._run(x, self.init_cache(x.shape[0])["h"], doc_start)[0]

    def init_cache(self, batch_size):
        return {"h": self.start.to(torch.complex64).expand(batch_size, -1, -1).clone()}

    def forward_step(self, x, cache, doc_start=None):
        y, h = self._run(x, cache["h"], doc_start)
        return y, {"h": h}

    def _run(self, x, h0, doc_start):
        perm, ste = self.transitions(x)
        d, u = self.coefficients(x)
        scan = dict(initial_state=h0, chunk_size=self.args.chunk_size, doc_start=doc_start)
        if doc_start is not None:  # a document restarts from e_0: the scan drops h_{t-1}, u_t gains P_t D_t e_0
            start = self.start.to(u.dtype)
            u = u + torch.where(doc_start[..., None, None], pd_matvec(perm, d * start), 0)
        if ste is not None and torch.is_grad_enabled():
            with torch.no_grad():
                h, _ = pd_scan(perm, d, u, **scan)
            before = torch.cat([h0[:, None], h[:, :-1]], 1)  # h_{t-1}, as step t reads it
            if doc_start is not None:
                before = torch.where(doc_start[..., None, None], start, before)
            u = u + ste(d.detach() * before)
        h, final = pd_scan(perm, d, u, output_final_state=True, **scan)
        return self.output(h, x), final

    def output(self, h, x):
        """h [B, T, H, N] complex -> [B, T, d_model]."""
        state = torch.cat([h.real, h.imag], -1)
        if self.args.state_norm:
            state = F.normalize(state, dim=-1, eps=1e-12) * math.sqrt(state.shape[-1])  # RMS 1
        y = self.readout(state.flatten(2).to(x.dtype)) + self.skip * x
        return self.o_proj(y)

    @classmethod
    def flops_per_token(cls, spec, args, seq_len):
        d, H, N, M = spec.d_model, args.heads or spec.n_heads, args.state_size, args.dict_size
        flops = 2 * d * 2 * H * N  # B
        flops += (2 if args.phase else 1) * 2 * (d * 2 * H * N + 2 * H * N * H * N)  # magnitude (and phase) MLPs
        flops += 8 * H * N  # a complex multiply-add per state (not the scan's log-depth extra work)
        flops += 2 * 2 * H * N * d + 2 * d * d  # readout, output projection
        if args.selection != "identity":
            flops += 2 * d * H * M  # selection logits
        if args.selection == "dense":
            flops += 2 * H * M * N * N  # mixing the M dictionary matrices
        return float(flops)
