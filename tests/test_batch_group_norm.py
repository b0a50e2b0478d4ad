"""Batch-Group Norm (four-things §3.4) with inference example weighing (§3.1, eq 3).

The float64 references below are written from the paper's equations with explicit loops over example groups
and channel groups; they do not use the implementation.
"""

import pytest
import torch
from torch import nn

import d2norm  # noqa: F401  (compat + registry)
import d2norm.layers.batch_group_norm  # noqa: F401  (registers "BGN")
from d2norm.layers.base import D2NormModule
from d2norm.layers.batch_group_norm import BatchGroupNorm, example_group_sizes

from helpers import buffers, numeric_grad

torch.set_num_threads(1)
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


# ----------------------------------------------------------------------------------------------------------
# independent float64 references
# ----------------------------------------------------------------------------------------------------------
def ref_groups(n, size):
    """Documented rule: ceil(n/size) contiguous groups, sizes differ by <= 1, larger first."""
    if n == 0:
        return []
    k = -(-n // size)
    bounds, start = [], 0
    for j in range(k):
        s = n // k + (1 if j < n % k else 0)
        bounds.append((start, start + s))
        start += s
    assert start == n
    return bounds


def _affine(z, w, b, c0, c1):
    shape = (1, -1) + (1,) * (z.dim() - 2)
    return z * w[c0:c1].reshape(shape) + b[c0:c1].reshape(shape)


def ref_train(x, G, size, w, b, eps):
    """§3.4: statistics over (examples of the example group) x (channels of the channel group) x positions;
    variance as E[x²] − E[x]² (the paper's parametrization, eq 3/4); eq 1 with per-channel γ, β."""
    N, C = x.shape[:2]
    cpg = C // G
    rows = []
    for s0, s1 in ref_groups(N, size):
        cols = []
        for g in range(G):
            c0, c1 = g * cpg, (g + 1) * cpg
            blk = x[s0:s1, c0:c1]
            mu = blk.mean()
            var = (blk * blk).mean() - mu * mu
            cols.append(_affine((blk - mu) / torch.sqrt(var + eps), w, b, c0, c1))
        rows.append(torch.cat(cols, 1))
    return torch.cat(rows, 0)


def ref_eval(x, G, alpha, m, m2, w, b, eps):
    """eq 3 per example i and channel group g: μ = αE[x_i] + (1−α)m_x; σ² = αE[x_i²] + (1−α)m_{x²} − μ²."""
    N, C = x.shape[:2]
    cpg = C // G
    rows = []
    for i in range(N):
        cols = []
        for g in range(G):
            c0, c1 = g * cpg, (g + 1) * cpg
            blk = x[i : i + 1, c0:c1]
            mu = alpha * blk.mean() + (1 - alpha) * m[g]
            var = alpha * (blk * blk).mean() + (1 - alpha) * m2[g] - mu * mu
            cols.append(_affine((blk - mu) / torch.sqrt(var + eps), w, b, c0, c1))
        rows.append(torch.cat(cols, 1))
    return torch.cat(rows, 0)


def ref_ema(x, G, r_mean, r_sq, momentum):
    """Documented moving statistics: EMA of the batch E[x] and E[x²] of each channel group."""
    C = x.shape[1]
    cpg = C // G
    bm = torch.stack([x[:, g * cpg : (g + 1) * cpg].mean() for g in range(G)])
    bsq = torch.stack([(x[:, g * cpg : (g + 1) * cpg] ** 2).mean() for g in range(G)])
    return (1 - momentum) * r_mean + momentum * bm, (1 - momentum) * r_sq + momentum * bsq


def make(C=8, G=4, size=2, alpha=0.5, eps=1e-5, momentum=0.1, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = BatchGroupNorm(C, num_groups=G, example_group_size=size, alpha=alpha, eps=eps, momentum=momentum)
    with torch.no_grad():
        m.weight.copy_(torch.rand(C) + 0.5)
        m.bias.copy_(torch.randn(C))
    return m.to(dtype)


def rand_x(*shape, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)


def set_moving_stats(m, G, seed=2):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(G, generator=g, dtype=torch.float64) * 2 + 1
    var = torch.rand(G, generator=g, dtype=torch.float64) * 4 + 0.5
    with torch.no_grad():
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)  # = m_{x²} − m_x²
    return mean, var + mean**2


def grads(fn, x, params):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    gs = torch.autograd.grad((y * gy).sum(), [x] + list(params))
    return y.detach(), gs


# ----------------------------------------------------------------------------------------------------------
# training forward/backward vs. the reference
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "N,C,G,size,spatial",
    [
        (4, 8, 4, 2, (3, 5)),  # divisible: two groups of two
        (5, 8, 2, 2, (3, 3)),  # remainder: groups [2, 2, 1], no example dropped
        (7, 6, 3, 3, (2, 3)),  # remainder: groups [3, 2, 2]
        (3, 8, 4, 4, (4, 4)),  # N < size: one group of 3
        (6, 8, 8, 3, (5,)),  # 3-d input, one channel per group
        (4, 6, 1, 2, ()),  # 2-d input (N, C), all channels one group
    ],
)
def test_train_matches_reference_forward_backward(N, C, G, size, spatial):
    m = make(C, G, size)
    m.train()
    x = rand_x(N, C, *spatial)
    y, (gx, gw, gb) = grads(m, x, [m.weight, m.bias])
    w, b = m.weight.detach().clone().requires_grad_(True), m.bias.detach().clone().requires_grad_(True)
    yr, (gxr, gwr, gbr) = grads(lambda t: ref_train(t, G, size, w, b, 1e-5), x, [w, b])
    assert y.shape == x.shape
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, gxr, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gw, gwr, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gb, gbr, rtol=1e-9, atol=1e-10)


def test_example_groups_are_independent_in_training():
    """Changing examples of one example group never changes another group's output (and does change its own)."""
    m = make(8, 4, 2).train()
    x = rand_x(4, 8, 3, 3)
    x2 = x.clone()
    x2[2:] = x2[2:] * 5 - 1
    y, y2 = m(x), m(x2)
    assert torch.equal(y[:2], y2[:2])
    assert not torch.allclose(y[2:], y2[2:])


def test_example_group_sizes_rule():
    assert example_group_sizes(4, 2) == [2, 2]
    assert example_group_sizes(5, 2) == [2, 2, 1]
    assert example_group_sizes(7, 3) == [3, 2, 2]
    assert example_group_sizes(3, 4) == [3]
    assert example_group_sizes(0, 2) == []
    for n in range(1, 12):
        for s in range(1, 6):
            sizes = example_group_sizes(n, s)
            assert sum(sizes) == n and max(sizes) <= s and max(sizes) - min(sizes) <= 1
            assert [b - a for a, b in ref_groups(n, s)] == sizes


@pytest.mark.parametrize("training", [True, False])
def test_gradients_equal_numerical_gradients_of_the_references(training):
    """The layer's backward (x, γ, β) against central differences of the float64 references (§3.4 training,
    eq 3 inference with α = 0.3); eval leaves every buffer unchanged."""
    G = 2
    m = make(4, G, 2, alpha=0.3)
    mx, mx2 = set_moving_stats(m, G)
    m.train(training)
    x = rand_x(3, 4, 2, 2).requires_grad_(True)
    before = buffers(m)
    y = m(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (y * g).sum().backward()
    if training:
        ref = lambda x_, w_, b_: ref_train(x_, G, 2, w_, b_, 1e-5)  # noqa: E731
    else:
        ref = lambda x_, w_, b_: ref_eval(x_, G, 0.3, mx, mx2, w_, b_, 1e-5)  # noqa: E731
        for k, v in buffers(m).items():
            assert torch.equal(v, before[k]), k
    expected = numeric_grad(ref, [x.detach(), m.weight.detach(), m.bias.detach()], g)
    for got, exp in zip((x.grad, m.weight.grad, m.bias.grad), expected):
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# moving statistics
# ----------------------------------------------------------------------------------------------------------
def test_ema_update_matches_documented_rule():
    G = 4
    m = make(8, G, 2, momentum=0.1).train()
    rm, rsq = m.running_mean.clone(), m.running_var + m.running_mean**2
    assert torch.equal(rm, torch.zeros(G, dtype=torch.float64)) and torch.equal(rsq, torch.ones(G, dtype=torch.float64))
    for step, n in enumerate((4, 5, 1), start=1):  # uneven and single-example batches too
        x = rand_x(n, 8, 3, 3, seed=10 + step)
        before = buffers(m)
        m(x)
        rm, rsq = ref_ema(x, G, rm, rsq, 0.1)
        torch.testing.assert_close(m.running_mean, rm, rtol=1e-12, atol=1e-12)
        # m_{x²} (the literal EMA of E[x²]) = running_var + m_x²
        torch.testing.assert_close(m.running_var, rsq - rm**2, rtol=1e-12, atol=1e-12)
        assert int(m.num_batches_tracked) == step
        # train mode updates exactly the documented buffers, all of them
        assert set(before) == set(BUFFERS)
        for k in BUFFERS:
            assert not torch.equal(before[k], buffers(m)[k]), k
    assert torch.all(m.running_var >= 0)


def test_ema_cumulative_when_momentum_none():
    m = make(4, 2, 2, momentum=None).train()
    xs = [rand_x(2, 4, 3, 3, seed=s) for s in range(3)]
    for x in xs:
        m(x)
    allx = torch.cat(xs)  # equal-size batches: cumulative average = average over all of them
    torch.testing.assert_close(m.running_mean, torch.stack([allx[:, :2].mean(), allx[:, 2:].mean()]))
    sq = torch.stack([(allx[:, :2] ** 2).mean(), (allx[:, 2:] ** 2).mean()])
    torch.testing.assert_close(m.running_var, sq - m.running_mean**2)


# ----------------------------------------------------------------------------------------------------------
# inference (eq 3)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_eval_matches_eq3_forward_backward(alpha):
    G = 4
    m = make(8, G, 2, alpha=alpha)
    mx, mx2 = set_moving_stats(m, G)
    m.eval()
    x = rand_x(3, 8, 3, 4)
    before = buffers(m)
    y, (gx, gw, gb) = grads(m, x, [m.weight, m.bias])
    w, b = m.weight.detach().clone().requires_grad_(True), m.bias.detach().clone().requires_grad_(True)
    yr, (gxr, gwr, gbr) = grads(lambda t: ref_eval(t, G, alpha, mx, mx2, w, b, 1e-5), x, [w, b])
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, gxr, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gw, gwr, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gb, gbr, rtol=1e-9, atol=1e-10)
    for k, v in buffers(m).items():  # eval never mutates a buffer
        assert torch.equal(v, before[k]), k


def test_eval_alpha0_uses_only_moving_statistics():
    """α = 0: y = γ (x − m_x)/sqrt(m_{x²} − m_x² + eps) + β, independent of the example's own statistics."""
    G = 2
    m = make(4, G, 2, alpha=0.0).eval()
    mx, mx2 = set_moving_stats(m, G)
    x = rand_x(2, 4, 3, 3)
    y = m(x)
    cg = torch.arange(4) // 2
    scale = (m.weight / torch.sqrt(mx2 - mx**2 + 1e-5)[cg]).view(1, -1, 1, 1)
    expected = (x - mx[cg].view(1, -1, 1, 1)) * scale + m.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(y, expected.detach(), rtol=1e-12, atol=1e-12)
    # per-element affine map: changing other elements of the example changes nothing else
    x2 = x.clone()
    x2[0, 0, 0, 0] += 10
    d = (m(x2) - y).abs()
    assert d[0, 0, 0, 0] > 0 and d.flatten()[1:].max() == 0


def test_eval_alpha1_is_groupnorm_and_ignores_moving_stats():
    m = make(8, 4, 2, alpha=1.0).eval()
    x = rand_x(3, 8, 3, 3)
    y = m(x)
    with torch.no_grad():  # the inference route without a graph (CPU: the native eq-3 kernel)
        y_ng = m(x)
        m.running_mean.fill_(float("nan"))  # never read with α = 1
        m.running_var.fill_(float("inf"))
        assert torch.equal(m(x), y_ng)
    assert torch.equal(m(x), y)
    torch.testing.assert_close(y_ng, y.detach(), rtol=1e-13, atol=1e-13)
    gn = _groupnorm_like(m)
    torch.testing.assert_close(y, gn(x).detach(), rtol=1e-12, atol=1e-12)


def test_eval_examples_are_independent():
    m = make(8, 4, 2, alpha=0.5).eval()
    set_moving_stats(m, 4)
    x = rand_x(3, 8, 3, 3)
    y_all = m(x)
    y_one = torch.cat([m(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(y_all, y_one, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# B = 1 is GroupNorm
# ----------------------------------------------------------------------------------------------------------
def _groupnorm_like(m):
    gn = nn.GroupNorm(m.num_groups, m.num_channels, eps=m.eps).to(m.weight.dtype)
    with torch.no_grad():
        gn.weight.copy_(m.weight)
        gn.bias.copy_(m.bias)
    return gn


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("case", ["size1_train", "batch1_train", "alpha1_eval"])
def test_b1_equals_groupnorm_forward_backward(dtype, tol, case):
    size, n, train, alpha = {
        "size1_train": (1, 4, True, 0.5),  # EXAMPLE_GROUP_SIZE = 1
        "batch1_train": (2, 1, True, 0.5),  # a batch of one example
        "alpha1_eval": (2, 4, False, 1.0),  # inference with α = 1
    }[case]
    m = make(8, 4, size, alpha=alpha, dtype=dtype)
    m.train(train)
    gn = _groupnorm_like(m)
    x = rand_x(n, 8, 3, 5, dtype=dtype)
    y, (gx, gw, gb) = grads(m, x, [m.weight, m.bias])
    yr, (gxr, gwr, gbr) = grads(gn, x, [gn.weight, gn.bias])
    torch.testing.assert_close(y, yr, rtol=tol, atol=tol)
    torch.testing.assert_close(gx, gxr, rtol=tol, atol=tol)
    torch.testing.assert_close(gw, gwr, rtol=tol, atol=tol)
    torch.testing.assert_close(gb, gbr, rtol=tol, atol=tol)


def test_b1_train_and_alpha1_eval_agree():
    """Same statistics: GroupNorm in train (example groups of 1) and eval (α = 1), to float64 rounding (the
    training kernel forms its coefficients in double, the eval path in the input dtype)."""
    m = make(8, 4, 1, alpha=1.0)
    x = rand_x(3, 8, 3, 3)
    y_train = m.train()(x)
    y_eval = m.eval()(x)
    torch.testing.assert_close(y_train, y_eval, rtol=1e-13, atol=1e-13)


# ----------------------------------------------------------------------------------------------------------
# shared requirements
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_eval_never_mutates_buffers(alpha):
    m = make(8, 4, 2, alpha=alpha, dtype=torch.float32)
    m.train()(rand_x(4, 8, 3, 3, dtype=torch.float32))
    m.eval()
    before = buffers(m)
    for n in (0, 1, 3):
        m(rand_x(n, 8, 3, 3, dtype=torch.float32, seed=n))
    after = buffers(m)
    assert before.keys() == after.keys() == set(BUFFERS)
    for k in before:
        assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("train", [True, False])
def test_zero_size_input(train):
    m = make(8, 4, 2, dtype=torch.float32)
    m.train()(rand_x(2, 8, 3, 3, dtype=torch.float32))
    m.train(train)
    before = buffers(m)
    x = torch.zeros(0, 8, 3, 3, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 8, 3, 3) and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape and m.weight.grad is not None and torch.all(m.weight.grad == 0)
    for k, v in buffers(m).items():
        assert torch.equal(v, before[k]), k
        assert torch.isfinite(v.double()).all()
    # zero spatial size too
    assert m(torch.zeros(2, 8, 0, 3)).shape == (2, 8, 0, 3)
    for k, v in buffers(m).items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_float32_statistics(dtype):
    G = 4
    m = make(8, G, 2, alpha=0.5, dtype=torch.float32)
    # a large mean: statistics accumulated in bf16/fp16 would be off by far more than the tolerance below
    x = (rand_x(4, 8, 4, 4) + 48).to(dtype)
    xd = x.double()
    m.train()
    y = m(x)
    assert y.dtype == dtype
    w, b = m.weight.detach().double(), m.bias.detach().double()
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(y.double(), ref_train(xd, G, 2, w, b, 1e-5), rtol=tol, atol=tol)
    assert m.running_mean.dtype == m.running_var.dtype == torch.float32
    rm, rsq = ref_ema(xd, G, torch.zeros(G, dtype=torch.float64), torch.ones(G, dtype=torch.float64), 0.1)
    torch.testing.assert_close(m.running_mean.double(), rm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.running_var.double(), rsq - rm**2, rtol=1e-6, atol=1e-4)
    m.eval()
    ye = m(x)
    assert ye.dtype == dtype
    mx = m.running_mean.double()
    mx2 = m.running_var.double() + mx**2
    torch.testing.assert_close(ye.double(), ref_eval(xd, G, 0.5, mx, mx2, w, b, 1e-5), rtol=tol, atol=tol)
    # backward in the input dtype
    xg = x.clone().requires_grad_(True)
    m.train()(xg).float().pow(2).sum().backward()
    assert xg.grad.dtype == dtype and torch.isfinite(xg.grad.float()).all()


def test_channels_last_input():
    m = make(8, 4, 2, dtype=torch.float32)
    x = rand_x(4, 8, 3, 3, dtype=torch.float32)
    y = m.train()(x)
    y_cl = m(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip():
    m = make(8, 4, 2, alpha=0.3, dtype=torch.float32)
    m.train()
    for s in range(3):
        m(rand_x(4, 8, 3, 3, dtype=torch.float32, seed=s))
    sd = m.state_dict()
    assert set(sd) == {"weight", "bias", *BUFFERS}
    assert sd["running_mean"].shape == sd["running_var"].shape == (4,)
    m2 = BatchGroupNorm(8, num_groups=4, example_group_size=2, alpha=0.3)
    res = m2.load_state_dict(sd)
    assert not res.missing_keys and not res.unexpected_keys
    for k, v in m2.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = rand_x(3, 8, 3, 3, dtype=torch.float32, seed=9)
    assert torch.equal(m.eval()(x), m2.eval()(x))


def test_groupnorm_checkpoint_reports_missing_moving_stats():
    """γ/β map from nn.GroupNorm; the moving statistics cannot, and that is reported, not silently defaulted."""
    gn = nn.GroupNorm(4, 8)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.normal_()
    m = BatchGroupNorm(8, num_groups=4)
    with pytest.raises(RuntimeError, match="running_mean"):
        m.load_state_dict(gn.state_dict())
    res = m.load_state_dict(gn.state_dict(), strict=False)
    assert set(res.missing_keys) == set(BUFFERS) and not res.unexpected_keys
    assert torch.equal(m.weight, gn.weight) and torch.equal(m.bias, gn.bias)


def test_registry_two_cfgs():
    from detectron2.config import get_cfg

    from d2norm import add_d2norm_config
    from d2norm.layers.registry import get_norm, norm_options

    a = add_d2norm_config(get_cfg())
    a.D2NORM.BGN.NUM_CHANNEL_GROUPS = 4
    a.D2NORM.BGN.EXAMPLE_GROUP_SIZE = 2
    a.D2NORM.BGN.ALPHA = 0.25
    a.D2NORM.BGN.EPS = 1e-3
    a.D2NORM.BGN.MOMENTUM = 0.2
    b = add_d2norm_config(get_cfg())
    b.D2NORM.BGN.NUM_CHANNEL_GROUPS = 8
    b.D2NORM.BGN.EXAMPLE_GROUP_SIZE = 1
    b.D2NORM.BGN.ALPHA = 1.0
    b.D2NORM.BGN.MOMENTUM = None
    with norm_options(a):
        ma = get_norm("BGN", 16)
    with norm_options(b):
        mb = get_norm("BGN", 16)
    for m in (ma, mb):
        assert isinstance(m, BatchGroupNorm) and isinstance(m, D2NormModule)
        assert not isinstance(m, nn.modules.batchnorm._BatchNorm)
        assert m.num_channels == 16 and m.weight.shape == m.bias.shape == (16,)
    assert (ma.num_groups, ma.example_group_size, ma.alpha, ma.eps, ma.momentum) == (4, 2, 0.25, 1e-3, 0.2)
    assert (mb.num_groups, mb.example_group_size, mb.alpha, mb.eps, mb.momentum) == (8, 1, 1.0, 1e-5, None)
    assert ma.running_mean.shape == (4,) and mb.running_mean.shape == (8,)

    # inside a stock detectron2 block
    from detectron2.modeling.backbone.resnet import BasicStem

    with norm_options(a):
        stem = BasicStem(3, 32, norm="BGN")
    assert isinstance(stem.conv1.norm, BatchGroupNorm) and stem.conv1.norm.num_groups == 4
    out = stem.train()(rand_x(2, 3, 16, 16, dtype=torch.float32))
    assert out.shape == (2, 32, 4, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(num_channels=10, num_groups=4), ["4", "C=10", "divisor of 10"]),
        (dict(num_channels=8, num_groups=0), ["0", "integer >= 1", "NUM_CHANNEL_GROUPS"]),
        (dict(num_channels=8, num_groups=4, example_group_size=0), ["0", "integer >= 1", "EXAMPLE_GROUP_SIZE"]),
        (dict(num_channels=8, num_groups=4, example_group_size=1.5), ["1.5", "integer >= 1"]),
        (dict(num_channels=8, num_groups=4, alpha=1.5), ["1.5", "[0, 1]", "ALPHA"]),
        (dict(num_channels=8, num_groups=4, alpha=-0.1), ["-0.1", "[0, 1]"]),
        (dict(num_channels=8, num_groups=4, alpha=float("nan")), ["nan", "[0, 1]"]),
        (dict(num_channels=8, num_groups=4, eps=-1.0), ["-1.0", "> 0", "EPS"]),
        (dict(num_channels=8, num_groups=4, momentum=1.5), ["1.5", "(0, 1]", "MOMENTUM"]),
        (dict(num_channels=8, num_groups=4, momentum=0.0), ["0.0", "(0, 1]"]),
    ],
)
def test_bad_options(kwargs, words):
    with pytest.raises(ValueError) as e:
        BatchGroupNorm(**kwargs)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_options_through_registry_and_bad_input():
    from detectron2.config import get_cfg

    from d2norm import add_d2norm_config
    from d2norm.layers.registry import get_norm, norm_options

    cfg = add_d2norm_config(get_cfg())
    cfg.D2NORM.BGN.NUM_CHANNEL_GROUPS = 32
    with norm_options(cfg), pytest.raises(ValueError, match=r"32.*C=48"):
        get_norm("BGN", 48)
    cfg.D2NORM.BGN.ALPHA = 2.0
    with norm_options(cfg), pytest.raises(ValueError, match=r"\[0, 1\], got 2.0"):
        get_norm("BGN", 64)
    with pytest.raises(ValueError, match=r"\(N, 8, \*\)"):
        BatchGroupNorm(8, 4)(torch.zeros(2, 6, 3, 3))


@pytest.mark.parametrize("training", [True, False])
def test_single_fused_normalize_float32_numerics(training):
    """The one fused normalize y = x·scale + shift (no separate x − μ) in float32, on inputs whose mean is large
    against their spread: output and gradients against the float64 references (a cancelling x·scale − μ·scale
    would show here, as would any wrong statistic)."""
    G = 4
    m = make(8, G, 2, alpha=0.5, dtype=torch.float32)
    with torch.no_grad():
        m.running_mean.fill_(50.0)
        m.running_var.copy_(torch.tensor([9.0, 4.0, 1.0, 16.0]))
    x64 = rand_x(4, 8, 3, 3) + 50
    x = x64.float().requires_grad_(True)
    m.train(training)
    y = m(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (y * g.float()).sum().backward()
    xr = x64.float().double().requires_grad_(True)
    w, b = m.weight.detach().double(), m.bias.detach().double()
    if training:
        yr = ref_train(xr, G, 2, w, b, 1e-5)
    else:
        mx = torch.full((G,), 50.0, dtype=torch.float64)
        yr = ref_eval(xr, G, 0.5, mx, torch.tensor([9.0, 4.0, 1.0, 16.0], dtype=torch.float64) + mx**2, w, b, 1e-5)
    (yr * g).sum().backward()
    torch.testing.assert_close(y.detach().double(), yr.detach(), rtol=0, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=0, atol=1e-4)


def test_weight_decay_norm_applies_to_bgn_affine():
    """four-things §3.3: SOLVER.WEIGHT_DECAY_NORM reaches BGN's γ/β although BGN is no torch norm class."""
    from d2norm.solver import get_optimizer_params

    conv, bgn = nn.Conv2d(3, 8, 3, bias=False), BatchGroupNorm(8, num_groups=4)
    groups = get_optimizer_params(nn.Sequential(conv, bgn), base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.0)
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd[id(conv.weight)] == 1e-4
    assert wd[id(bgn.weight)] == 0.0 and wd[id(bgn.bias)] == 0.0
    assert len(wd) == 3  # buffers are not parameters


def test_legacy_running_mean_sq_checkpoint_loads_as_centered_variance():
    """A checkpoint with the raw m_{x²} buffer (``running_mean_sq``) loads strictly: running_var = m_{x²} − m_x²."""
    m = make(8, 4, 2, alpha=0.5, dtype=torch.float32)
    mean = torch.tensor([1.0, -2.0, 30.0, 0.5])
    var = torch.tensor([0.5, 2.0, 1.5, 4.0])
    sd = {"weight": m.weight.detach().clone(), "bias": m.bias.detach().clone(), "running_mean": mean,
          "running_mean_sq": (var.double() + mean.double() ** 2).float(), "num_batches_tracked": torch.tensor(3)}
    res = m.load_state_dict(sd)
    assert not res.missing_keys and not res.unexpected_keys
    torch.testing.assert_close(m.running_var, var, rtol=1e-5, atol=1e-5)
    assert int(m.num_batches_tracked) == 3 and "running_mean_sq" not in m.state_dict()
