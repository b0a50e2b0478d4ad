"""Fast building blocks for the layers that normalize with each sample's own statistics.

Memory-bound primitives, each one pass over the activation:

* :func:`group_moments` — per-(sample, channel group) mean and biased variance. ``torch.var_mean`` over the
  spatial dims is a scalar Welford loop on CPU (about 25× slower than ``nn.BatchNorm2d`` inference on a ResNet
  feature map). On CPU (float32/float64, contiguous) it is :func:`d2norm.layers.native.row_moments`, d2norm's
  native kernel: exact two-pass per row, reads the activation once, writes nothing else. Elsewhere (CUDA, other
  layouts, or no C++ compiler to build that kernel) torch's GroupNorm kernel computes the same moments
  vectorized and numerically stable (pairwise Welford combination, no ``E[x²] − E[x]²`` cancellation): we take
  its mean and rstd (with ``eps = 0``: ``var = rstd⁻²`` exactly, 0 for a constant group) and discard its
  normalized output. Differentiable (``_GroupMoments``: ∂μ/∂x = 1/M, ∂σ²/∂x = 2(x − μ)/M).
* :func:`channel_affine` — ``y = x·scale + shift`` with per-channel ``(C,)`` or per-(sample, channel) ``(N, C)``
  coefficients. On CPU, per-(sample, channel) coefficients when no gradient is needed go to
  :func:`d2norm.layers.native.row_affine` (one pass per row, about 0.7-0.9× BN inference). Otherwise, on CPU,
  it runs through BN's inference kernel (``F.batch_norm`` with μ = 0, σ² = 1, ε = 0 on the ``(1, N·C, H·W)``
  view of a contiguous input), which is ~2× faster than a broadcast ``addcmul`` there; elsewhere (CUDA;
  channels-last or other strided input) a broadcast ``addcmul``. Differentiable (BN's backward, or addcmul's).
* :func:`normalize_by_own_moments` — both fused for a training forward whose affine comes from the input's own
  moments (GhostBN, BGN), with a two-pass native backward.

All keep the input dtype (callers upcast fp16/bf16 to float32 first, as every layer does for its statistics).
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .native import native_module, row_affine, row_moments

__all__ = ["group_moments", "channel_affine", "normalize_by_own_moments"]


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1)


class _GroupMoments(torch.autograd.Function):
    """(mean, biased var) of shape (N, G) from torch's GroupNorm kernel; see :func:`group_moments`."""

    @staticmethod
    def forward(ctx, x, groups: int):
        n, c = x.shape[0], x.shape[1]
        hw = x.numel() // max(n * c, 1)
        fast = row_moments(x.view(n * groups, -1)) if x.is_contiguous() and x.numel() > 0 else None
        if fast is not None:
            mean, var = fast
        else:
            xc = x if x.is_contiguous() else x.contiguous()  # GN's channels-last CPU kernel is slow on small H·W
            _, mean, rstd = torch.native_group_norm(xc, None, None, n, c, hw, groups, 0.0)
            var = rstd.square().reciprocal()  # ε = 0: exactly the biased variance (rstd = inf -> 0)
        ctx.groups = groups
        ctx.save_for_backward(x, mean)
        return mean.reshape(n, groups), var.reshape(n, groups)

    @staticmethod
    def backward(ctx, g_mean, g_var):
        x, mean = ctx.saved_tensors
        n, c, g = x.shape[0], x.shape[1], ctx.groups
        m = x.numel() // max(n * g, 1)  # elements per (sample, group)
        mean = mean.reshape(n, g)
        g_mean = torch.zeros_like(mean) if g_mean is None else g_mean
        g_var = torch.zeros_like(mean) if g_var is None else g_var
        a = 2.0 * g_var / m  # ∂/∂x of Σ g_v·σ² = 2·g_v·(x − μ)/M ; of Σ g_m·μ = g_m/M
        b = g_mean / m - a * mean
        cpg = c // g
        a = a.repeat_interleave(cpg, dim=1)
        b = b.repeat_interleave(cpg, dim=1)
        return channel_affine(x, a, b), None


def group_moments(x: torch.Tensor, groups: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of each (sample, channel group) of ``x`` (N, C, *): two (N, G) tensors, in
    ``x``'s dtype. ``groups`` = number of contiguous channel groups (default C: per-sample, per-channel
    moments over the spatial positions, μ_i and σ_i² of four-things eq 3 / evalnorm eqs 5-6)."""
    groups = x.shape[1] if groups is None else groups
    return _GroupMoments.apply(x, groups)


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x·scale + shift`` over ``x`` (N, C, *), ``scale``/``shift`` of shape (C,), (1, C) or (N, C) (same dtype as
    ``x``); one fused pass (module docstring)."""
    n, c = x.shape[0], x.shape[1]
    if scale.dim() == 2 and scale.shape[0] == 1:
        scale, shift = scale.reshape(c), shift.reshape(c)
    if x.device.type == "cpu" and x.numel() > 0 and x.is_contiguous():
        if scale.dim() == 1:  # per channel: BN's inference kernel is exactly this map at BN's speed
            zeros, ones = scale.new_zeros(c), scale.new_ones(c)
            return F.batch_norm(x, zeros, ones, scale, shift, False, 0.0, 0.0)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or shift.requires_grad)
        if not needs_grad:  # per (sample, channel), inference: our per-row kernel (no backward of its own)
            y = row_affine(x, scale.reshape(-1), shift.reshape(-1))
            if y is not None:
                return y
        zeros, ones = scale.new_zeros(n * c), scale.new_ones(n * c)
        y = F.batch_norm(_as_3d(x).reshape(1, n * c, -1), zeros, ones, scale.reshape(-1), shift.reshape(-1),
                         False, 0.0, 0.0)
        return y.view(x.shape)
    view = (1, c) if scale.dim() == 1 else (n, c)
    view = view + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.reshape(view), x, scale.reshape(view))


class _Link:
    """What the two halves of :func:`normalize_by_own_moments`'s fused backward share: the output gradient and
    the scale, left by the affine's backward for the moments' backward (which autograd runs after it: the
    scale depends on the moments)."""

    __slots__ = ("gy", "scale")

    def __init__(self):
        self.gy = self.scale = None


class _LinkedMoments(torch.autograd.Function):
    """Per-(sample, group) moments (native kernel) whose backward also adds the affine's ``gy·scale``, so the
    input gradient is one pass: ``gx = gy·s + x·a + b`` (a, b from ∂μ/∂x = 1/M, ∂σ²/∂x = 2(x − μ)/M)."""

    @staticmethod
    def forward(ctx, x, groups: int, link: _Link):
        n = x.shape[0]
        mean, var = native_module().row_moments(x.view(n * groups, -1))
        ctx.save_for_backward(x, mean)
        ctx.groups, ctx.link = groups, link
        return mean.view(n, groups), var.view(n, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_mean, g_var):
        x, mean = ctx.saved_tensors
        n, c, g = x.shape[0], x.shape[1], ctx.groups
        m = x.numel() // (n * g)
        mean = mean.view(n, g)
        g_mean = torch.zeros_like(mean) if g_mean is None else g_mean
        g_var = torch.zeros_like(mean) if g_var is None else g_var
        a = 2.0 * g_var / m
        b = g_mean / m - a * mean
        a = a.repeat_interleave(c // g, dim=1).reshape(-1)
        b = b.repeat_interleave(c // g, dim=1).reshape(-1)
        link, mod = ctx.link, native_module()
        if link.gy is not None:
            gx = mod.row_affine2(link.gy, link.scale, x, a, b)
        else:  # the output was not used: only the statistics' part
            gx = mod.row_affine(x, a, b)
        link.gy = link.scale = None
        return gx, None, None


class _LinkedAffine(torch.autograd.Function):
    """``y = x·scale + shift`` per (sample, channel) row (native kernel); its backward computes the gradients
    of scale and shift (Σgy·x, Σgy per row) and leaves the input gradient to :class:`_LinkedMoments`."""

    @staticmethod
    def forward(ctx, x, scale, shift, link: _Link):
        y = native_module().row_affine(x, scale.reshape(-1).contiguous(), shift.reshape(-1).contiguous())
        ctx.save_for_backward(x, scale)
        ctx.link = link
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, scale = ctx.saved_tensors
        n, c = x.shape[0], x.shape[1]
        gy = gy.contiguous()
        g_scale = g_shift = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            s_g, s_gx = native_module().row_dot_sums(gy, x, n * c)
            g_scale, g_shift = s_gx.view(n, c), s_g.view(n, c)
        if ctx.needs_input_grad[0]:
            ctx.link.gy, ctx.link.scale = gy, scale.reshape(-1).contiguous()
        return None, g_scale, g_shift, None


def normalize_by_own_moments(
    x: torch.Tensor,
    groups: int,
    coeffs: Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y = x·scale + shift`` where ``(scale, shift) = coeffs(μ_i, σ_i²)``, both (N, C), are computed (with
    ordinary differentiable ops) from the per-(sample, channel group) moments (N, G) of ``x`` itself: the
    training forward of GhostBN (sub-batch statistics, four-things eq 4) and BGN (example × channel groups,
    §3.4). Returns ``(y, μ_i, σ_i²)``.

    On CPU (contiguous float32/float64, native kernel built) forward and backward are two activation passes
    each, like torch's GroupNorm kernels: moments + affine, then Σgy / Σgy·x per row + one fused input
    gradient ``gy·scale + x·a + b``. Elsewhere :func:`group_moments` + :func:`channel_affine` and autograd
    (same values and gradients)."""
    mod = None
    if (x.device.type == "cpu" and x.is_contiguous() and x.numel() > 0
            and x.dtype in (torch.float32, torch.float64)):
        mod = native_module()
    if mod is None:
        mu, var = group_moments(x, groups)
        scale, shift = coeffs(mu, var)
        return channel_affine(x, scale, shift), mu, var
    link = _Link()
    mu, var = _LinkedMoments.apply(x, groups, link)
    scale, shift = coeffs(mu, var)
    if mu.requires_grad and not scale.requires_grad:  # the input gradient is computed by the moments' backward
        raise ValueError("normalize_by_own_moments: coeffs must keep scale differentiable in the moments")
    return _LinkedAffine.apply(x, scale, shift, link), mu, var
