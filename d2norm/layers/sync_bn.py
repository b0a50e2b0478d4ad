"""Synchronized BatchNorm for any device (CPU/gloo and CUDA/NCCL), exact with uneven and empty inputs.

rethinking A.5 (SyncBN: the normalization batch spans the workers), A.6 (statistics of the union of the
workers' batches; workers may hold different numbers of elements, e.g. RoIs), A.10 ("Empty inputs ...
handling empty inputs and control flow without communication deadlocks"; "numerical precision": per-rank
moments are merged exactly instead of forming E[x²] − E[x]²).

Differences from torch's ``nn.SyncBatchNorm``: it runs on CPU tensors (gloo), and every statistic is weighted
by each rank's element count N·H·W, so the result equals BatchNorm over the concatenated batch of all ranks
for any per-rank N (including 0) and any per-rank H, W.
"""
import os

import torch
import torch.nn.functional as F

from .base import D2NormBatchNorm2d, skip_nonfinite_stats, stat_dtype
from ..utils.comm import all_gather_rows_detached, all_reduce_sum_detached, group_world_size, sync_subgroup
from ..moments import pooled_moments
from ..options import Int, Option
from .registry import register_norm

__all__ = ["AnySyncBatchNorm2d", "SyncBatchNormFunction"]

_DIMS = (0, 2, 3)


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode SyncBN over ``group`` (``None`` = all ranks; a single process = plain BN math).

    Forward (rethinking A.6: the statistics of the whole normalization batch), per channel: every rank r
    computes its element count c_r = N_r·H_r·W_r, mean m_r and biased variance v_r (one fused Welford pass),
    the (m_r, v_r, c_r) of all ranks are exchanged with **one** all-gather (W·(2C + 1) numbers, float32 for
    fp16/bf16 input; torch's ``nn.SyncBatchNorm`` gathers per-rank statistics the same way) and merged exactly
    (:func:`d2norm.moments.pooled_moments`):

        M = Σ c_r,  μ = Σ (c_r/M)·m_r,  σ² = Σ (c_r/M)·(v_r + (m_r − μ)²),  y = γ·(x − μ)/√(σ² + ε) + β

    We do not all-reduce A.6's [Σx, Σx²] (a (2C + 1)-number message): its σ² = E[x²] − μ² cancels
    catastrophically in float32 when |μ| ≫ σ (rethinking A.10 "numerical precision": at mean 1e4, std 1 it is
    off by orders of magnitude), whereas the pooled form is as accurate as torch's single-process BN.

    Backward (the BN gradient with global means; x̂ = (x − μ)/√(σ² + ε)):
        ∂L/∂x = γ/√(σ² + ε) · (dy − Σdy / M − x̂ · Σ(dy·x̂) / M)
    from **one** all-reduce of ``[Σdy, Σdy·(x − μ)]`` (2C numbers; centered at the global μ on every rank, so
    no cancellation either). ∂L/∂γ = Σ_local dy·x̂ and ∂L/∂β = Σ_local dy are this rank's share: data
    parallelism (DDP) sums/averages parameter gradients across ranks.

    A rank with N = 0 contributes c = 0 and still joins both collectives (the backward one runs whenever
    backward reaches this node, independent of which inputs need gradients, so it cannot differ by rank).

    Returns ``(y, mean, biased_var, count)``; the last three are the global statistics (not differentiable).
    fp16/bf16 inputs are upcast to float32 for the reductions (forward and backward).

    CUDA route (:func:`torch_kernels_enabled`, off by default): the local passes run on torch's SyncBN kernels
    (``batch_norm_stats`` forward; ``batch_norm_backward_reduce`` + ``batch_norm_backward_elemt`` backward: two
    passes over x and dy, reading half inputs in place instead of float32 copies and ~5 full-size temporaries);
    the exchange and the exact merge stay the ones above (torch's ``nn.SyncBatchNorm`` drops empty ranks with a
    boolean mask, a host sync, and skips the backward all-reduce on a rank whose input needs no gradient).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, group):
        sd = stat_dtype(x.dtype)
        C = x.shape[1]
        n = x.shape[0] * x.shape[2] * x.shape[3]
        ctx.kernels = n > 0 and torch_kernels_enabled(x)
        if ctx.kernels:
            x = _kernel_layout(x)
            mean_l, invstd_l = torch.batch_norm_stats(x, eps)  # float32 for half input, one Welford pass
            var_l = (invstd_l.reciprocal().square() - eps).clamp(min=0)  # invstd = 1/sqrt(var + eps)
            local = torch.cat([mean_l, var_l, mean_l.new_full((1,), n)])
        elif n > 0:
            var_l, mean_l = torch.var_mean(x.to(sd), dim=_DIMS, correction=0)
            local = torch.cat([mean_l, var_l, mean_l.new_full((1,), n)])
        else:
            local = torch.zeros(2 * C + 1, dtype=sd, device=x.device)
        rows = all_gather_rows_detached(local, group) if group_world_size(group) > 1 else local[None]
        # M = 0 only if every rank is empty: statistics are then 0, never NaN
        count, mean, var = pooled_moments(rows[:, 2 * C :], rows[:, :C], rows[:, C : 2 * C])
        count = count.reshape(())
        invstd = torch.rsqrt(var + eps)

        w = weight.to(sd) if weight is not None else None
        b = bias.to(sd) if bias is not None else None
        # One fused normalize with the supplied statistics (mixed fp16/bf16 input with fp32 stats is supported).
        y = F.batch_norm(x, mean, var, w, b, False, 0.0, eps)

        ctx.group = group
        ctx.has_weight = weight is not None
        ctx.save_for_backward(x, weight, mean, invstd, count)
        count = count.detach().clone()
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        if ctx.kernels:
            return _backward_kernels(ctx, dy)
        x, weight, mean, invstd, count = ctx.saved_tensors
        sd = mean.dtype
        C = x.shape[1]
        shape = (1, C, 1, 1)
        if x.numel() > 0:
            xs = x.to(sd)
            dys = dy.to(sd)
            xmu = xs - mean.view(shape)
            sum_dy = dys.sum(_DIMS)
            sum_dy_xmu = (dys * xmu).sum(_DIMS)
        else:
            xmu = x.to(sd)
            dys = dy.to(sd)
            sum_dy = torch.zeros(C, dtype=sd, device=x.device)
            sum_dy_xmu = torch.zeros(C, dtype=sd, device=x.device)
        local = torch.cat([sum_dy, sum_dy_xmu])
        total = all_reduce_sum_detached(local, ctx.group) if group_world_size(ctx.group) > 1 else local
        m = count.clamp(min=1)
        mean_dy = total[:C] / m
        mean_dy_xmu = total[C:] / m

        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            k = invstd if weight is None else weight.to(sd) * invstd
            proj = invstd * invstd * mean_dy_xmu  # x̂·mean(dy·x̂) = (x − μ)·invstd²·mean(dy·(x − μ))
            grad_x = ((dys - mean_dy.view(shape) - xmu * proj.view(shape)) * k.view(shape)).to(x.dtype)
        if ctx.has_weight and ctx.needs_input_grad[1]:
            grad_w = (sum_dy_xmu * invstd).to(weight.dtype)
        if ctx.has_weight and ctx.needs_input_grad[2]:
            grad_b = sum_dy.to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


def torch_kernels_enabled(x: torch.Tensor) -> bool:
    """Whether :class:`SyncBatchNormFunction` takes its CUDA route for ``x``: a CUDA tensor and
    ``D2NORM_SYNCBN_CUDA_KERNELS=1`` in the environment. Off by default: the route has not yet run on a GPU
    against the CPU float64 layer (``tools/gpu_selfcheck.py`` runs it both ways); the CPU test suite checks its
    plumbing with reference implementations of the four kernels."""
    return x.is_cuda and os.environ.get("D2NORM_SYNCBN_CUDA_KERNELS", "0").strip() == "1"


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """torch's SyncBN kernels take NCHW-contiguous or channels-last tensors (as ``nn.SyncBatchNorm`` ensures)."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _backward_kernels(ctx, dy):
    x, weight, mean, invstd, count = ctx.saved_tensors
    x, dy = _kernel_layout(x), _kernel_layout(dy)
    C = x.shape[1]
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    has_w = ctx.has_weight
    # input_g=True whatever x needs: the kernel returns no sums otherwise, and every rank must join the all-reduce
    # (torch's nn.SyncBatchNorm skips it when the input needs no gradient, which can leave another rank waiting)
    sum_dy, sum_dy_xmu, grad_w, grad_b = torch.batch_norm_backward_reduce(
        dy, x, mean, invstd, weight if has_w else None, True, need_w and has_w, need_b and has_w)
    local = torch.cat([sum_dy, sum_dy_xmu])
    total = all_reduce_sum_detached(local, ctx.group) if group_world_size(ctx.group) > 1 else local
    grad_x = None
    if need_x:
        w = weight.to(mean.dtype) if has_w else None
        counts = count.round().to(torch.int32).reshape(1)  # the kernel divides by the sum of its counts
        grad_x = torch.batch_norm_backward_elemt(dy, x, mean, invstd, w, total[:C], total[C:], counts)
    return grad_x, grad_w if has_w and need_w else None, grad_b if has_w and need_b else None, None, None


@register_norm("AnySyncBN")
class AnySyncBatchNorm2d(D2NormBatchNorm2d):
    """SyncBN that works on CPU/gloo and CUDA/NCCL, weighted by each rank's element count (rethinking A.6).

    Training, more than one rank in the sync group: normalizes with the statistics of the union of all ranks'
    batches (:class:`SyncBatchNormFunction`), so forward and backward equal ``nn.BatchNorm2d`` over the
    concatenated batch, for uneven N (0 included: the empty rank still joins every collective, forward and
    backward). The EMA (``running_mean``, ``running_var``, torch's momentum convention; ``momentum=None`` =
    cumulative average) is updated with the global mean and unbiased global variance σ²·M/(M − 1), so every
    rank of the group ends with identical buffers; ``num_batches_tracked`` counts every training forward (as
    torch's BN does, even an empty one). When the whole group's batch is empty the EMA is left unchanged
    (A.10: the statistics are undefined). No host synchronization is needed for any of this.

    Training, a single process (or ``sync_group_size`` 1): exactly ``nn.BatchNorm2d``.
    Eval: population statistics, exactly ``nn.BatchNorm2d``; no communication.

    ``sync_group_size``: ranks per sync group (consecutive ranks; 0 = all). The state dict is
    ``nn.BatchNorm2d``'s, so BN checkpoints load unchanged; a detectron2 ``FrozenBatchNorm2d`` checkpoint
    loads strictly too, its missing ``num_batches_tracked`` kept at the current value with a warning.

    Contract: every rank of the group calls forward of every AnySyncBN layer in the same order, and runs
    backward through its output (also when empty), as for any synchronized BN.
    """

    CFG_NODE = "SYNC_BN"
    CFG_DOC = 'AnySyncBN, sync BN for any device (CPU/gloo, CUDA/NCCL): rethinking A.5, A.6, A.10; eps / momentum from D2NORM.BN'
    OPTIONS = (
        Option("GROUP_SIZE", 0, "Consecutive ranks whose batches are normalized together (rethinking A.5, A.6, "
               "A.10); 0 = all ranks (normalization batch = SGD batch); must divide the world size; 1 = plain "
               "per-rank BN.", arg="sync_group_size", check=Int(0, note=" (0 = all ranks)")),
    )

    def __init__(self, num_features: int, sync_group_size: int, eps: float, momentum, **kwargs):
        super().__init__(num_features, eps=eps, momentum=momentum, **kwargs)
        self.sync_group_size = int(sync_group_size)

    batch_statistics = "synced"

    @classmethod
    def cfg_normalization_images(cls, cfg, images_per_process: int, world: int) -> int:
        """The images of a sync group: D2NORM.SYNC_BN.GROUP_SIZE consecutive processes (0: all of them)."""
        return images_per_process * (int(cfg.D2NORM.SYNC_BN.GROUP_SIZE) or world)

    @classmethod
    def check_cfg_use(cls, cfg, keys, world: int) -> None:
        """D2NORM.SYNC_BN.GROUP_SIZE must divide the number of processes (rethinking A.5: groups of consecutive
        ranks)."""
        from .cfg_checks import check_group_size

        check_group_size("D2NORM.SYNC_BN.GROUP_SIZE", cfg.D2NORM.SYNC_BN.GROUP_SIZE, world)

    def extra_repr(self):
        return super().extra_repr() + f", sync_group_size={self.sync_group_size}"

    @skip_nonfinite_stats
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"AnySyncBatchNorm2d expects NCHW input, got shape {tuple(x.shape)}")
        if not self.training:
            return super().forward(x)
        group = sync_subgroup(self.sync_group_size)
        if group_world_size(group) == 1:
            return super().forward(x)

        y, mean, var, count = SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps, group)
        if self.track_running_stats:
            self._update_running_stats(mean, var, count)
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean, var, count):
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            m = 1.0 / self.num_batches_tracked.to(mean.dtype)
        else:
            m = torch.full((), self.momentum, dtype=mean.dtype, device=mean.device)
        m = m * (count > 0)  # an empty global batch leaves the EMA unchanged
        unbiased = var * count / (count - 1).clamp(min=1)
        rm, rv = self.running_mean, self.running_var
        rm.copy_(rm + (mean.to(rm.dtype) - rm) * m.to(rm.dtype))
        rv.copy_(rv + (unbiased.to(rv.dtype) - rv) * m.to(rv.dtype))
