"""Exact pooling of per-part moments (count, mean, biased variance) into the moments of the union.

Chan, Golub & LeVeque's parallel merge, written for any number of parts at once: with counts c_p, means m_p
and biased variances v_p of P disjoint parts (ranks, domains, sub-batches),

    M = Σ c_p,    μ = Σ (c_p / M)·m_p,    σ² = Σ (c_p / M)·(v_p + (m_p − μ)²)

is the mean and biased variance of the concatenation. Unlike E[x²] − E[x]² (which cancels catastrophically in
float32 when |μ| ≫ σ, rethinking A.10 "numerical precision") every term is non-negative and centered, so the
result is as accurate as the per-part moments. Differentiable (autograd flows into every part's moments);
parts with c_p = 0 contribute nothing (their mean/variance may be anything finite).
"""
from typing import Tuple

import torch

__all__ = ["pooled_moments"]


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
