"""Inference example weighing.

four-things §3.1, eq 3: in BN inference each example does not contribute to its own normalization statistics
(train-test discrepancy, eq 2). Eq 3 mixes the example's own moments into the moving averages:

    μ_i  = α E[x_i] + (1 − α) m_x
    σ²_i = α E[x_i²] + (1 − α) m_{x²} − μ_i²
    x̂_i = γ (x_i − μ_i) / sqrt(σ²_i + ε) + β

α = 0 is classical BN inference, α = 1 uses only the example's own statistics (instance statistics). Training is
unchanged, so it applies retroactively to any BN checkpoint (§3.1, Fig. 1).
"""
import torch


from .base import OWN_STATS_NOTE, D2NormBatchNorm2d, NotAnAffine, skip_nonfinite_stats, stat_dtype
from .kernels import channel_affine, group_moments
from .native import mix_normalize
from ..options import Number, Option
from .registry import register_norm

__all__ = ["ExampleWeightedBatchNorm2d"]


@register_norm("ExampleWeightedBN")
class ExampleWeightedBatchNorm2d(D2NormBatchNorm2d):
    """BatchNorm2d with inference example weighing (four-things §3.1, eq 3).

    Training: exactly ``nn.BatchNorm2d`` (same output, same EMA updates).

    Eval, per sample i and channel c (E[·] over the H·W positions of that sample and channel, biased):

    * ``m_x = running_mean`` and ``m_{x²} = running_var + running_mean²``.
      **Variance convention:** ``running_var`` is used as stored, i.e. torch's EMA of the *unbiased* batch
      variance. Reasons: (1) α = 0 must reproduce BN inference exactly, which needs σ² = running_var at α = 0;
      (2) it must load any plain BN / FrozenBN checkpoint, and those store only running_mean/running_var;
      (3) converting to a biased second moment needs the training normalization size n = N·H·W (factor
      (n−1)/n), which no BN checkpoint records; for conv features n is in the thousands, so the difference is
      below 0.1%. (An explicit EMA of E_B[x²] would also differ from running_var + running_mean² by the spread
      of batch means over training; eq 3 with α = 0 is meant to *be* BN inference, so we derive m_{x²} from the
      stored statistics.) :class:`~d2norm.layers.batch_group_norm.BatchGroupNorm` represents eq 3's moments
      the same way (``m_{x²} = running_var + m_x²``, never a stored raw E[x²]), but its ``running_var`` is the
      literal EMA of E[x²] minus m_x² (it has no BN checkpoints to load or BN inference to equal, and its
      training statistics are biased per example group).
    * Eq 3 is evaluated in the algebraically identical, cancellation-free form
      ``σ²_i = α·Var[x_i] + (1 − α)·running_var + α(1 − α)(E[x_i] − m_x)²``
      (expand α(Var+E²) + (1−α)(V+M²) − (αE + (1−α)M)²). At α = 1 this is exactly the biased instance
      variance, i.e. ``F.instance_norm`` followed by the BN affine.
    * α = 0 takes BN's own inference kernel (bitwise equal to ``nn.BatchNorm2d.eval()``).

    One statistics pass and one fused normalize ``y = x·scale_i + shift_i`` over the activation. No buffer is
    written in eval. State dict is identical to ``BatchNorm2d``'s.
    """

    CFG_NODE = "EXAMPLE_WEIGHING"
    CFG_DOC = 'ExampleWeightedBN, inference example weighing: four-things §3.1, eq 3'
    OPTIONS = (
        Option("ALPHA", 0.1, "alpha in [0, 1] of four-things eq 3: weight of the example's own statistics at "
               "inference (0 = plain BN inference, 1 = instance statistics). Tuned on validation data (§3.1, "
               "Fig. 1); it only changes inference, so it can be swept on a trained model.", arg="alpha",
               check=Number(0, 1)),
    )

    @staticmethod
    def check_alpha(alpha) -> float:
        """``alpha`` as a float if it is a number in [0, 1] (four-things §3.1: 0 = BN, 1 = instance statistics),
        else a ValueError naming it."""
        return ExampleWeightedBatchNorm2d.OPTIONS[0].validate(alpha, owner="inference example weight")

    def __init__(self, num_features: int, alpha: float, eps: float, momentum, **kwargs):
        alpha_ = float(alpha)
        if not kwargs.get("track_running_stats", True):
            raise ValueError(
                "ExampleWeightedBatchNorm2d needs running statistics (m_x, m_x2 of four-things eq 3): "
                "track_running_stats must be True, got False"
            )
        super().__init__(num_features, eps=eps, momentum=momentum, **kwargs)
        self.alpha = alpha_

    def extra_repr(self):
        return super().extra_repr() + f", alpha={self.alpha}"

    @skip_nonfinite_stats
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"ExampleWeightedBatchNorm2d expects NCHW input, got shape {tuple(x.shape)}")
        if self.training or self.alpha == 0.0 or x.numel() == 0:
            return super().forward(x)  # BN training / BN inference; empty input has no statistics to mix in

        a = self.alpha
        xs = x.to(stat_dtype(x.dtype))  # four-things eq 3 statistics in float32 for fp16/bf16
        m = self.running_mean.to(xs.dtype)
        v = self.running_var.to(xs.dtype)
        w, b = (self.weight.to(xs.dtype), self.bias.to(xs.dtype)) if self.affine else (None, None)
        fused = mix_normalize(xs, m, v, w, b, a, a, self.eps)  # CPU inference: one native pass
        if fused is not None:
            return fused.to(x.dtype)
        mean_i, var_i = group_moments(xs)  # (N, C): E[x_i], Var[x_i] in one vectorized pass
        mu = a * mean_i + (1.0 - a) * m
        var = a * var_i + (1.0 - a) * v + (a * (1.0 - a)) * (mean_i - m).square()
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight.to(xs.dtype)
            shift = self.bias.to(xs.dtype) - mu * scale
        else:
            shift = -mu * scale
        y = channel_affine(xs, scale, shift)
        return y.to(x.dtype)

    def frozen_bn_state(self):
        """BN's population statistics; with α > 0 the FrozenBN output is plain BN inference (α = 0)."""
        state = super().frozen_bn_state()
        return state._replace(note=OWN_STATS_NOTE) if self.alpha > 0 else state

    def inference_affine(self):
        """α = 0 is BN inference (a fixed affine map); α > 0 mixes in each sample's own statistics (eq 3)."""
        if self.alpha > 0.0:
            raise NotAnAffine(
                f"ExampleWeightedBN with alpha={self.alpha}: inference mixes in each sample's own statistics "
                f"(four-things eq 3)"
            )
        return super().inference_affine()
