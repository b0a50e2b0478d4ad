"""``inference_affine()``: every layer whose inference is a fixed per-channel affine map says so, with
(scale, shift) equal to an independent float64 formula and to its own eval forward; every other layer raises
``NotAnAffine`` with a reason (rethinking §4.3; used for folding, d2norm.deploy)."""
import pytest
import torch

import d2norm  # noqa: F401
from d2norm.layers import (
    AnySyncBatchNorm2d,
    BatchGroupNorm,
    BatchStatsBatchNorm2d,
    DomainBatchNorm2d,
    EvalNorm2d,
    ExampleWeightedBatchNorm2d,
    GhostBatchNorm2d,
    MABN2d,
    domain_scope,
)
from d2norm.layers.base import NotAnAffine
from d2norm.layers.frozen import FrozenBatchNorm

from helpers import bn_affine

C = 8


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _randomize(m, seed=0):
    """Random γ, β and population statistics (float64) in every parameter/buffer of ``m`` that has them."""
    g = _g(seed)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if not t.is_floating_point():
                continue
            if name in ("weight",):
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.5 + 1)
            elif name in ("bias", "running_mean"):
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) + 0.5)
            elif name in ("running_var", "running_chi"):
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * 3 + 0.3)
    return m


def _x(seed=3):
    g = _g(seed)
    return torch.randn(4, C, 5, 6, generator=g, dtype=torch.float64) * 2 + 1


AFFINE_CASES = {
    "BN-derived GhostBN": lambda: GhostBatchNorm2d(C, ghost_size=2),
    "AnySyncBN": lambda: AnySyncBatchNorm2d(C),
    "ExampleWeightedBN alpha=0": lambda: ExampleWeightedBatchNorm2d(C, alpha=0.0),
    "DomainBN shared": lambda: DomainBatchNorm2d(C, num_domains=3, pop_stats="shared"),
    "DomainBN K=1": lambda: DomainBatchNorm2d(C, num_domains=1, affine_per_domain=True),
    "FrozenBatchNorm": lambda: FrozenBatchNorm(C, eps=1e-3),
}


def _reference(name, m):
    if name.startswith("DomainBN K=1"):
        return bn_affine(m.running_mean[0], m.running_var[0], m.eps, m.weight[0], m.bias[0])
    return bn_affine(m.running_mean, m.running_var, m.eps, m.weight, m.bias)


@pytest.mark.parametrize("name", sorted(AFFINE_CASES))
def test_bn_like_layers_are_their_bn_affine(name):
    m = _randomize(AFFINE_CASES[name]().double()).eval()
    scale, shift = m.inference_affine()
    ref_scale, ref_shift = _reference(name, m)
    assert scale.shape == (C,) and shift.shape == (C,)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shift, ref_shift, rtol=1e-12, atol=1e-12)
    x = _x()
    with torch.no_grad():
        y = m(x)
    torch.testing.assert_close(y, x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), rtol=1e-12, atol=1e-12)
    assert not scale.requires_grad and not shift.requires_grad


def test_domain_bn_per_domain_is_affine_only_for_a_static_domain():
    m = _randomize(DomainBatchNorm2d(C, num_domains=3, affine_per_domain=True).double()).eval()
    with pytest.raises(NotAnAffine, match="no static domain"):
        m.inference_affine()
    x = _x()
    for k in range(3):
        ref = bn_affine(m.running_mean[k], m.running_var[k], m.eps, m.weight[k], m.bias[k])
        for scale, shift in (m.inference_affine(domain=k), _in_scope(m, k)):
            torch.testing.assert_close(scale, ref[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(shift, ref[1], rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            y = m(x, domain=k)
        torch.testing.assert_close(y, x * ref[0].view(1, -1, 1, 1) + ref[1].view(1, -1, 1, 1))
    with pytest.raises(NotAnAffine, match="out of range"):
        m.inference_affine(domain=3)


def _in_scope(m, k):
    with domain_scope(k):
        return m.inference_affine()


def test_mabn_inference_affine_is_gamma_over_chi_hat():
    m = _randomize(MABN2d(C).double()).eval()
    scale, shift = m.inference_affine()
    torch.testing.assert_close(scale, m.weight.detach() / m.running_chi, rtol=1e-12, atol=0)
    torch.testing.assert_close(shift, m.bias.detach(), rtol=0, atol=0)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(m(x), x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))


def test_bgn_alpha0_inference_affine_is_per_group_moving_statistics():
    groups = 4
    m = _randomize(BatchGroupNorm(C, num_groups=groups, alpha=0.0).double()).eval()
    scale, shift = m.inference_affine()
    cpg = C // groups
    mean = m.running_mean.repeat_interleave(cpg)
    var = m.running_var.repeat_interleave(cpg)  # m_{x²} − m_x², four-things eq 3 at α = 0
    ref = bn_affine(mean, var, m.eps, m.weight, m.bias)
    torch.testing.assert_close(scale, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shift, ref[1], rtol=1e-12, atol=1e-12)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(m(x), x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: BatchStatsBatchNorm2d(C), "mini-batch"),
        (lambda: EvalNorm2d(C), "own statistics"),
        (lambda: ExampleWeightedBatchNorm2d(C, alpha=0.2), "alpha=0.2"),
        (lambda: BatchGroupNorm(C, num_groups=4, alpha=0.5), "alpha=0.5"),
        (lambda: GhostBatchNorm2d(C, track_running_stats=False), "track_running_stats=False"),
    ],
)
def test_per_sample_statistics_layers_are_not_affine(make, reason):
    m = _randomize(make().double()).eval()
    with pytest.raises(NotAnAffine, match=reason):
        m.inference_affine()
    # and indeed: their eval output is not one fixed per-channel affine map of x (two inputs, two fits differ)
    x1, x2 = _x(5), _x(6) * 3 - 2
    with torch.no_grad():
        y1, y2 = m(x1), m(x2)
    s1 = ((y1 - y1.mean((0, 2, 3), keepdim=True)) * (x1 - x1.mean((0, 2, 3), keepdim=True))).sum((0, 2, 3))
    s1 = s1 / (x1 - x1.mean((0, 2, 3), keepdim=True)).square().sum((0, 2, 3))
    s2 = ((y2 - y2.mean((0, 2, 3), keepdim=True)) * (x2 - x2.mean((0, 2, 3), keepdim=True))).sum((0, 2, 3))
    s2 = s2 / (x2 - x2.mean((0, 2, 3), keepdim=True)).square().sum((0, 2, 3))
    assert (s1 - s2).abs().max() > 1e-3
