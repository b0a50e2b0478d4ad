"""BatchStatsBN: rethinking §4.2, Table 3 (BN training; mini-batch statistics in inference)."""
import logging

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

import d2norm  # noqa: F401
import d2norm.layers.batch_stats_bn  # noqa: F401  (registers "BatchStatsBN")
from d2norm.layers.batch_stats_bn import BatchStatsBatchNorm2d
from d2norm.layers.registry import get_norm, norm_options

from helpers import assert_matches_reference, assert_trains_as_batchnorm, bn_train, buffers, d2norm_cfg, ema

C = 3


def _x(n=4, h=3, w=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, C, h, w, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)


def _layer(dtype=torch.float64, momentum=0.3, seed=1):
    m = BatchStatsBatchNorm2d(C, momentum=momentum).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.randn(C, generator=g) * 0.5 + 1)
        m.bias.copy_(torch.randn(C, generator=g))
        m.running_mean.copy_(torch.randn(C, generator=g))
        m.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    return m


def _cfg(**d2norm_bn):
    return d2norm_cfg("BN", **d2norm_bn)


@pytest.mark.parametrize("training", [True, False])
def test_matches_float64_reference_forward_backward(training):
    m = _layer().train(training)
    x = _x()
    before = buffers(m)
    assert_matches_reference(m, x, lambda x, w, b: bn_train(x, w, b, m.eps)[0], (0, 1e-10), (0, 1e-10))

    after = buffers(m)
    if training:  # EMA of mean and unbiased variance, counter + 1
        _, mean, unbiased = bn_train(x)
        torch.testing.assert_close(after["running_mean"], ema(before["running_mean"], mean, 0.3))
        torch.testing.assert_close(after["running_var"], ema(before["running_var"], unbiased, 0.3))
        assert after["num_batches_tracked"].item() == before["num_batches_tracked"].item() + 1
    else:
        for k in before:
            assert torch.equal(before[k], after[k]), k


def test_training_is_exactly_batchnorm2d():
    ours = _layer(torch.float32)
    assert_trains_as_batchnorm(ours, [_x(seed=10 + step, dtype=torch.float32) for step in range(3)])
    assert ours.num_batches_tracked.item() == 3


def test_eval_ignores_population_statistics_and_uses_each_batch():
    m = _layer().eval()
    x = _x()
    y = m(x)
    with torch.no_grad():
        m.running_mean.add_(100.0)
        m.running_var.mul_(50.0)
    assert torch.equal(m(x), y)  # EMA does not enter inference
    # statistics are those of the current batch: a sub-batch is normalized differently (Table 3 "1 img")
    assert not torch.allclose(m(x[:2]), y[:2])
    torch.testing.assert_close(m(x[:2]), bn_train(x[:2], m.weight, m.bias, m.eps)[0].detach())


def test_zero_size_input():
    m = _layer(torch.float32)
    before = buffers(m)
    x = torch.zeros(0, C, 4, 4)
    for training in (True, False):
        m.train(training)
        y = m(x)
        assert y.shape == x.shape
    after = buffers(m)
    for k in ("running_mean", "running_var"):
        assert torch.isfinite(after[k]).all() and torch.equal(after[k], before[k])


def test_bf16_input_float32_statistics():
    m = _layer(torch.float32)
    xf = _x(dtype=torch.float32).bfloat16().float()  # exactly representable in bf16
    ref = _layer(torch.float32)
    for training in (True, False):
        m.train(training), ref.train(training)
        y = m(xf.bfloat16())
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref(xf), rtol=2e-2, atol=2e-2)
    assert m.running_mean.dtype == torch.float32
    torch.testing.assert_close(m.running_mean, ref.running_mean, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-3, atol=1e-3)


def test_state_dict_roundtrip_and_bn_checkpoints(caplog):
    m = _layer(torch.float32)
    m(_x(dtype=torch.float32))
    bn = nn.BatchNorm2d(C)
    assert list(m.state_dict().keys()) == list(bn.state_dict().keys())
    fresh = BatchStatsBatchNorm2d(C)
    fresh.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k

    # plain nn.BatchNorm2d checkpoint
    bn = _layer(torch.float32, seed=5)
    plain = nn.BatchNorm2d(C)
    plain.load_state_dict(bn.state_dict())
    fresh.load_state_dict(plain.state_dict())
    for k, v in plain.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k

    # detectron2 FrozenBatchNorm2d: no num_batches_tracked -> kept, with a warning
    frozen = FrozenBatchNorm2d(C)
    with torch.no_grad():
        frozen.weight.copy_(torch.rand(C) + 0.5)
        frozen.bias.copy_(torch.randn(C))
        frozen.running_mean.copy_(torch.randn(C))
        frozen.running_var.copy_(torch.rand(C) + 0.5)
    nbt = fresh.num_batches_tracked.clone()
    with caplog.at_level(logging.WARNING):
        fresh.load_state_dict(frozen.state_dict())
    for k in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(fresh, k), getattr(frozen, k)), k
    assert torch.equal(fresh.num_batches_tracked, nbt)
    assert "num_batches_tracked" in caplog.text


def test_registry_builds_with_options_from_two_cfgs():
    with norm_options(_cfg(EPS=1e-3, MOMENTUM=0.05)):
        a = get_norm("BatchStatsBN", 8)
    with norm_options(_cfg(EPS=1e-4, MOMENTUM=0.2)):
        b = get_norm("BatchStatsBN", 8)
    assert type(a) is BatchStatsBatchNorm2d and type(b) is BatchStatsBatchNorm2d
    assert (a.eps, a.momentum, a.num_features) == (1e-3, 0.05, 8)
    assert (b.eps, b.momentum) == (1e-4, 0.2)
    x = torch.randn(2, 8, 3, 3) * 3 + 2
    a(x), b(x)
    mean = x.mean(dim=(0, 2, 3))
    torch.testing.assert_close(a.running_mean, 0.05 * mean)
    torch.testing.assert_close(b.running_mean, 0.2 * mean)


@pytest.mark.parametrize("key,value", [("EPS", -1.0), ("EPS", 0.0), ("MOMENTUM", 1.5), ("MOMENTUM", "fast")])
def test_bad_options_raise_value_error(key, value):
    with norm_options(_cfg(**{key: value})):
        with pytest.raises(ValueError, match=repr(value).replace(".", r"\.")):
            get_norm("BatchStatsBN", 4)


def test_non_4d_input_rejected():
    with pytest.raises(ValueError, match="NCHW"):
        _layer()(torch.randn(4, C, dtype=torch.float64))


def test_weight_decay_norm_applies_to_affine():
    from d2norm.solver import get_optimizer_params

    model = nn.Sequential(nn.Conv2d(C, C, 1), BatchStatsBatchNorm2d(C))
    groups = get_optimizer_params(model, base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.0)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(model[1].weight)] == 0.0 and decay[id(model[1].bias)] == 0.0
    assert decay[id(model[0].weight)] == 1e-4
