"""Independent float64 references of BatchNorm, written from its definition (rethinking §2 eq 1: y = γ·(x − μ)/
sqrt(σ² + ε) + β with the mini-batch mean and biased variance per channel; A.6: one normalization batch may be
spread over several tensors, e.g. ranks) and torch's EMA convention (unbiased variance). Never from d2norm code."""
from typing import List, Sequence, Tuple, Union

import torch

__all__ = ["batch_moments", "bn_normalize", "bn_train", "bn_affine", "ema", "numeric_grad", "TABLE5_ROWS"]

#: rethinking Table 5 rows as (training statistics, population statistics, affine per domain)
TABLE5_ROWS = {
    1: ("shared", "shared", False),
    2: ("shared", "per_domain", False),
    3: ("per_domain", "shared", False),
    4: ("per_domain", "per_domain", False),
    5: ("per_domain", "shared", True),
    6: ("per_domain", "per_domain", True),
}


def _c(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, 1, 1)


def batch_moments(xs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Per channel over the union of the elements of every (N, C, H, W) tensor in ``xs``: (μ, biased σ², M)."""
    flat = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs], dim=1)
    m = flat.shape[1]
    mu = flat.sum(1) / max(m, 1)
    var = ((flat - mu[:, None]) ** 2).sum(1) / max(m, 1)
    return mu, var, m


def bn_normalize(x, mean, var, eps, w=None, b=None) -> torch.Tensor:
    """y = (x − μ)/sqrt(σ² + ε)·γ + β per channel (no affine when ``w`` is None)."""
    y = (x - _c(mean)) / torch.sqrt(_c(var) + eps)
    return y * _c(w) + _c(b) if w is not None else y


def bn_train(xs: Union[torch.Tensor, Sequence[torch.Tensor]], w=None, b=None, eps: float = 1e-5):
    """Training-mode BN of one normalization batch (a tensor, or a list of tensors whose elements are pooled):
    ``(outputs, μ, unbiased σ²)``, the outputs in the shape of ``xs``; μ and unbiased σ² feed the EMA."""
    single = torch.is_tensor(xs)
    parts: List[torch.Tensor] = [xs] if single else list(xs)
    mu, var, m = batch_moments(parts)
    ys = [bn_normalize(x, mu, var, eps, w, b) for x in parts]
    unbiased = var * m / (m - 1) if m > 1 else var
    return (ys[0] if single else ys), mu, unbiased


def bn_affine(mean, var, eps, w, b) -> Tuple[torch.Tensor, torch.Tensor]:
    """BN inference as ``(scale, shift)`` in float64: scale = γ/sqrt(σ² + ε), shift = β − μ·scale."""
    mean, var, w, b = (t.detach().double() for t in (mean, var, w, b))
    scale = w / torch.sqrt(var + eps)
    return scale, b - mean * scale


def ema(running, value, momentum: float):
    """torch's EMA update: (1 − momentum)·running + momentum·value."""
    return (1 - momentum) * running + momentum * value


def numeric_grad(f, inputs: Sequence[torch.Tensor], g: torch.Tensor, h: float = 1e-6) -> List[torch.Tensor]:
    """Central differences of Σ f(*inputs)·g w.r.t. every input (float64): checks a layer's backward
    independently of torch's autograd through a reference."""
    grads = []
    for i, t in enumerate(inputs):
        grad = torch.zeros_like(t)
        for j in range(t.numel()):
            up = [u.detach().clone() for u in inputs]
            dn = [u.detach().clone() for u in inputs]
            up[i].view(-1)[j] += h
            dn[i].view(-1)[j] -= h
            grad.view(-1)[j] = ((f(*up) * g).sum() - (f(*dn) * g).sum()) / (2 * h)
        grads.append(grad)
    return grads
