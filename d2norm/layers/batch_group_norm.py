"""Batch-Group Normalization.

four-things §3.4: "expand the grouping mechanism of Group Normalization from being over only channels to being
over both channels and examples — that is, normalization statistics are calculated both *within* groups of
channels of each example and *across* examples in groups within each batch"; combined at inference with
Inference Example Weighing (four-things §3.1, eq 3), as the paper does for every method of §3.4.
"""
import logging
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..stats.adapters import StatsAdapter
from ..moments import batch_moments
from ..options import Int, Number, Option
from ..utils.validation import check_int
from .base import D2NormModule, NotAnAffine, affine_from_stats, check_input_channels, empty_passthrough, skip_nonfinite_stats, stat_dtype
from .ghost_bn import ghost_batch_sizes
from .kernels import channel_affine, example_group_norm, group_moments
from .native import mix_normalize
from .registry import register_norm

__all__ = ["BatchGroupNorm", "example_group_sizes"]

logger = logging.getLogger(__name__)


def example_group_sizes(n: int, example_group_size: int) -> List[int]:
    """Sizes of the contiguous example groups a batch of ``n`` examples is split into (along dim 0).

    Rule: GhostBN's "balanced" split (:func:`d2norm.layers.ghost_bn.ghost_batch_sizes`):
    ``k = ceil(n / example_group_size)`` groups whose sizes differ by at most one, larger ones first. No example
    is dropped and no group exceeds ``example_group_size``; when it divides ``n`` the groups are exactly
    ``example_group_size`` consecutive examples. E.g. n=5, size 2 -> [2, 2, 1]; n=3, size 4 -> [3].
    """
    return ghost_batch_sizes(n, example_group_size, "balanced")


@register_norm("BGN")
class BatchGroupNorm(nn.Module, D2NormModule):
    """Batch-Group Norm (four-things §3.4) with Inference Example Weighing (§3.1, eq 3) at inference.

    Input ``(N, C, *)``; the ``C`` channels are split into ``num_groups`` contiguous channel groups (as
    ``nn.GroupNorm``) and the ``N`` examples into example groups by :func:`example_group_sizes`.

    **Training.** Every element of example group ``e`` and channel group ``g`` is normalized with the mean and
    biased variance over all elements of ``(e, g)`` (its examples x the group's channels x all positions), then
    per-channel affine ``γ_c, β_c`` (eq 1). They are computed from per-example statistics ``μ_i, v_i`` of each
    channel group (one reduction pass over ``x``) with the exact pooled formula
    ``μ_e = mean_i μ_i``, ``σ²_e = mean_i (v_i + (μ_i − μ_e)²)`` (all examples of a batch have the same number of
    elements), which avoids the cancellation of ``E[x²] − μ²``. With one example per group (``example_group_size
    = 1`` or ``N = 1``) this is GroupNorm exactly: ``μ_e = μ_i``, ``σ²_e = v_i + 0``.

    **Moving statistics** (registered buffers, one value per *channel group*, float32 unless the module is cast):

    * ``running_mean`` ``m_x``: EMA of the batch mean ``μ_b = mean_i μ_i`` of each channel group,
    * ``running_var``  ``m_{x²} − m_x²``: the variance about ``m_x`` of the same EMA mixture, so that
      ``m_{x²} = running_var + running_mean²`` is exactly the EMA of the batch second moment ``E[x²]`` that eq 3
      is written in. It is updated in centered form (the variance of a two-component mixture),

          v_b = mean_i (v_i + (μ_i − μ_b)²),   d = μ_b − m_x,
          m_x ← m_x + f·d,   running_var ← (1 − f)·running_var + f·v_b + f(1 − f)·d²,

      which equals ``EMA(E[x²]) − EMA(E[x])²`` in exact arithmetic but never forms that difference: storing
      ``m_{x²}`` itself and subtracting ``m_x²`` at inference cancels catastrophically in float32 when
      |mean| ≫ std (at mean 1e3, std 1 the output was off by 0.8; rethinking A.10 "numerical precision").
      Checkpoints holding the earlier raw buffer ``running_mean_sq`` load (converted in float64, logged).
    * ``num_batches_tracked``: number of updates (used when ``momentum is None``: cumulative average).

    ``f = momentum`` (torch's convention ``r ← (1 − f)·r + f·batch``), once per training forward with ``N > 0``.
    Why the literal EMA of ``E[x²]`` (and not, like ExampleWeightedBN, BN's EMA of unbiased batch variances):
    eq 3 is written in ``m_x`` and ``m_{x²}``, and EMAs of ``E[x]`` and ``E[x²]`` estimate the population moments of each channel group without any bias
    correction, whereas the biased example-group variances used in training underestimate the population
    variance by the spread of the example-group means, by an amount that depends on the group size. (Both
    layers represent eq 3's moments the same way, ``m_{x²} = running_var + m_x²``; ExampleWeightedBN must use
    BN's buffers so that α = 0 is exactly BN and BN checkpoints load.) Per channel group (not per channel)
    because training normalizes per channel group, so ``α = 0`` normalizes at the same granularity as training.
    ``running_var ≥ 0`` holds for every update.

    **Inference** (eq 3), per example ``i`` and channel group ``g``, never touching a buffer::

        μ_i  = α·E[x_i] + (1 − α)·m_x
        σ²_i = α·E[x_i²] + (1 − α)·m_{x²} − μ_i²
             = α·v_i + (1 − α)·running_var + α(1 − α)·(E[x_i] − m_x)²      (same value, no cancellation)

    ``α = 1``: GroupNorm (the example's own statistics only); ``α = 0``: moving statistics only (a fixed affine
    map, no reduction over ``x`` is computed). Each example is normalized independently of the others.

    Normalization is one fused pass ``y = x·scale + shift`` with per-(example, channel) ``scale, shift``.
    fp16/bf16 input: statistics and the normalize step run in float32, output is cast back to the input dtype.
    Zero-size input returns a zero-size output and updates nothing.
    """

    CFG_NODE = "BGN"
    CFG_DOC = 'BGN, Batch-Group Norm: four-things §3.4 (with §3.1 eq 3 at inference)'
    OPTIONS = (
        Option("NUM_CHANNEL_GROUPS", 32, "Channel groups, as GroupNorm's num_groups (§3.4 keeps GN's "
               "hyper-parameter); must divide every C it is used with.", arg="num_groups", check=Int(1)),
        Option("EXAMPLE_GROUP_SIZE", 2, "Examples per example group in training (§3.4 targets B=2); 1 = GroupNorm "
               "exactly. A batch not divisible by it is split into ceil(N / size) contiguous groups of near-equal "
               "size (GhostBN's 'balanced' rule).", arg="example_group_size", check=Int(1)),
        Option("ALPHA", 0.5, "Inference example weight alpha (§3.4 with §3.1 eq 3): 1 = the example's own GroupNorm "
               "statistics, 0 = moving statistics only; tune on a validation set.", arg="alpha", check=Number(0, 1)),
        Option("EPS", 1e-5, "GroupNorm's eps.", arg="eps", check=Number(0, low_open=True)),
        Option("MOMENTUM", 0.1, "EMA momentum (torch convention) of the per-channel-group moving E[x], E[x^2] "
               "(m_x, m_x2 of eq 3); None = cumulative average.", arg="momentum",
               check=Number(0, 1, low_open=True, allow_none=True, note=" (None = cumulative average)")),
    )

    def __init__(
        self,
        num_channels: int,
        num_groups: int,
        example_group_size: int,
        alpha: float,
        eps: float,
        momentum: Optional[float],
        affine: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_int("BGN: num_channels", num_channels, minimum=1)
        if num_channels % num_groups:
            raise ValueError(
                f"BGN: number of channel groups {num_groups} (D2NORM.BGN.NUM_CHANNEL_GROUPS) must divide the "
                f"number of channels C={num_channels}; allowed: a divisor of {num_channels}"
            )
        self.num_channels = int(num_channels)
        self.num_groups = int(num_groups)
        self.example_group_size = int(example_group_size)
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        f = {"device": device, "dtype": dtype}
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_channels, **f))
            self.bias = nn.Parameter(torch.zeros(num_channels, **f))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_groups, **f))
        self.register_buffer("running_var", torch.ones(num_groups, **f))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, num_groups={self.num_groups}, example_group_size={self.example_group_size}, "
            f"alpha={self.alpha}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        )

    @skip_nonfinite_stats
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_channels("BatchGroupNorm", x, self.num_channels)
        if x.numel() == 0:
            return empty_passthrough(x, self.weight, self.bias)  # no statistics, no buffer update

        sd = stat_dtype(x.dtype)
        xs = x.to(sd)
        if not self.training and self.alpha == 0.0:
            # eq 3 with α = 0: moving statistics only, same for every example.
            m, var = self._population_moments(sd)
            return self._normalize(x, m.unsqueeze(0), var.unsqueeze(0), xs)

        if self.training:
            # Per-example statistics of each channel group (N, G), pooled exactly over each example group, one
            # fused moments + normalize with a closed-form backward (layers/kernels.py).
            sizes = example_group_sizes(x.shape[0], self.example_group_size)
            w, b = (self.weight.to(sd), self.bias.to(sd)) if self.affine else (None, None)
            y, mu_i, var_i = example_group_norm(xs, self.num_groups, sizes, w, b, self.eps)
            self._update_moving_stats(mu_i, var_i)
            return y.to(x.dtype)

        if 0.0 < self.alpha:  # eq 3 per (example, channel group) + normalize: CPU, one native pass over x
            m, pop_var = self._population_moments(sd)
            if self.alpha == 1.0:  # GroupNorm: the buffers play no part (not even as 0 · NaN)
                m, pop_var = torch.zeros_like(m), torch.zeros_like(pop_var)
            w, b = (self.weight.to(sd), self.bias.to(sd)) if self.affine else (None, None)
            fused = mix_normalize(xs, m, pop_var, w, b, self.alpha, self.alpha, self.eps, groups=self.num_groups)
            if fused is not None:
                return fused.to(x.dtype)
        # Per-example statistics of each channel group: (N, G). One reduction pass over x.
        mu_i, var_i = group_moments(xs, self.num_groups)
        if self.alpha == 1.0:
            mean, var = mu_i, var_i  # eq 3 with α = 1: the example's own statistics (GroupNorm)
        else:
            a = self.alpha
            m, pop_var = self._population_moments(sd)
            mean = a * mu_i + (1.0 - a) * m
            var = a * var_i + (1.0 - a) * pop_var + (a * (1.0 - a)) * (mu_i - m) ** 2
        return self._normalize(x, mean, var, xs)

    # ---- protocol (layers/base.py) -----------------------------------------------------------------------
    def stats_adapter(self):
        """Population E[x], E[x²] per channel group (:class:`BGNAdapter`)."""
        return BGNAdapter(self)

    def frozen_bn_state(self):
        raise NotAnAffine("BGN: per-channel-group statistics mixed with the example's own (four-things eq 3)")

    def sample_stats_inference_unsupported(self) -> Optional[str]:
        return ("BGN keeps statistics per channel group, not per channel, and already has its own inference "
                "example weight D2NORM.BGN.ALPHA (four-things §3.4 with §3.1 eq 3)")

    def inference_affine(self):
        """α = 0 (eq 3 with the moving statistics only) is a fixed affine map per channel; α > 0 is not."""
        if self.alpha > 0.0:
            raise NotAnAffine(
                f"BGN with alpha={self.alpha}: inference mixes in each sample's own group statistics "
                f"(four-things eq 3)"
            )
        m, var = self._population_moments(self.running_mean.dtype)
        cpg = self.num_channels // self.num_groups
        return affine_from_stats(m.repeat_interleave(cpg), var.repeat_interleave(cpg), self.eps, self.weight, self.bias)

    def _population_moments(self, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """``m_x`` and ``m_{x²} − m_x²`` (= ``running_var``) from the buffers, as ``dtype``."""
        return self.running_mean.to(dtype), self.running_var.to(dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        legacy, key = prefix + "running_mean_sq", prefix + "running_var"
        if legacy in state_dict and key not in state_dict and prefix + "running_mean" in state_dict:
            msq = state_dict.pop(legacy).double()
            m = state_dict[prefix + "running_mean"].double()
            state_dict[key] = (msq - m * m).clamp(min=0).to(self.running_var.dtype)
            logger.info("BatchGroupNorm %r: converted the checkpoint's running_mean_sq (m_{x²}) into running_var "
                        "= m_{x²} − m_x² (float64)", prefix.rstrip("."))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _scale_shift(self, mean, var) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of ``y = x·scale + shift``, (N or 1, C), from (N or 1, G) group statistics."""
        rstd = torch.rsqrt(var + self.eps)
        cpg = self.num_channels // self.num_groups
        # (N, G) -> (N, C) by expand (its backward is a plain sum: deterministic, unlike index-based repeats)
        n = rstd.shape[0]
        rstd = rstd.unsqueeze(-1).expand(n, self.num_groups, cpg).reshape(n, self.num_channels)
        mean = mean.unsqueeze(-1).expand(n, self.num_groups, cpg).reshape(n, self.num_channels)
        scale = rstd * self.weight.to(rstd.dtype) if self.affine else rstd
        shift = -mean * scale
        if self.affine:
            shift = shift + self.bias.to(shift.dtype)
        return scale, shift

    def _normalize(self, x, mean, var, xs=None) -> torch.Tensor:
        """``y = xs·scale + shift`` in one fused op; ``mean``/``var`` are (N or 1, G)."""
        xs = x if xs is None else xs
        scale, shift = self._scale_shift(mean, var)
        if xs.numel() > 0:  # (N or 1, C): one fused pass
            return channel_affine(xs, scale, shift).to(x.dtype)
        view = scale.shape + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.reshape(view), xs, scale.reshape(view)).to(x.dtype)

    @torch.no_grad()
    def _update_moving_stats(self, mu_i: torch.Tensor, var_i: torch.Tensor) -> None:
        """EMA of the batch's ``E[x]`` and (centered) ``E[x²]`` per channel group (class docstring)."""
        batch_mean = mu_i.mean(0)
        batch_var = (var_i + (mu_i - batch_mean) ** 2).mean(0)  # all examples hold equally many elements
        self.num_batches_tracked.add_(1)
        # momentum=None: the cumulative factor 1/n stays on the device (no read of the counter on the host)
        f = (self.momentum if self.momentum is not None
             else self.num_batches_tracked.reciprocal().to(self.running_mean.dtype))
        d = batch_mean.to(self.running_mean.dtype) - self.running_mean
        self.running_mean.add_(d * f)
        self.running_var.mul_(1.0 - f).add_(batch_var.to(self.running_var.dtype) * f)
        self.running_var.add_(d * d * (f * (1.0 - f)))


class BGNAdapter(StatsAdapter):
    """:class:`~d2norm.layers.batch_group_norm.BatchGroupNorm`: per channel group E[x], E[x²]."""

    @property
    def rows(self) -> int:
        return self.module.num_groups

    def forward(self, x):
        m = self.module
        check_input_channels("BatchGroupNorm", x, m.num_channels)
        sd = stat_dtype(x.dtype)
        if x.numel() == 0:
            return empty_passthrough(x, m.weight, m.bias)
        xs = x.to(sd)
        if self.mode == "population":
            mean, var, _ = self.population(0, sd)
            self._touch()
        else:
            g = xs.unflatten(1, (m.num_groups, -1))
            n, mean, var = batch_moments(g, [0] + list(range(2, g.dim())))
            self.record(0, n, mean, var)
        return m._normalize(x, mean.unsqueeze(0), var.unsqueeze(0), xs)

    @torch.no_grad()
    def write(self, slot, est):
        m = self.module
        m.running_mean.copy_(est.mean.to(m.running_mean.dtype))
        # m_{x²} − m_x² in float64 (the estimate's E[x²] is float64: no float32 cancellation)
        m.running_var.copy_((est.sq_mean - est.mean * est.mean).clamp(min=0).to(m.running_var.dtype))

    def ema_stats(self, slot):
        """σ = sqrt(m_{x²} − m_x²) per channel group (``running_var``)."""
        return self.module.running_mean.detach().double(), self.module.running_var.detach().double().sqrt()

    def comparable_stats(self, est):
        return est.mean, est.var_biased.clamp(min=0).sqrt()
