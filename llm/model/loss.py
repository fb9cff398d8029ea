"""Next-token cross-entropy (plus z-loss) over the output head, a chunk of tokens at a time.

`chunked_lm_loss` equals `mean CE + z_loss * mean logsumexp^2` of the full fp32 logits, but never
holds more than one chunk's logits: with gradients wanted it computes the gradients of the head's
input and weight chunk by chunk during the forward pass (the logits' gradient is
softmax * (1 + 2 z lse) - onehot, over N tokens) and backward only scales them, so the logits are
neither kept for backward nor recomputed.
"""
import torch

IGNORE = -100  # a target without a label, as torch's cross_entropy


def _chunks(hidden, weight, targets, z_loss: float, chunk: int, with_grad: bool):
    """(loss, ce, grad_hidden, grad_weight, n) of hidden [N, C], weight [V, C], targets [N]: n is
    the number of labelled targets (a tensor: nothing here waits for the device), the gradients
    are those of n * loss (None unless with_grad; backward divides). Unlabelled rows are computed
    and then masked on the [*, C] sides, not removed (which would need their count on the host).
    Two passes over each chunk's [m, V] logits besides the matmuls (log_softmax, exp in place)."""
    labelled = targets != IGNORE
    n, safe_targets = labelled.sum(), targets.clamp_min(0)
    ce_sum = z_sum = hidden.new_zeros((), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if with_grad else None
    grad_weight = None
    for s in range(0, hidden.shape[0], chunk):
        h, t, keep = hidden[s:s + chunk], safe_targets[s:s + chunk], labelled[s:s + chunk, None]
        rows = torch.arange(len(t), device=t.device)
        logits = (h @ weight.t()).float()
        logp = torch.log_softmax(logits, dim=-1)
        target_logp = logp[rows, t]
        lse = logits[rows, t] - target_logp  # logsumexp of each row
        counted = keep.float()[:, 0]  # 1 for a labelled row, 0 else
        ce_sum = ce_sum - target_logp @ counted
        z_sum = z_sum + lse.pow(2) @ counted
        if with_grad:
            g = logp.exp_()  # softmax
            if z_loss:
                g *= (1 + 2 * z_loss * lse)[:, None]
            g[rows, t] -= 1
            g = g.to(h.dtype)
            torch.mm(g, weight, out=grad_hidden[s:s + chunk]).mul_(keep)
            part = g.t() @ (h * keep)
            grad_weight = part.float() if grad_weight is None else grad_weight.add_(part)
    ce = ce_sum / n
    return ce + z_loss * z_sum / n, ce, grad_hidden, grad_weight, n


class _ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, z_loss, chunk):
        loss, ce, grad_hidden, grad_weight, n = _chunks(hidden, weight, targets, z_loss, chunk, with_grad=True)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype), n)
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        grad_hidden, grad_weight, n = ctx.saved_tensors
        scale = grad_loss / n
        return grad_hidden * scale.to(grad_hidden.dtype), grad_weight * scale.to(grad_weight.dtype), None, None, None


def chunked_lm_loss(hidden, head_weight, targets, *, z_loss: float = 0.0, chunk: int = 1024):
    """(loss to optimize, cross-entropy) of the logits hidden @ head_weight^T, for hidden [B, T, C]
    (already normed), head_weight [V, C] and targets [B, T]: means over all B * T tokens, logits in
    fp32, `chunk` tokens at a time; targets of -100 (cross_entropy's ignore_index) are left out of
    both means. `ce` is for logging: it carries no gradient (the loss does)."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets: expected shape {list(hidden.shape[:-1])}, got {list(targets.shape)}")
    if chunk <= 0:
        raise ValueError(f"chunk: expected a positive number of tokens, got {chunk}")
    hidden, targets = hidden.flatten(0, -2), targets.flatten()
    if torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad):
        return _ChunkedLMLoss.apply(hidden, head_weight, targets, float(z_loss), chunk)
    loss, ce, _, _, _ = _chunks(hidden, head_weight, targets, z_loss, chunk, with_grad=False)
    return loss, ce
