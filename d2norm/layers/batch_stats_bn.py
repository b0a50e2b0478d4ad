"""BatchNorm that uses the mini-batch's statistics in inference.

rethinking §4.2 ("Use Mini-batch in Inference"), Table 3: in R-CNN heads one test image still yields a
mini-batch of N = R_0 RoIs (10^2-10^3), so normalizing with μ_B, σ_B at test time is legitimate and removes the
train-test inconsistency of population statistics (Table 3: 41.5 vs 30.7 AP^bb with 1 img/GPU in training).

Also home of two small helpers every BN-derived d2norm layer of this family uses (option validation and
checkpoints without ``num_batches_tracked``).
"""
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import D2NormModule
from .registry import register_norm

__all__ = ["BatchStatsBatchNorm2d", "check_bn_options", "fill_missing_num_batches_tracked"]

logger = logging.getLogger(__name__)


def check_bn_options(eps, momentum) -> None:
    """Validate torch-convention BN options; ValueError naming the bad value and what is allowed."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"BN eps must be a finite number > 0 (D2NORM.BN.EPS), got {eps!r}")
    if momentum is not None and (
        isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (0.0 <= momentum <= 1.0)
    ):
        raise ValueError(
            f"BN momentum must be a number in [0, 1] (torch convention, D2NORM.BN.MOMENTUM) or None "
            f"(cumulative average), got {momentum!r}"
        )


def fill_missing_num_batches_tracked(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Let a checkpoint without ``num_batches_tracked`` (detectron2's ``FrozenBatchNorm2d``) load strictly.

    ``FrozenBatchNorm2d`` stores weight, bias, running_mean and running_var only, with state-dict version 3,
    so torch's BN loader (which fills the counter only for versions < 2) would report it missing. The counter
    cannot be mapped from such a checkpoint: we keep the module's current value and say so with a warning. It
    only matters with ``momentum=None`` (cumulative average), where it weights the next EMA update.
    Only acts when the checkpoint holds this module's ``running_mean`` (a partial checkpoint that lacks the
    module entirely is still reported as missing by torch).
    """
    key = prefix + "num_batches_tracked"
    nbt = getattr(module, "num_batches_tracked", None)
    if nbt is None or key in state_dict or (prefix + "running_mean") not in state_dict:
        return
    state_dict[key] = nbt.detach().clone()
    logger.warning(
        "%s: checkpoint has no %r (e.g. a FrozenBatchNorm2d checkpoint); keeping the current value %s. "
        "It only affects EMA updates when momentum is None.",
        type(module).__name__,
        key,
        nbt.tolist(),
    )


class BatchStatsBatchNorm2d(nn.BatchNorm2d, D2NormModule):
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

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, **kwargs):
        check_bn_options(eps, momentum)
        super().__init__(num_features, eps=eps, momentum=momentum, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"BatchStatsBatchNorm2d expects NCHW input, got shape {tuple(x.shape)}")
        if self.training:
            return super().forward(x)
        # running stats None + training=True: batch statistics, nothing updated (momentum unused).
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        fill_missing_num_batches_tracked(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register_norm("BatchStatsBN")
def build_batch_stats_bn(cfg, channels: int) -> BatchStatsBatchNorm2d:
    """``NORM: "BatchStatsBN"``; options ``D2NORM.BN.{MOMENTUM, EPS}`` (D2NORM.BATCH_STATS_BN has no keys)."""
    return BatchStatsBatchNorm2d(channels, eps=cfg.D2NORM.BN.EPS, momentum=cfg.D2NORM.BN.MOMENTUM)
