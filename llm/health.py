"""Training health: non-finite steps stop the run, loss spikes are logged.

A step is non-finite when this rank's loss or the gradient norm (global: every rank sees the same)
is NaN or infinite. DeepSpeed's ZeRO optimizers skip the update of such a step (its gradients do
not survive the norm check), so the weights are still those of the step before; the run tolerates
train.skip_nonfinite of them (as flame's `skip_nan_inf`), then ends with `Diverged`: no checkpoint
of that state, a non-zero exit. The flag rides on the Stopper's per-step all-reduce, so every rank
decides at the same step with no extra synchronization.

A loss spike is a step whose loss is more than train.spike_zscore standard deviations above the
mean of the previous train.spike_window losses (a z-score over a window, as OLMo-core's stability
monitoring); spikes are logged, not acted on.
"""
import math
import statistics
from collections import deque


class Diverged(RuntimeError):
    """The run stopped at a non-finite loss or gradient norm, without checkpointing that state."""


def is_finite(value) -> bool:
    """False for NaN and +-inf; None (no gradient norm: ZeRO-0) counts as finite."""
    return value is None or math.isfinite(value)


class NonFiniteGuard:
    """Counts the non-finite steps; past train.skip_nonfinite of them, the run has diverged."""

    def __init__(self, allowed: int, engine, log):
        self.allowed, self.engine, self.log, self.steps = allowed, engine, log, []

    def local_flag(self, stats: dict) -> float:
        """1.0 when this rank's step was non-finite (this rank's loss or the gradient norm), else 0.0."""
        return float(not (is_finite(stats["ce"]) and is_finite(self.engine.get_global_grad_norm())))

    def judge(self, step: int, stats: dict):
        """Called on every rank for a step that was non-finite on some rank: None when it may be
        skipped (said so on the console), else the Diverged error that ends the run."""
        self.steps.append(step)
        seen = f"loss {stats['ce']:.4g} on this rank, grad_norm {self.engine.get_global_grad_norm()}"
        if len(self.steps) <= self.allowed:
            skipped = "its update was skipped" if not self.engine.was_step_applied() else "its update was applied"
            self.log.echo(f"step {step}: non-finite {seen}: {skipped} "
                          f"({len(self.steps)} of train.skip_nonfinite={self.allowed})")
            return None
        return Diverged(f"non-finite loss or gradient norm ({seen})"
                        + (f", after skipping steps {self.steps[:-1]}" if self.allowed else ""))


class SpikeDetector:
    """Flags a loss more than `zscore` standard deviations above the mean of the previous `window`
    finite losses (once that many are in); zscore 0 turns it off."""

    def __init__(self, window: int, zscore: float):
        self.history, self.zscore = deque(maxlen=window), zscore

    def observe(self, loss: float):
        """This loss's z-score if it is a spike, else None; it then joins the window (a spike too,
        so a lasting jump in the loss becomes the new normal instead of a spike on every step)."""
        if not math.isfinite(loss):
            return None  # the NonFiniteGuard's business
        z = None
        if self.zscore and len(self.history) == self.history.maxlen:
            mean, std = statistics.fmean(self.history), statistics.pstdev(self.history)
            if std > 0 and (loss - mean) / std > self.zscore:
                z = (loss - mean) / std
        self.history.append(loss)
        return z
