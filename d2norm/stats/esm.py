"""Estimation shift magnitude (estimation-shift §4.2, Def. 2).

Def. 2: with {μ̃, σ̃²} the expected population statistics of a BN layer (Def. 1: mean / variance of its input
on the test set S' through the trained model as used at test time, see
:func:`d2norm.stats.probe.expected_population_stats`) and {μ̂, σ̂²} the estimated ones (the layer's
``running_mean`` / ``running_var``),

    ESM_μ = ‖μ̂ − μ̃‖₂,        ESM_σ = ‖sqrt(σ̂²) − sqrt(σ̃²)‖₂

(L² norm over the layer's channels). The L² norm of C channel shifts grows like √C, so layers of different width
are compared by the per-channel (root-mean-square) values ESM/√C, reported as ``esm_mu_rms`` /
``esm_sigma_rms`` next to the raw ones. Computed in float64. Variance convention: both σ̂² and σ̃² are unbiased
(torch stores the EMA of the unbiased batch variance; σ̃² is the unbiased variance of the N·H·W test values, for
which the Bessel factor is 1 + O(1/(N·H·W))). A per-domain layer (DomainBN, one set per FPN level) has one
set of statistics per slot; its ESM is the L² norm over all (slot, channel) entries that saw test data, and the
per-slot values are reported too. Accumulation with depth (§4.2.1: ESM grows in deeper layers when lower
layers are shifted) is read off the layers in the order of their first call.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .estimators import PopulationEstimate

__all__ = ["estimation_shift_magnitude", "layer_esm", "model_layer_esm"]


def estimation_shift_magnitude(est_mean, est_var, exp_mean, exp_var) -> Tuple[float, float]:
    """(ESM_μ, ESM_σ) of Def. 2 for one set of statistics (tensors of the same shape), float64. Negative
    variances (impossible for real statistics) are clamped to 0 before the square root."""
    em, ev = torch.as_tensor(est_mean, dtype=torch.float64), torch.as_tensor(est_var, dtype=torch.float64)
    xm, xv = torch.as_tensor(exp_mean, dtype=torch.float64), torch.as_tensor(exp_var, dtype=torch.float64)
    if not (em.shape == ev.shape == xm.shape == xv.shape):
        raise ValueError(
            f"ESM: estimated and expected statistics must have the same shape, got {tuple(em.shape)}, "
            f"{tuple(ev.shape)}, {tuple(xm.shape)}, {tuple(xv.shape)}"
        )
    esm_mu = torch.linalg.vector_norm(em - xm).item()
    esm_sigma = torch.linalg.vector_norm(ev.clamp(min=0).sqrt() - xv.clamp(min=0).sqrt()).item()
    return esm_mu, esm_sigma


def layer_esm(
    estimated: Dict[str, Sequence[Tuple[torch.Tensor, torch.Tensor]]],
    expected: Dict[str, Sequence[Optional[PopulationEstimate]]],
    order: Sequence[str],
    layer_types: Optional[Dict[str, str]] = None,
) -> List[dict]:
    """Def. 2 for every layer, in ``order`` (depth order).

    Args:
        estimated: ``{name: [(μ̂, σ̂²) per slot]}`` (e.g. :func:`d2norm.stats.probe.estimated_stats`).
        expected: ``{name: [PopulationEstimate or None per slot]}`` (Def. 1).
        order: layer names, first-called first.
    Returns:
        one dict per layer that saw test data: ``{"layer", "depth", "type", "esm_mu", "esm_sigma",
        "num_channels", "esm_mu_rms", "esm_sigma_rms", "num_values", "slots": [{"slot", "esm_mu", "esm_sigma"},
        ...]}`` (depth counts from 0; ``num_channels`` = statistics entries compared, channels x slots with test
        data; ``*_rms`` = value / sqrt(num_channels)).
    """
    out = []
    for name in order:
        slots, em, ev, xm, xv = [], [], [], [], []
        n = 0.0
        for k, (est, exp) in enumerate(zip(estimated[name], expected[name])):
            if exp is None:
                continue
            mu, sigma = estimation_shift_magnitude(est[0], est[1], exp.mean, exp.var)
            slots.append({"slot": k, "esm_mu": mu, "esm_sigma": sigma})
            em.append(est[0].double().reshape(-1).cpu())
            ev.append(est[1].double().reshape(-1).cpu())
            xm.append(exp.mean.reshape(-1).cpu())
            xv.append(exp.var.reshape(-1).cpu())
            n += exp.count
        if not slots:
            continue
        mu, sigma = estimation_shift_magnitude(torch.cat(em), torch.cat(ev), torch.cat(xm), torch.cat(xv))
        channels = int(sum(t.numel() for t in em))
        out.append({
            "layer": name,
            "depth": len(out),
            "type": (layer_types or {}).get(name, ""),
            "esm_mu": mu,
            "esm_sigma": sigma,
            "num_channels": channels,
            "esm_mu_rms": mu / channels ** 0.5,
            "esm_sigma_rms": sigma / channels ** 0.5,
            "num_values": n,
            "slots": slots,
        })
    return out


def model_layer_esm(model: nn.Module, expected) -> List[dict]:
    """:func:`layer_esm` of ``model``'s layers against :class:`~d2norm.stats.probe.ExpectedStats`."""
    from .probe import estimated_stats, probed_layers

    layers = probed_layers(model)
    names = [n for n in expected.order if n in layers]
    return layer_esm(
        {n: estimated_stats(layers[n]) for n in names}, expected.estimates, names,
        {n: type(layers[n]).__name__ for n in names},
    )

