"""Batch Renormalization ("BRN", the mabn Tables 3/5 baseline) against an independent float64 reference written
from Ioffe 2017, Algorithm 1 (r, d as stop-gradient corrections, moving statistics updated after the step),
forward and backward, with r and d clipped, through the schedule of r_max / d_max; eval is BN's; the layer
protocol (PreciseBN, FrozenBN, folding) treats it as BN."""
import copy

import pytest
import torch
from torch import nn

import d2norm  # noqa: F401
from d2norm.layers import norm_layer
from d2norm.layers.batch_renorm import BatchRenorm2d, brn_limits

EPS = 1e-5


def ref_brn_step(x, w, b, mu, var, r_max, d_max, momentum):
    """Ioffe 2017 Algorithm 1 in float64 (σ = sqrt(running_var + ε)): (y, new running mean, new running var)."""
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mu_b = x.mean(dim=(0, 2, 3))
    var_b = ((x - mu_b.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    sigma_b = torch.sqrt(var_b + EPS)
    sigma = torch.sqrt(var + EPS)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max).detach()
    d = torch.clamp((mu_b - mu) / sigma, -d_max, d_max).detach()
    xhat = (x - mu_b.view(1, -1, 1, 1)) / sigma_b.view(1, -1, 1, 1) * r.view(1, -1, 1, 1) + d.view(1, -1, 1, 1)
    y = w.view(1, -1, 1, 1) * xhat + b.view(1, -1, 1, 1)
    new_mu = (1 - momentum) * mu + momentum * mu_b.detach()
    new_var = (1 - momentum) * var + momentum * var_b.detach() * n / (n - 1)
    return y, new_mu, new_var, r, d


def test_schedule_follows_ioffe():
    lim = lambda t: brn_limits(t, 3.0, 5.0, 5000, 40000, 25000)  # noqa: E731
    assert lim(0) == (1.0, 0.0) and lim(4999) == (1.0, 0.0)
    assert lim(5000) == (1.0, 0.0)
    assert lim(22500) == pytest.approx((2.0, 4.375))
    assert lim(25000) == pytest.approx((1.0 + 2 * 20000 / 35000, 5.0))
    assert lim(40000) == (3.0, 5.0) and lim(10 ** 6) == (3.0, 5.0)


def test_training_matches_reference_with_clipping_through_the_schedule():
    g = torch.Generator().manual_seed(0)
    C = 6
    layer = BatchRenorm2d(C, r_max=2.0, d_max=0.5, warmup_iters=1, r_max_iters=3, d_max_iters=2, momentum=0.2,
                          eps=EPS).double()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
        layer.running_mean.copy_(torch.randn(C, generator=g, dtype=torch.float64) * 3)  # far from the batches
        layer.running_var.copy_(torch.rand(C, generator=g, dtype=torch.float64) * 0.1 + 0.05)
    mu, var = layer.running_mean.clone(), layer.running_var.clone()
    clipped = 0
    for step in range(5):
        x = (torch.randn(3, C, 4, 5, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_(True)
        dy = torch.randn(3, C, 4, 5, generator=g, dtype=torch.float64)
        r_max, d_max = brn_limits(step, 2.0, 0.5, 1, 3, 2)
        xr = x.detach().clone().requires_grad_(True)
        w = layer.weight.detach().clone().requires_grad_(True)
        b = layer.bias.detach().clone().requires_grad_(True)
        y_ref, mu, var, r, d = ref_brn_step(xr, w, b, mu, var, r_max, d_max, 0.2)
        (y_ref * dy).sum().backward()
        layer.zero_grad()
        y = layer.train()(x)
        (y * dy).sum().backward()
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, b.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_mean, mu, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-12, atol=1e-12)
        clipped += int(((r - 1 / r_max).abs() < 1e-12).any() or ((r - r_max).abs() < 1e-12).any())
        clipped += int(((d.abs() - d_max).abs() < 1e-12).any())
    assert clipped >= 3  # the corrections were clipped in several steps: the test exercises the clip
    assert int(layer.num_batches_tracked) == 5


def test_warmup_is_batchnorm_training_and_eval_is_batchnorm():
    g = torch.Generator().manual_seed(1)
    brn = BatchRenorm2d(4, momentum=0.1).double()  # step 0 < 5000: r = 1, d = 0
    bn = nn.BatchNorm2d(4, momentum=0.1).double()
    bn.load_state_dict(brn.state_dict())
    x = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(brn.train()(x), bn.train()(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(brn.running_var, bn.running_var)
    torch.testing.assert_close(brn.eval()(x), bn.eval()(x), rtol=1e-12, atol=1e-12)
    # the layer protocol: BN's fixed inference affine (folding, FrozenBN)
    scale, shift = brn.inference_affine()
    torch.testing.assert_close(brn(x), x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), rtol=1e-12, atol=1e-12)


def test_precise_bn_and_frozen_bn_through_the_protocol():
    from d2norm.layers.frozen import FrozenBatchNorm, freeze_bn_layers
    from d2norm.stats import recompute_population_stats

    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchRenorm2d(4)).double()
    data = [torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) * 2 + 3 for _ in range(3)]
    recompute_population_stats(model, data, num_samples=12, batch_size=4, progress=False)
    with torch.no_grad():
        h = torch.cat([model[0](d) for d in data])
    torch.testing.assert_close(model[1].running_mean, h.mean(dim=(0, 2, 3)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, h.var(dim=(0, 2, 3)), rtol=1e-10, atol=1e-12)
    frozen = copy.deepcopy(model)
    freeze_bn_layers(frozen, True)
    assert isinstance(frozen[1], FrozenBatchNorm)
    torch.testing.assert_close(frozen.eval()(data[0]), model.eval()(data[0]), rtol=1e-10, atol=1e-12)


def test_options_from_cfg_and_bad_values_name_the_key():
    from detectron2.config import get_cfg

    from d2norm.layers.registry import get_norm, norm_options

    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.D2NORM.BRN.R_MAX = 2.5
    with norm_options(cfg):
        layer = get_norm("BRN", 8)
    assert isinstance(layer, BatchRenorm2d) and layer.r_max == 2.5 and layer.momentum == 0.02
    with pytest.raises(ValueError, match=r"D2NORM.BRN.R_MAX"):
        norm_layer("BRN", r_max=0.5)(8)
    with pytest.raises(ValueError, match=r"D2NORM.BRN.MOMENTUM"):
        norm_layer("BRN", momentum=0.0)(8)
