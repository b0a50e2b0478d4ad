"""Batch Renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models", Algorithm 1): the small-batch baseline "BRN" of mabn Tables 3 and 5 (momentum 0.98).

Training, with the minibatch mean μ_B and σ_B = sqrt(σ²_B + ε) (biased variance over N, H, W) and the moving
statistics μ, σ = sqrt(running_var + ε) *before* this step's update:

    r = stop_gradient(clip(σ_B / σ, 1/r_max, r_max)),   d = stop_gradient(clip((μ_B − μ) / σ, −d_max, d_max))
    y = γ·((x − μ_B)/σ_B · r + d) + β

then μ and σ² move towards μ_B and the unbiased σ²_B by ``momentum`` (torch's convention: the new value's
weight; mabn Table 3's "momentum 0.98" of BRN is the old value's, i.e. ``momentum`` 0.02). With r = 1, d = 0 this
is BN's training forward; inference is BN's: y = γ(x − μ)/σ + β (a fixed affine: PreciseBN, FrozenBN, folding
work as for BN). Ioffe keeps a moving average of σ; here, as torch's BN, of σ² (running_var), so checkpoints are
BN's.

Schedule of r_max and d_max (Ioffe §4: r_max = 1, d_max = 0 for the first 5 000 steps, then relaxed gradually
to r_max = 3 by 40 000 steps and d_max = 5 by 25 000 steps; the MABN paper states no other): linear in the
layer's ``num_batches_tracked`` from (1, 0) at ``warmup_iters`` to (``r_max``, ``d_max``) at ``r_max_iters`` /
``d_max_iters``.
"""
from typing import Tuple

import torch

from .base import D2NormBatchNorm2d, autocast_off, empty_passthrough, skip_nonfinite_stats, stat_dtype
from .registry import register_norm
from ..options import Int, Number, Option

__all__ = ["BatchRenorm2d", "brn_limits"]


def brn_limits(step: int, r_max: float, d_max: float, warmup_iters: int, r_max_iters: int,
               d_max_iters: int) -> Tuple[float, float]:
    """(r_max, d_max) at training step ``step`` (0-based): (1, 0) before ``warmup_iters``, then linear up to the
    final values at ``r_max_iters`` / ``d_max_iters`` (Ioffe 2017 §4)."""

    def ramp(lo, hi, end):
        if step < warmup_iters:
            return lo
        if end <= warmup_iters or step >= end:
            return hi
        return lo + (hi - lo) * (step - warmup_iters) / (end - warmup_iters)

    return ramp(1.0, r_max, r_max_iters), ramp(0.0, d_max, d_max_iters)


@register_norm("BRN")
class BatchRenorm2d(D2NormBatchNorm2d):
    """Batch Renormalization (module docstring). Options: ``r_max`` ≥ 1, ``d_max`` ≥ 0, ``warmup_iters``,
    ``r_max_iters``, ``d_max_iters`` (steps of this layer, ``num_batches_tracked``), ``momentum``, ``eps``."""

    CFG_NODE = "BRN"
    batch_statistics = None  # built for small batches (renormalized toward the moving averages)
    CFG_DOC = 'BRN, Batch Renormalization (Ioffe 2017, §4): the small-batch baseline of mabn Tables 3, 5; eps from D2NORM.BN'
    OPTIONS = (
        Option("R_MAX", 3.0, "r = clip(sigma_B / sigma, 1/R_MAX, R_MAX) once relaxed (Ioffe §4: 3).", arg="r_max",
               check=Number(1.0, float("inf"))),
        Option("D_MAX", 5.0, "d = clip((mu_B - mu) / sigma, -D_MAX, D_MAX) once relaxed (Ioffe §4: 5).",
               arg="d_max", check=Number(0.0, float("inf"))),
        Option("WARMUP_ITERS", 5000, "Layer steps with r = 1, d = 0 (BN) before the relaxation (Ioffe §4: 5k).",
               arg="warmup_iters", check=Int(0)),
        Option("R_MAX_ITERS", 40000, "Layer step at which r_max reaches R_MAX (linear from WARMUP_ITERS; Ioffe: "
               "40k).", arg="r_max_iters", check=Int(0)),
        Option("D_MAX_ITERS", 25000, "Layer step at which d_max reaches D_MAX (Ioffe: 25k).", arg="d_max_iters",
               check=Int(0)),
        Option("MOMENTUM", 0.02, "EMA momentum in torch's convention (new value's weight): mabn's 'momentum 0.98' "
               "of BRN (Tables 3, 5) = 0.02.", arg="momentum", check=Number(0.0, 1.0, low_open=True)),
    )

    def __init__(self, num_features: int, r_max: float, d_max: float, warmup_iters: int, r_max_iters: int,
                 d_max_iters: int, momentum: float, eps: float, **kwargs):
        super().__init__(num_features, eps=eps, momentum=momentum, **kwargs)
        if not self.track_running_stats:
            raise ValueError("BRN: track_running_stats must be True (r and d need the moving statistics)")
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_iters, self.r_max_iters, self.d_max_iters = int(warmup_iters), int(r_max_iters), int(d_max_iters)
        # host copy of num_batches_tracked for the schedule: no device read per forward; read once after a
        # checkpoint load (a new layer's counter is 0)
        self._step = 0
        self._step_synced = True

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, warmup_iters={self.warmup_iters}, "
                f"r_max_iters={self.r_max_iters}, d_max_iters={self.d_max_iters}")

    def current_limits(self) -> Tuple[float, float]:
        """(r_max, d_max) for the next training step."""
        if not self._step_synced:  # once after a checkpoint load: one read of the counter
            self._step = int(self.num_batches_tracked)
            self._step_synced = True
        return brn_limits(self._step, self.r_max, self.d_max, self.warmup_iters, self.r_max_iters,
                          self.d_max_iters)

    def _load_from_state_dict(self, *args, **kwargs):
        self._step_synced = False
        return super()._load_from_state_dict(*args, **kwargs)

    @skip_nonfinite_stats
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"BatchRenorm2d expects NCHW input, got shape {tuple(x.shape)}")
        if not self.training:
            return super().forward(x)  # BN inference with the moving statistics
        if x.numel() == 0:
            return empty_passthrough(x, self.weight, self.bias)
        n = x.numel() // x.shape[1]
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        r_max, d_max = self.current_limits()
        sd = stat_dtype(x.dtype)
        with autocast_off(x.device):
            xs = x.to(sd)
            var_b, mu_b = torch.var_mean(xs, dim=(0, 2, 3), correction=0)
            sigma_b = torch.sqrt(var_b + self.eps)
            with torch.no_grad():
                sigma = torch.sqrt(self.running_var.to(sd) + self.eps)
                r = (sigma_b / sigma).clamp(1.0 / r_max, r_max)
                d = ((mu_b - self.running_mean.to(sd)) / sigma).clamp(-d_max, d_max)
            scale = r / sigma_b
            shift = d - mu_b * scale
            if self.affine:
                w = self.weight.to(sd)
                scale, shift = scale * w, shift * w + self.bias.to(sd)
            y = xs * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(mu_b.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = var_b.detach() * (n / (n - 1))
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
                self.num_batches_tracked.add_(1)
        self._step += 1
        return y.to(x.dtype)
