"""BatchNorm that uses the mini-batch's statistics in inference.

rethinking §4.2 ("Use Mini-batch in Inference"), Table 3: in R-CNN heads one test image still yields a
mini-batch of N = R_0 RoIs (10^2-10^3), so normalizing with μ_B, σ_B at test time is legitimate and removes the
train-test inconsistency of population statistics (Table 3: 41.5 vs 30.7 AP^bb with 1 img/GPU in training).
"""
import torch
import torch.nn.functional as F

from .base import OWN_STATS_NOTE, D2NormBatchNorm2d, NotAnAffine, skip_nonfinite_stats, stat_dtype
from .kernels import channel_affine, group_moments
from .native import channel_moments
from .registry import register_norm

__all__ = ["BatchStatsBatchNorm2d"]


@register_norm("BatchStatsBN")
class BatchStatsBatchNorm2d(D2NormBatchNorm2d):
    """BatchNorm2d that normalizes with the current mini-batch's statistics in eval as well (rethinking §4.2).

    Training: exactly ``nn.BatchNorm2d`` (batch mean / biased variance for normalization, EMA of mean and
    unbiased variance in ``running_mean``/``running_var``, ``num_batches_tracked`` incremented). The EMA is kept
    so the same checkpoint can also be evaluated with population statistics (Table 3's μ_pop rows) by loading it
    into a plain BN.

    Eval: y = γ (x − μ_B) / sqrt(σ²_B + ε) + β with μ_B, σ²_B (biased, as in training) over (N, H, W) of the
    current input, i.e. Table 3's "μ_B, σ_B (1 img)" rows when the input is one image's RoIs. No buffer is read
    or written. As in training, a batch with a single value per channel (N·H·W = 1) is rejected by torch, because
    its batch variance is undefined as a normalizer; a zero-size batch returns a zero-size output.

    State dict is identical to ``BatchNorm2d``'s.
    """

    #: no options of its own: eps / momentum are D2NORM.BN's (rethinking §4.2, Table 3)
    CFG_NODE = "BATCH_STATS_BN"
    CFG_DOC = "BatchStatsBN (trains as BN, eval with the input's own batch statistics): rethinking §4.2, Table 3; eps / momentum from D2NORM.BN"

    def __init__(self, num_features: int, eps: float, momentum, **kwargs):
        super().__init__(num_features, eps=eps, momentum=momentum, **kwargs)

    @skip_nonfinite_stats
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"BatchStatsBatchNorm2d expects NCHW input, got shape {tuple(x.shape)}")
        if self.training:
            return super().forward(x)
        n_per_channel = x.numel() // max(x.shape[1], 1)
        if n_per_channel <= 1 or stat_dtype(x.dtype) != x.dtype:  # fp16/bf16: torch's kernel, float32 statistics
            # running stats None + training=True: batch statistics, nothing updated (momentum unused); torch
            # rejects a single value per channel and gives a zero-size output for an empty batch.
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        # Same statistics from one vectorized per-(sample, channel) moments pass, pooled exactly over the
        # samples (μ = mean_i μ_i, σ² = mean_i (σ_i² + (μ_i − μ)²): every sample has H·W elements), then BN's
        # normalize as one fused affine (differentiable through the statistics, as training-mode BN is).
        fused = channel_moments(x)  # CPU inference without gradient: one native pass
        if fused is not None:
            mean, var = fused
        else:
            mu_i, var_i = group_moments(x)
            mean = mu_i.mean(0)
            var = (var_i + (mu_i - mean).square()).mean(0)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
            shift = self.bias - mean * scale
        else:
            shift = -mean * scale
        return channel_affine(x, scale, shift)

    def frozen_bn_state(self):
        """BN's population statistics (μ_E, σ_E²): after the switch training and inference are the same constant
        map, so the train-test inconsistency this inference corrects no longer exists (rethinking §4.3)."""
        return super().frozen_bn_state()._replace(note=OWN_STATS_NOTE)

    def inference_affine(self):
        raise NotAnAffine("BatchStatsBN: inference normalizes with the current mini-batch's statistics (rethinking §4.2)")
