"""Building blocks shared by the mixers: RMSNorm, SwiGLU MLP, rotary embedding, short causal conv,
L2 normalization and the gated per-head output norm of the linear mixers."""
import torch
import torch.nn.functional as F
from torch import nn

from llm.model.roles import set_role
from llm.ops.utils import doc_begin


class _RMSNormFunction(torch.autograd.Function):
    """(x * rstd in fp32, cast to x's dtype) * weight, rstd = rsqrt(mean(x^2) + eps), with a
    hand-written backward: in eager mode autograd would replay the forward's ops one by one and
    torch's own rms_norm backward is composite on CPU (each ~4x LayerNorm's fused kernel). Fewer
    passes over [N, C]: the sum of squares is one fused reduction (vector_norm), and the
    backward's row and column sums are matrix-vector products over the one product grad * x."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        normed = (xf * rstd).type_as(x)
        ctx.save_for_backward(x, rstd, weight)
        return normed.mul_(weight) if normed.dtype == torch.result_type(normed, weight) else normed * weight

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        C = x.shape[-1]
        xf, gf, wf = x.float().flatten(0, -2), grad.float().flatten(0, -2), weight.float()
        rstd = rstd.flatten(0, -2)
        gx = gf * xf
        grad_weight = (rstd.t() @ gx).view_as(weight).type_as(weight)  # sum over rows of grad * normed
        # d/dx of x * rstd: rstd * (gw - x * rstd^2 * mean(gw * x)), gw = grad * weight
        coef = (gx @ wf)[:, None].mul_(rstd.pow(3)).div_(C)
        grad_x = (gf * wf).mul_(rstd).addcmul_(xf, coef, value=-1)
        return grad_x.view(x.shape).type_as(x), grad_weight, None


class RMSNorm(nn.Module):
    """x / rms(x) normalized in fp32 and cast back to x's dtype, then times the weight (so a bf16
    input is rounded before the weight multiplies it)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = set_role(nn.Parameter(torch.ones(dim)), "no_decay")

    def forward(self, x):
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)  # into the residual stream (GPT's init)
        set_role(self, "mlp")

    def forward(self, x):
        # two matmuls on the weight's halves (contiguous rows) rather than halves of one output:
        # the same values, contiguous for the elementwise ops, and no concatenation in backward
        w_gate, w_up = self.gate_up.weight.chunk(2, dim=0)
        return self.down(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up))


class Rotary(nn.Module):
    """Rotary position embedding on [B, T, H, D] tensors, positions given explicitly.

    The cos / sin table of positions 0..n-1 is computed once (per device and dtype of `inv_freq`)
    and regrown only for a longer sequence, not on every call: each entry is the same elementwise
    cos(pos * inv_freq) however long the table, so the result is bit-identical."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._tables = {}  # (device, dtype) -> (cos, sin) [n, D/2]; a cache, not state

    def table(self, end: int):
        """(cos, sin) [end', D/2] with end' >= end."""
        if torch.compiler.is_compiling():  # in a graph the table is folded in; a dict would add guards
            return self._cos_sin(end)
        key = (self.inv_freq.device, self.inv_freq.dtype)
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < end:
            with torch.no_grad(), torch.inference_mode(False):  # usable by autograd later
                cached = self._tables[key] = self._cos_sin(end)
        return cached

    def _cos_sin(self, end: int):
        freqs = torch.outer(torch.arange(end, device=self.inv_freq.device, dtype=torch.float32), self.inv_freq)
        return freqs.cos(), freqs.sin()

    def forward(self, x, start: int = 0):
        T = x.shape[1]
        cos, sin = (t[start:start + T].to(x.device)[None, :, None, :] for t in self.table(start + T))
        return _RotateFunction.apply(x, cos, sin)


def rotate(x, cos, sin, sign: int = 1):
    """x [..., D] with halves (x1, x2) rotated by sign * angle: (x1 cos - x2 sin, x2 cos + x1 sin)
    for sign 1. Written into one output, two passes over each half (no concatenation)."""
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty_like(x)
    out1, out2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin, value=sign)
    return out


class _RotateFunction(torch.autograd.Function):
    """Rotary in fp32, cast back to x's dtype; its gradient is the rotation by the opposite angle
    (a rotation's transpose), so backward is the forward's two passes, not autograd's replay."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x.float(), cos, sin).type_as(x)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate(grad.float(), cos, sin, sign=-1).type_as(grad), None, None


class ShortConv(nn.Module):
    """Depthwise causal conv over time on [B, T, C]; the cache is the last (kernel - 1) inputs."""

    def __init__(self, channels: int, kernel_size: int = 4, activation: bool = True):
        super().__init__()
        self.kernel_size, self.activation = kernel_size, activation
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)
        set_role(self.conv.weight, "mixer_other")

    def init_cache(self, batch_size: int):
        w = self.conv.weight
        return w.new_zeros(batch_size, self.kernel_size - 1, w.shape[0])

    def forward(self, x, cache=None, doc_start=None):
        """x [B, T, C] -> (y [B, T, C], new cache). cache None means zeros before position 0;
        doc_start [B, T] (bool) hides everything before a document's start from its outputs."""
        if cache is None:
            cache = self.init_cache(x.shape[0]).to(x.dtype)
        xx = torch.cat([cache, x], dim=1)  # [B, K-1+T, C]
        if doc_start is None:
            y = F.conv1d(xx.transpose(1, 2), self.conv.weight, groups=self.conv.weight.shape[0]).transpose(1, 2)
        else:
            y, xx = self._conv_documents(xx, doc_start)
        y = F.silu(y) if self.activation else y
        return y, xx[:, xx.shape[1] - (self.kernel_size - 1):]

    def _conv_documents(self, xx, doc_start):
        """The conv with each output's window cut at its document's start, and xx with the inputs
        before the last start zeroed (the cache then holds nothing of an earlier document)."""
        K, T = self.kernel_size, doc_start.shape[1]
        pos = torch.arange(K - 1 + T, device=xx.device)
        begin = doc_begin(F.pad(doc_start, (K - 1, 0)))[:, K - 1:]  # [B, T], in xx's positions
        windows = xx.unfold(1, K, 1)  # [B, T, C, K]: output t reads xx[t .. t + K - 1]
        seen = (pos[:T, None] + torch.arange(K, device=xx.device) >= begin[..., None]).to(xx.dtype)
        y = torch.einsum("btck,btk,ck->btc", windows, seen, self.conv.weight[:, 0])
        return y, xx * (pos >= begin[:, -1:]).to(xx.dtype)[..., None]


def l2norm(x, eps: float = 1e-6):
    """x / |x| over the last dim, in fp32 (fla's eps placement)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).type_as(x)


class OutputNorm(nn.Module):
    """Per-head RMSNorm of a mixer's output [B, T, H, V] -> [B, T, H * V], times SiLU(W_g x) of the
    mixer input x where `use_gate` (fla's FusedRMSNormGated)."""

    def __init__(self, spec, n_heads: int, head_v: int, use_gate: bool):
        super().__init__()
        self.norm = RMSNorm(head_v, spec.norm_eps)
        self.g_proj = (set_role(nn.Linear(spec.d_model, n_heads * head_v, bias=False), "mixer_other")
                       if use_gate else None)

    def forward(self, o, x):
        o = self.norm(o)
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(x)).view_as(o)
        return o.flatten(2)
