"""ExampleWeightedBN: four-things §3.1, eq 3 (inference example weighing)."""
import logging

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

import d2norm  # noqa: F401
import d2norm.layers.example_weighted_bn  # noqa: F401  (registers "ExampleWeightedBN")
from d2norm.layers.example_weighted_bn import ExampleWeightedBatchNorm2d
from d2norm.layers.registry import get_norm, norm_options

from helpers import assert_matches_reference, assert_trains_as_batchnorm, buffers, d2norm_cfg, numeric_grad

C = 3


def _x(n=4, h=3, w=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # per-sample offsets so instance statistics differ clearly from the population ones
    x = torch.randn(n, C, h, w, generator=g, dtype=torch.float64) * 3 + 2
    x = x + torch.randn(n, C, 1, 1, generator=g, dtype=torch.float64) * 2
    return x.to(dtype)


def _layer(alpha, dtype=torch.float64, momentum=0.3, seed=1):
    m = ExampleWeightedBatchNorm2d(C, alpha=alpha, momentum=momentum).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.randn(C, generator=g) * 0.5 + 1)
        m.bias.copy_(torch.randn(C, generator=g))
        m.running_mean.copy_(torch.randn(C, generator=g) + 1)
        m.running_var.copy_(torch.rand(C, generator=g) * 4 + 0.5)
    return m


def _ref_eq3(x, w, b, m_x, m_x2, alpha, eps):
    """four-things eq 3 in float64, literally: moments E[x_i], E[x_i^2] over H, W of each sample and channel,
    with the given moving moments m_x, m_{x^2}."""
    e1 = x.mean(dim=(2, 3), keepdim=True)
    e2 = (x * x).mean(dim=(2, 3), keepdim=True)
    m_x, m_x2 = m_x.view(1, -1, 1, 1), m_x2.view(1, -1, 1, 1)
    mu = alpha * e1 + (1 - alpha) * m_x
    var = (alpha * e2 + (1 - alpha) * m_x2) - mu**2
    return w.view(1, -1, 1, 1) * (x - mu) / torch.sqrt(var + eps) + b.view(1, -1, 1, 1)


def _m_x2(m):
    """The documented convention for the layer's m_{x²}: BN's running_var + running_mean² (so α = 0 is BN)."""
    return m.running_var + m.running_mean**2


def _cfg(alpha=None, **bn):
    cfg = d2norm_cfg("BN", **bn)
    if alpha is not None:
        cfg.D2NORM.EXAMPLE_WEIGHING.ALPHA = alpha
    return cfg


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.65, 1.0])
def test_eval_matches_float64_eq3_forward_backward(alpha):
    m = _layer(alpha).eval()
    before = buffers(m)
    assert_matches_reference(m, _x(), lambda x, w, b: _ref_eq3(x, w, b, m.running_mean, _m_x2(m), alpha, m.eps),
                             (0, 1e-9), (0, 1e-9))
    for k, v in buffers(m).items():  # eval never mutates a buffer
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_eval_gradient_equals_numerical_gradient_of_eq3(alpha):
    """The layer's backward (x, γ, β) against central differences of the float64 eq-3 reference."""
    m = _layer(alpha).eval()
    x = _x(n=2, h=2, w=3).requires_grad_(True)
    y = m(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (y * g).sum().backward()
    w, b = m.weight.detach().clone(), m.bias.detach().clone()
    ref = numeric_grad(lambda x_, w_, b_: _ref_eq3(x_, w_, b_, m.running_mean, _m_x2(m), alpha, m.eps),
                        [x.detach(), w, b], g)
    for got, exp in zip((x.grad, m.weight.grad, m.bias.grad), ref):
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-7)


def test_trained_moving_moments_follow_the_data():
    """m_x and m_{x²} after training on known batches, from the data (not from the layer's buffers): the EMA
    (momentum 0.3, from BN's init mean 0 / var 1) of the batch means and of the unbiased batch variances, and
    m_{x²} = that variance EMA + m_x² (the documented convention). Eval then equals eq 3 with them."""
    m = ExampleWeightedBatchNorm2d(C, alpha=0.35, momentum=0.3).double().train()
    ema_mean, ema_var = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for step in range(4):
        x = _x(n=3 + step, seed=20 + step)
        m(x)
        flat = x.transpose(0, 1).reshape(C, -1)
        ema_mean = 0.7 * ema_mean + 0.3 * flat.mean(1)
        ema_var = 0.7 * ema_var + 0.3 * flat.var(1, unbiased=True)
    m.eval()
    x = _x(seed=30)
    ref = _ref_eq3(x, m.weight.detach(), m.bias.detach(), ema_mean, ema_var + ema_mean**2, 0.35, m.eps)
    torch.testing.assert_close(m(x).detach(), ref, rtol=0, atol=1e-9)


def test_alpha_zero_is_exactly_batchnorm_eval():
    ours = _layer(0.0, torch.float32)
    bn = nn.BatchNorm2d(C)
    bn.load_state_dict(ours.state_dict())
    ours.eval(), bn.eval()
    x1 = _x(dtype=torch.float32).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = ours(x1), bn(x2)
    assert torch.equal(y1, y2)
    y1.square().sum().backward()
    y2.square().sum().backward()
    assert torch.equal(x1.grad, x2.grad) and torch.equal(ours.weight.grad, bn.weight.grad)


def test_alpha_one_is_instance_statistics_with_bn_affine():
    m = _layer(1.0).eval()
    x = _x()
    ref = F.instance_norm(x, eps=m.eps) * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)
    y = m(x)
    torch.testing.assert_close(y, ref.detach(), rtol=0, atol=1e-10)
    with torch.no_grad():  # population statistics play no part at alpha = 1
        m.running_mean.add_(10)
        m.running_var.mul_(7)
    torch.testing.assert_close(m(x), y, rtol=0, atol=1e-12)
    # ...and each sample is normalized independently of the others
    torch.testing.assert_close(m(x[1:2]), y[1:2], rtol=0, atol=1e-12)


def test_intermediate_alpha_differs_from_both_ends():
    x = _x()
    outs = [_layer(a).eval()(x).detach() for a in (0.0, 0.5, 1.0)]
    m = _layer(0.5)
    torch.testing.assert_close(outs[1], _ref_eq3(x, m.weight.detach(), m.bias.detach(), m.running_mean, _m_x2(m),
                                                  0.5, m.eps), rtol=0, atol=1e-9)
    # clearly between the two ends, not a rounding difference
    assert (outs[1] - outs[0]).abs().max() > 0.1 and (outs[1] - outs[2]).abs().max() > 0.1


def test_training_is_exactly_batchnorm2d():
    ours = _layer(0.7, torch.float32)
    assert_trains_as_batchnorm(ours, [_x(seed=10 + step, dtype=torch.float32) for step in range(3)])
    assert ours.num_batches_tracked.item() == 3


def test_zero_size_input():
    m = _layer(0.5, torch.float32)
    before = buffers(m)
    x = torch.zeros(0, C, 4, 4)
    for training in (False, True):
        m.train(training)
        y = m(x)
        assert y.shape == x.shape and y.dtype == x.dtype
    for k in ("running_mean", "running_var"):
        assert torch.isfinite(m.state_dict()[k]).all() and torch.equal(m.state_dict()[k], before[k])


def test_bf16_input_float32_statistics():
    m = _layer(0.3, torch.float32).eval()
    xf = _x(dtype=torch.float32).bfloat16().float()
    y = m(xf.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(xf), rtol=2e-2, atol=3e-2)
    ref = _ref_eq3(xf.double(), m.weight.double(), m.bias.double(), m.running_mean.double(),
                   _m_x2(m).double(), 0.3, m.eps)
    torch.testing.assert_close(y.double(), ref.detach(), rtol=2e-2, atol=3e-2)
    m.train()
    y = m(xf.bfloat16())
    assert y.dtype == torch.bfloat16 and m.running_mean.dtype == torch.float32


def test_state_dict_and_plain_bn_checkpoint(caplog):
    # a BN trained for a few steps, saved as a plain nn.BatchNorm2d checkpoint
    bn = nn.BatchNorm2d(C, momentum=0.5)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C) + 0.5)
        bn.bias.copy_(torch.randn(C))
    for s in range(3):
        bn(_x(seed=s, dtype=torch.float32))
    m = ExampleWeightedBatchNorm2d(C, alpha=0.0)
    assert list(m.state_dict().keys()) == list(bn.state_dict().keys())
    m.load_state_dict(bn.state_dict())
    bn.eval(), m.eval()
    x = _x(seed=9, dtype=torch.float32)
    assert torch.equal(m(x), bn(x))
    # round trip
    m2 = ExampleWeightedBatchNorm2d(C, alpha=0.0)
    m2.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k
    # FrozenBatchNorm2d state: statistics and affine map 1:1; missing counter reported
    frozen = FrozenBatchNorm2d(C)
    frozen.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"})
    m3 = ExampleWeightedBatchNorm2d(C, alpha=0.0).eval()
    with caplog.at_level(logging.WARNING):
        m3.load_state_dict(frozen.state_dict())
    assert "num_batches_tracked" in caplog.text
    torch.testing.assert_close(m3(x), frozen(x))


def test_registry_builds_with_options_from_two_cfgs():
    with norm_options(_cfg(alpha=0.25, EPS=1e-3)):
        a = get_norm("ExampleWeightedBN", C)
    with norm_options(_cfg(alpha=0.75)):
        b = get_norm("ExampleWeightedBN", C)
    assert type(a) is ExampleWeightedBatchNorm2d and type(b) is ExampleWeightedBatchNorm2d
    assert (a.alpha, a.eps) == (0.25, 1e-3) and (b.alpha, b.eps) == (0.75, 1e-5)
    a.eval(), b.eval()
    x = _x(dtype=torch.float32)
    torch.testing.assert_close(
        a(x).double(), _ref_eq3(x.double(), a.weight.double(), a.bias.double(), a.running_mean.double(),
                                _m_x2(a).double(), 0.25, 1e-3).detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a(x), b(x))


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "half"])
def test_bad_alpha_raises_value_error(alpha):
    with norm_options(_cfg(alpha=alpha)):
        with pytest.raises(ValueError, match=r"\[0, 1\].*" + repr(alpha).replace(".", r"\.")):
            get_norm("ExampleWeightedBN", C)
    # the same rule, public on the layer (tools/tune_example_weight.py checks --alphas with it)
    with pytest.raises(ValueError, match=r"\[0, 1\].*" + repr(alpha).replace(".", r"\.")):
        ExampleWeightedBatchNorm2d.check_alpha(alpha)
    assert ExampleWeightedBatchNorm2d.check_alpha(1) == 1.0 and type(ExampleWeightedBatchNorm2d.check_alpha(0)) is float


def test_bad_bn_options_and_no_running_stats_raise():
    with pytest.raises(ValueError, match="-0.5"):
        ExampleWeightedBatchNorm2d(C, momentum=-0.5)
    with pytest.raises(ValueError, match="track_running_stats"):
        ExampleWeightedBatchNorm2d(C, track_running_stats=False)


def test_weight_decay_norm_applies_to_affine():
    from d2norm.solver import get_optimizer_params

    model = nn.Sequential(nn.Conv2d(C, C, 1), ExampleWeightedBatchNorm2d(C, alpha=0.3))
    groups = get_optimizer_params(model, base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.0)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(model[1].weight)] == 0.0 and decay[id(model[1].bias)] == 0.0
    assert decay[id(model[0].weight)] == 1e-4
