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
  it runs through BN's inference kernel (``torch.batch_norm`` with μ = 0, σ² = 1, ε = 0 on the ``(1, N·C, H·W)``
  view of a contiguous input), which is ~2× faster than a broadcast ``addcmul`` there; elsewhere (CUDA;
  channels-last or other strided input) a broadcast ``addcmul``. Differentiable (BN's backward, or addcmul's).
* :func:`example_group_norm` — normalization of (example group × channel group) blocks by their own moments,
  the training forward of GhostBN and BGN: on CPU one native kernel each way (forward: x read once, y written
  once; backward: gy and x read once, the closed-form input gradient written once).

All keep the input dtype (callers upcast fp16/bf16 to float32 first, as every layer does for its statistics).
"""
import itertools
from typing import Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from .native import native_for, native_module, row_affine, row_moments

__all__ = ["group_moments", "channel_affine", "example_group_norm", "example_group_moments", "example_group_means",
           "expand_example_groups"]


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
        # torch.batch_norm, not F.batch_norm: with eps = 0 (statistics 0 / 1, so the map is exactly x·scale + shift)
        # torch <= 2.11's F.batch_norm refuses eps <= 0 even in inference; the kernel behind it takes it
        if scale.dim() == 1:  # per channel: BN's inference kernel is exactly this map at BN's speed
            zeros, ones = scale.new_zeros(c), scale.new_ones(c)
            return torch.batch_norm(x, scale, shift, zeros, ones, False, 0.0, 0.0, False)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or shift.requires_grad)
        if not needs_grad:  # per (sample, channel), inference: our per-row kernel (no backward of its own)
            y = row_affine(x, scale.reshape(-1), shift.reshape(-1))
            if y is not None:
                return y
        zeros, ones = scale.new_zeros(n * c), scale.new_ones(n * c)
        y = torch.batch_norm(_as_3d(x).reshape(1, n * c, -1), scale.reshape(-1), shift.reshape(-1), zeros, ones,
                             False, 0.0, 0.0, False)
        return y.view(x.shape)
    view = (1, c) if scale.dim() == 1 else (n, c)
    view = view + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.reshape(view), x, scale.reshape(view))


def _channels(t: torch.Tensor, cpg: int) -> torch.Tensor:
    """(N, G) per channel group -> (N, G·cpg) per channel, by ``expand`` (deterministic backward: a plain sum)."""
    n, g = t.shape
    return t.unsqueeze(-1).expand(n, g, cpg).reshape(n, g * cpg)


def _runs(sizes: Sequence[int]):
    """(first row, group size, number of groups) of each run of equal consecutive group sizes."""
    start = 0
    for size, run in itertools.groupby(sizes):
        g = len(list(run))
        yield start, size, g
        start += g * size


def example_group_means(t: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Mean of the rows of ``t`` (N, K) over each contiguous example group (``sizes``, summing to N): (k, K).

    Each run of equal sizes is one reshape (a balanced split has at most two runs): O(N), deterministic."""
    out = [t[a: a + g * size].reshape(g, size, -1).mean(1) for a, size, g in _runs(sizes)]
    return torch.cat(out) if len(out) > 1 else out[0]


def expand_example_groups(t: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """One row per example group (k, K) -> one per example (N, K), each group's row repeated ``size`` times (by
    ``expand``: its backward is a plain sum, deterministic)."""
    out, i = [], 0
    for _, size, g in _runs(sizes):
        block = t[i: i + g]
        out.append(block.unsqueeze(1).expand(g, size, block.shape[-1]).reshape(g * size, -1))
        i += g
    return torch.cat(out) if len(out) > 1 else out[0]


def example_group_moments(mu: torch.Tensor, var: torch.Tensor, sizes: Sequence[int]
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and biased variance of each (example group, channel group) block from the per-example moments
    ``mu``, ``var`` (N, G) of its examples (equal element counts): ``μ_e = mean μ_i``, ``σ²_e = mean (v_i +
    (μ_i − μ_e)²)`` (no E[x²] − μ² cancellation), as (k, G). Differentiable."""
    mean = example_group_means(mu, sizes)
    var_e = example_group_means(var + (mu - expand_example_groups(mean, sizes)).square(), sizes)
    return mean, var_e


class _ExampleGroupNorm(torch.autograd.Function):
    """Native CPU route of :func:`example_group_norm`: d2norm's block kernels (``native.py``
    ``block_norm_forward`` / ``block_norm_backward``), one task per (example group, channel group) block whose
    rows stay in cache: the forward reads x once and writes y once, the backward reads gy and x once and writes
    the input gradient once (closed form, below)."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, starts: torch.Tensor, eps: float):
        n = x.shape[0]
        none = x.new_empty(0)
        y, mu, var, bmean, brstd = native_module().block_norm_forward(
            x, starts, groups, none if weight is None else weight.contiguous(),
            none if bias is None else bias.contiguous(), float(eps))
        ctx.save_for_backward(x, weight, starts, bmean, brstd)
        ctx.groups = groups
        mu, var = mu.view(n, groups), var.view(n, groups)
        ctx.mark_non_differentiable(mu, var)
        return y, mu, var

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, _g_mu, _g_var):
        # The per-example moments are outputs for the layers' moving statistics only (non-differentiable).
        # Per block of M elements with x̂ = (x − μ_e)·r_e, A = Σ γ·gy, B = Σ γ·gy·x̂ (native kernel):
        #   dx = r·(γ·gy − A/M − x̂·B/M),   dγ_c = Σ gy·x̂,   dβ_c = Σ gy.
        x, weight, starts, bmean, brstd = ctx.saved_tensors
        n, c = x.shape[0], x.shape[1]
        gx, s_g, s_gxhat = native_module().block_norm_backward(
            gy.contiguous(), x, starts, ctx.groups, x.new_empty(0) if weight is None else weight.contiguous(),
            bmean, brstd, bool(ctx.needs_input_grad[0]))
        g_weight = s_gxhat.view(n, c).sum(0) if weight is not None and ctx.needs_input_grad[1] else None
        g_bias = s_g.view(n, c).sum(0) if ctx.needs_input_grad[2] else None
        return (gx if ctx.needs_input_grad[0] else None), g_weight, g_bias, None, None, None


def example_group_norm(
    x: torch.Tensor,
    groups: int,
    sizes: Sequence[int],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize each (example group × channel group) block of ``x`` (N, C, *) by its own mean and biased
    variance, then a per-channel affine: the training forward of GhostBN (channel groups of one channel,
    example groups = sub-batches, four-things eq 4) and BGN (four-things §3.4). ``sizes``: the contiguous example
    groups (summing to N, at most two distinct sizes in runs); ``groups`` divides C. Returns ``(y, μ_i, σ_i²)``
    with the per-(example, channel group) moments (N, G) for the layers' moving statistics (no gradient flows
    through them; the gradient of ``y`` is exact).

    On CPU (contiguous float32/float64, native kernels built): :class:`_ExampleGroupNorm`, one native kernel
    each way, block by block (x read once and y written once; gy and x read once and the input gradient
    written once), with no autograd graph of small ops around them. Elsewhere
    (CUDA, channels-last, no compiler): :func:`group_moments` + :func:`channel_affine` and autograd, same values
    and gradients (both tested against a float64 definition)."""
    sizes = tuple(int(s) for s in sizes)
    if native_for(x, 2) is not None:
        starts = torch.tensor((0,) + tuple(itertools.accumulate(sizes)), dtype=torch.long)
        return _ExampleGroupNorm.apply(x, weight, bias, groups, starts, eps)
    n, c = x.shape[0], x.shape[1]
    cpg = c // groups
    mu, var = group_moments(x, groups)
    mean_k, var_k = example_group_moments(mu, var, sizes)
    rstd = _channels(torch.rsqrt(expand_example_groups(var_k, sizes) + eps), cpg)
    mean = _channels(expand_example_groups(mean_k, sizes), cpg)
    scale = rstd if weight is None else rstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return channel_affine(x, scale, shift), mu.detach(), var.detach()
