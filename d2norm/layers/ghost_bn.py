"""Ghost Batch Normalization.

rethinking A.5 ("Ghost BatchNorm ... splitting the batch into sub-batches and normalizing them individually");
four-things §3.2, eq 4 (statistics of example i over the disjoint sub-batch that contains i).
"""
import math
from typing import List

import torch

from .base import D2NormBatchNorm2d, empty_passthrough, skip_nonfinite_stats, stat_dtype
from ..utils.validation import check_choice, check_int
from .kernels import example_group_moments, example_group_norm
from .registry import register_norm
from ..options import Choice, Int, Option

__all__ = ["GhostBatchNorm2d", "ghost_batch_sizes"]

_REMAINDER_RULES = ("balanced", "error")


def ghost_batch_sizes(n: int, ghost_size: int, remainder: str = "balanced") -> List[int]:
    """Sizes of the contiguous sub-batches a batch of ``n`` examples is split into.

    Rule ("balanced"): ``k = ceil(n / ghost_size)`` sub-batches whose sizes differ by at most one, larger ones
    first. No example is dropped and no sub-batch exceeds ``ghost_size``; when ``ghost_size`` divides ``n`` this
    is exactly eq 4's partition. "error" raises when ``ghost_size`` does not divide ``n``.
    """
    check_int("ghost_size (D2NORM.GHOST_BN.SIZE)", ghost_size, minimum=1)
    check_choice("remainder (D2NORM.GHOST_BN.REMAINDER)", remainder, _REMAINDER_RULES)
    if n == 0:
        return []
    if n % ghost_size and remainder == "error":
        raise ValueError(
            f"GhostBN: batch of {n} examples is not a multiple of ghost size {ghost_size} "
            f"(D2NORM.GHOST_BN.REMAINDER='error'; use 'balanced' to split into near-equal sub-batches)"
        )
    k = math.ceil(n / ghost_size)
    base, extra = divmod(n, k)
    return [base + 1] * extra + [base] * (k - extra)


def _device_column(values: List[int], dtype: torch.dtype, device) -> torch.Tensor:
    """``values`` as a (k, 1) tensor on ``device`` without a host-to-device copy: one fill per run of equal values
    (the ghost sizes are at most two distinct values), each a kernel with the value as its argument."""
    out = torch.empty(len(values), 1, dtype=dtype, device=device)
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out[start:i].fill_(float(values[start]))
            start = i
    return out


@register_norm("GhostBN")
class GhostBatchNorm2d(D2NormBatchNorm2d):
    """BatchNorm2d whose training statistics are computed over sub-batches of ``ghost_size`` examples.

    Training (four-things eq 4): example ``i`` is normalized with the mean and biased variance of its own
    sub-batch (over examples of the sub-batch and all spatial positions). Sub-batches follow
    :func:`ghost_batch_sizes`. The EMA is updated once per forward with the size-weighted average of the
    sub-batch means and unbiased variances. When ``ghost_size >= N`` this is exactly ``BatchNorm2d``.

    Eval: population statistics (``running_mean``/``running_var``), exactly as ``BatchNorm2d``.

    State dict is identical to ``BatchNorm2d``'s, so BN checkpoints load unchanged.
    """

    CFG_NODE = "GHOST_BN"
    CFG_DOC = 'GhostBN: rethinking A.5; four-things §3.2, eq 4'
    OPTIONS = (
        Option("SIZE", 16, "Examples (dim 0: images in a backbone, RoIs in a box head) per normalization "
               "sub-batch (four-things eq 4).", arg="ghost_size", check=Int(1)),
        Option("REMAINDER", "balanced", "A batch that is not a multiple of SIZE: 'balanced' = ceil(N / SIZE) "
               "contiguous sub-batches whose sizes differ by at most one (no example dropped); 'error' = a "
               "ValueError naming N and SIZE.", arg="remainder", check=Choice(*_REMAINDER_RULES)),
    )

    def __init__(self, num_features: int, ghost_size: int, remainder: str, eps: float, momentum, **kwargs):
        super().__init__(num_features, eps=eps, momentum=momentum, **kwargs)
        self.ghost_size = int(ghost_size)
        self.remainder = remainder

    @classmethod
    def cfg_normalization_images(cls, cfg, images_per_process: int, world: int) -> int:
        """A ghost batch: at most D2NORM.GHOST_BN.SIZE of the process's images (four-things eq 4)."""
        return min(int(cfg.D2NORM.GHOST_BN.SIZE), images_per_process)

    @classmethod
    def check_cfg_use(cls, cfg, keys, world: int) -> None:
        """Warns when D2NORM.GHOST_BN.SIZE is at least the examples the layer normalizes (images per process in
        a backbone / RetinaNet head, sampled RoIs in a box / mask head): one ghost batch = plain BN (four-things
        §3.2, eq 4)."""
        from .cfg_checks import images_per_process, warn_once

        size = cfg.D2NORM.GHOST_BN.SIZE
        images = images_per_process(cfg, world)
        per = f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} over {world} process(es)"
        for key in keys:
            if key in ("MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM"):
                n = int(cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE) * images
                what = (f"at most {n} RoIs per process (MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE "
                        f"{cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE} x {images} images, {per})")
            else:
                n = images
                what = f"{n} images per process ({per})"
            if size >= n:
                warn_once(
                    f"{key} 'GhostBN' with D2NORM.GHOST_BN.SIZE {size}: the layer normalizes {what}, so every batch "
                    f"is a single ghost batch and GhostBN is plain BN (four-things §3.2). Set D2NORM.GHOST_BN.SIZE "
                    f"below {n} (e.g. {max(1, n // 2)}) for ghost batches, or use NORM 'BN'."
                )

    def training_normalization_batch(self) -> int:
        return self.ghost_size

    def training_sub_batches(self, n: int) -> List[int]:
        return ghost_batch_sizes(n, self.ghost_size, self.remainder)

    def extra_repr(self):
        return super().extra_repr() + f", ghost_size={self.ghost_size}, remainder={self.remainder!r}"

    @skip_nonfinite_stats
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"GhostBatchNorm2d expects NCHW input, got shape {tuple(x.shape)}")
        if x.numel() == 0:
            # No statistics from an empty batch, not counted (D2NormBatchNorm2d.forward); keep the graph connected.
            return empty_passthrough(x, self.weight, self.bias)
        if not self.training or x.shape[0] <= self.ghost_size:
            return super().forward(x)

        sizes = ghost_batch_sizes(x.shape[0], self.ghost_size, self.remainder)
        if x.shape[2] * x.shape[3] == 1 and min(sizes) == 1:  # torch's BN raises for one value per channel
            raise ValueError(f"Expected more than 1 value per channel when training, got a ghost batch of one 1x1 "
                             f"example (input size {tuple(x.shape)}, ghost batch sizes {sizes}, "
                             f"D2NORM.GHOST_BN.SIZE {self.ghost_size})")
        sd = stat_dtype(x.dtype)
        # Every example's per-channel moments in one pass, pooled exactly over each sub-batch (equal element
        # counts per example), one fused normalize with a closed-form backward (layers/kernels.py).
        w, b = (self.weight.to(sd), self.bias.to(sd)) if self.affine else (None, None)
        y, mu_i, var_i = example_group_norm(x.to(sd), x.shape[1], sizes, w, b, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                means, vars_ = example_group_moments(mu_i, var_i, sizes)  # (k, C) per sub-batch
                counts = _device_column([s * x.shape[2] * x.shape[3] for s in sizes], sd, x.device)
            self._update_running_stats(means, vars_, counts)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, means, vars_, counts):
        unbiased = vars_ * counts / (counts - 1).clamp(min=1)
        w = counts / counts.sum()
        mean = (means * w).sum(0)
        var = (unbiased * w).sum(0)
        self.num_batches_tracked.add_(1)
        if self.momentum is not None:
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
            self.running_var.mul_(1 - m).add_(var.to(self.running_var.dtype), alpha=m)
        else:  # cumulative average with the factor 1/n kept on the device (no read of the counter on the host)
            m = self.num_batches_tracked.reciprocal().to(self.running_mean.dtype)
            self.running_mean.add_((mean.to(self.running_mean.dtype) - self.running_mean) * m)
            self.running_var.add_((var.to(self.running_var.dtype) - self.running_var) * m)
