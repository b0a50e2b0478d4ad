"""Statistics numerics every layer and estimator shares, the bottom of d2norm (imports only torch): the
dtype rule (:func:`stat_dtype`), the zero-size passthrough (:func:`empty_passthrough`), one batch's moments
(:func:`batch_moments`) and the exact pooling of per-part moments (:func:`pooled_moments`, Chan's merge: the
estimators' accumulators merge through it too).

Exact pooling of per-part moments (count, mean, biased variance) into the moments of the union.

Chan, Golub & LeVeque's parallel merge, written for any number of parts at once: with counts c_p, means m_p
and biased variances v_p of P disjoint parts (ranks, domains, sub-batches),

    M = Σ c_p,    μ = Σ (c_p / M)·m_p,    σ² = Σ (c_p / M)·(v_p + (m_p − μ)²)

is the mean and biased variance of the concatenation. Unlike E[x²] − E[x]² (which cancels catastrophically in
float32 when |μ| ≫ σ, rethinking A.10 "numerical precision") every term is non-negative and centered, so the
result is as accurate as the per-part moments. Differentiable (autograd flows into every part's moments);
parts with c_p = 0 contribute nothing (their mean/variance may be anything finite).
"""
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["stat_dtype", "empty_passthrough", "batch_moments", "pooled_moments"]


def pooled_moments(counts: torch.Tensor, means: torch.Tensor, vars_: torch.Tensor, dim: int = 0
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(M, μ, σ²)`` of the union of the parts indexed by ``dim``.

    ``counts`` broadcasts against ``means``/``vars_`` (e.g. (P, 1) against (P, C)). ``M`` keeps ``dim`` reduced
    away; when every count is 0 the statistics are 0 (never NaN).
    """
    total = counts.sum(dim)
    w = counts / total.unsqueeze(dim).clamp(min=1)
    mean = (w * means).sum(dim)
    var = (w * (vars_ + (means - mean.unsqueeze(dim)).square())).sum(dim)
    return total, mean, var


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype normalization statistics are computed in for inputs of ``dtype``: float32 for fp16/bf16 (their
    sums of squares overflow or lose precision), the input's own dtype otherwise (float32, float64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def empty_passthrough(x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What every layer returns for a zero-size input (rethinking A.10, empty inputs): a zero-size output of the
    input's shape and dtype, with no statistics computed and no buffer touched, still connected to the per-channel
    γ/β (so autograd and DDP see them used on every rank)."""
    if weight is None:
        return x.clone()
    view = [1, -1] + [1] * (x.dim() - 2)
    return x * weight.to(x.dtype).view(view) + bias.to(x.dtype).view(view)


def batch_moments(x: torch.Tensor, dims: Sequence[int]):
    """``(n, mean, biased var)`` of ``x`` reduced over ``dims``; statistics in float32 for fp16/bf16 input."""
    sd = stat_dtype(x.dtype)
    n = 1
    for d in dims:
        n *= x.shape[d]
    var, mean = torch.var_mean(x.to(sd), dim=tuple(dims), correction=0)
    return n, mean, var
