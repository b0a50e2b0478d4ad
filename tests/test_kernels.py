"""Fast per-sample-statistics primitives (d2norm/layers/kernels.py, d2norm/layers/native.py) and the layers'
fast paths, against float64 references written from the definitions (mean, biased variance, affine), in every
memory layout — each test once with the native moments kernel and once with the GroupNorm route."""
import shutil

import pytest
import torch

import d2norm  # noqa: F401
from d2norm.layers import (
    BatchGroupNorm,
    BatchStatsBatchNorm2d,
    EvalNorm2d,
    ExampleWeightedBatchNorm2d,
    GhostBatchNorm2d,
)
from d2norm.layers import batch_group_norm as bgn_module
from d2norm.layers import batch_stats_bn as bsbn_module
from d2norm.layers import evalnorm as evalnorm_module
from d2norm.layers import example_weighted_bn as ewbn_module
from d2norm.layers import kernels
from d2norm.layers import mabn as mabn_module
from d2norm.layers.kernels import channel_affine, group_moments
from d2norm.layers.native import (
    channel_moments,
    mix_normalize,
    native_status,
    row_affine,
    row_affine_l1,
    row_center,
    row_moments,
)


@pytest.fixture(autouse=True, params=["native", "groupnorm"])
def moments_route(request, monkeypatch):
    """Every test of this module with both CPU routes: the native kernels, and torch's GroupNorm / BN kernels."""
    if request.param == "groupnorm":
        monkeypatch.setattr(kernels, "row_moments", lambda x: None)
        monkeypatch.setattr(kernels, "row_affine", lambda x, s, b: None)
        monkeypatch.setattr(kernels, "native_for", lambda x, min_dim=1: None)
        monkeypatch.setattr(evalnorm_module, "row_affine_l1", lambda x, a, b: None)
        monkeypatch.setattr(evalnorm_module, "mix_normalize", lambda *a, **k: None)
        monkeypatch.setattr(ewbn_module, "mix_normalize", lambda *a, **k: None)
        monkeypatch.setattr(bgn_module, "mix_normalize", lambda *a, **k: None)
        monkeypatch.setattr(bsbn_module, "channel_moments", lambda x: None)
        monkeypatch.setattr(mabn_module, "row_center", lambda x, rows: None)
    elif shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the native kernel cannot be built here (the GroupNorm route is tested)")
    else:
        assert native_status() == "ok", native_status()
    return request.param


def test_native_row_moments_is_the_two_pass_definition_and_refuses_what_it_cannot_do(moments_route):
    if moments_route != "native":
        return
    g = torch.Generator().manual_seed(11)
    for rows, n in ((5, 1), (7, 49), (3, 255), (3, 256), (2, 3137)):  # tails of every lane width; K=8 / K=32
        for dtype in (torch.float64, torch.float32):
            x = (torch.randn(rows, n, generator=g, dtype=torch.float64) * 0.5 + 1e3).to(dtype)
            mean, var = row_moments(x)
            assert mean.dtype == var.dtype == dtype and mean.shape == var.shape == (rows,)
            x64 = x.double()
            rmean = x64.mean(1)
            rvar = (x64 - rmean[:, None]).square().mean(1)
            tol = 1e-14 if dtype == torch.float64 else 1e-6  # float32: only the final rounding to float32
            torch.testing.assert_close(mean.double(), rmean, rtol=tol, atol=0)
            torch.testing.assert_close(var.double(), rvar, rtol=tol, atol=1e-300)
    assert row_moments(torch.ones(3, 4).t()) is None  # not contiguous
    assert row_moments(torch.ones(3, 0)) is None
    assert row_moments(torch.ones(3, 4, dtype=torch.float16)) is None
    assert row_moments(torch.ones(2, 3, 4)) is None


def test_native_row_affine_is_the_definition(moments_route):
    if moments_route != "native":
        return
    g = torch.Generator().manual_seed(12)
    for rows, n in ((5, 1), (7, 49), (2, 3137)):
        for dtype in (torch.float64, torch.float32):
            x, s, b = (torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
                       for shape in ((rows, n), (rows,), (rows,)))
            y = row_affine(x, s, b)
            ref = x.double() * s.double()[:, None] + b.double()[:, None]
            tol = 1e-15 if dtype == torch.float64 else 3e-7  # one or two roundings
            torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    x = torch.ones(3, 4)
    assert row_affine(x, torch.ones(5), torch.ones(5)) is None  # 5 rows do not divide 12 elements
    assert row_affine(x, torch.ones(3, dtype=torch.float64), torch.ones(3)) is None  # dtypes differ
    assert row_affine(x.t(), torch.ones(4), torch.ones(4)) is None  # not contiguous


def test_native_row_center_is_the_definition(moments_route):
    if moments_route != "native":
        return
    g = torch.Generator().manual_seed(13)
    for rows, n in ((5, 1), (7, 49), (3, 255), (3, 256), (4, 4608)):  # K = 8 / K = 32 lanes and their tails
        for dtype in (torch.float64, torch.float32):
            x = (torch.randn(rows, n, generator=g, dtype=torch.float64) * 0.5 + 1e2).to(dtype)
            y = row_center(x, rows)
            assert y.dtype == dtype and y.shape == x.shape
            x64 = x.double()
            ref = x64 - x64.mean(1, keepdim=True)
            # float32: the mean rounded once, then one rounding of the difference (|x| ~ 1e2 -> ~1e-5 absolute)
            tol = 1e-12 if dtype == torch.float64 else 2e-5
            torch.testing.assert_close(y.double(), ref, rtol=0, atol=tol)
    assert row_center(torch.ones(3, 4).t(), 3) is None  # not contiguous
    assert row_center(torch.ones(3, 4), 5) is None  # 5 rows do not divide 12 elements
    assert row_center(torch.ones(3, 4, dtype=torch.float16), 3) is None


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (5, 2, 1, 1), (3, 1, 7, 7)])
def test_weight_centering_value_and_gradient_equal_the_definition(moments_route, shape):
    """mabn eq 18 (W − W̄ per output channel) and its chain rule, float32 through either route, against float64
    autograd of the definition; channels-last weights take the torch route."""
    g = torch.Generator().manual_seed(14)
    w64 = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 0.7).requires_grad_()
    gz = torch.randn(shape, generator=g, dtype=torch.float64)
    ref = w64 - w64.mean(dim=(1, 2, 3), keepdim=True)
    ref.backward(gz)
    for layout in (torch.contiguous_format, torch.channels_last):
        w = w64.detach().float().contiguous(memory_format=layout).requires_grad_()
        y = mabn_module._CenterRows.apply(w)
        y.backward(gz.float())
        torch.testing.assert_close(y.double(), ref.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(w.grad.double(), w64.grad, rtol=0, atol=1e-5)
        assert abs(float(w.grad.double().sum(dim=(1, 2, 3)).abs().max())) < 1e-5  # the gradient is centered too


def test_native_row_affine_l1_is_the_definition(moments_route):
    """Σ|x·a + b|, Σ sign(·), Σ sign(·)·x per row (evalnorm eq 9's term and its gradient statistics), with exact
    zeros of t (sign 0) included."""
    if moments_route != "native":
        return
    g = torch.Generator().manual_seed(13)
    for rows, n in ((5, 1), (7, 49), (2, 3137)):
        for dtype in (torch.float64, torch.float32):
            x = torch.randn(rows, n, generator=g, dtype=torch.float64).to(dtype)
            a = torch.randn(rows, generator=g, dtype=torch.float64).to(dtype)
            b = torch.randn(rows, generator=g, dtype=torch.float64).to(dtype)
            x[0, 0], a[0], b[0] = 2.0, 0.5, -1.0  # t = 0 exactly
            out = row_affine_l1(x, a, b)
            x64, a64, b64 = x.double(), a.double(), b.double()
            t = x64 * a64[:, None] + b64[:, None]
            ref = (t.abs().sum(1), t.sign().sum(1), (t.sign() * x64).sum(1))
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            for got, want in zip(out, ref):
                assert got.dtype == dtype and got.shape == (rows,)
                torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert row_affine_l1(torch.ones(3, 4), torch.ones(2), torch.ones(2)) is None


def _x(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 2
    x = x + torch.randn(shape[0], shape[1], *([1] * (len(shape) - 2)), generator=g, dtype=torch.float64) * 4
    return x.to(dtype)


def _ref_moments(x, groups):
    """Per (sample, group): mean and biased variance, two-pass in float64."""
    xr = x.double().reshape(x.shape[0], groups, -1)
    mean = xr.mean(-1)
    return mean, (xr - mean[..., None]).square().mean(-1)


@pytest.mark.parametrize("shape, groups", [((3, 8, 5, 4), 8), ((3, 8, 5, 4), 2), ((2, 6, 7), 3), ((4, 6, 1, 1), 6)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_group_moments_match_float64_definition(shape, groups, layout):
    x = _x(shape)
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat([x, x], dim=-1)[..., : shape[-1]]
    mean, var = group_moments(x, groups)
    rmean, rvar = _ref_moments(x, groups)
    assert mean.shape == var.shape == (shape[0], groups)
    torch.testing.assert_close(mean, rmean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, rvar, rtol=1e-12, atol=1e-12)
    torch.autograd.gradcheck(lambda t: group_moments(t, groups), (x.detach().requires_grad_(),))


def test_group_moments_float32_is_cancellation_free_and_zero_for_constant_groups():
    # mean = 10⁴ × std: E[x²] − E[x]² in float32 would have an error ~6 times the variance itself
    x = _x((4, 8, 16, 16), seed=1, dtype=torch.float64) * 0.02 + 1000.0
    x[1, 2] = 7.25  # constant channel: variance exactly 0
    mean, var = group_moments(x.float())
    rmean, rvar = _ref_moments(x.float(), 8)
    torch.testing.assert_close(mean.double(), rmean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), rvar, rtol=1e-3, atol=1e-12)
    assert var[1, 2] == 0


@pytest.mark.parametrize("coef", ["C", "1C", "NC"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channel_affine_matches_definition_forward_backward(coef, layout):
    x = _x((3, 5, 4, 6), seed=2)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(3)
    shape = {"C": (5,), "1C": (1, 5), "NC": (3, 5)}[coef]
    s = torch.randn(shape, generator=g, dtype=torch.float64)
    b = torch.randn(shape, generator=g, dtype=torch.float64)
    view = (1, 5, 1, 1) if coef != "NC" else (3, 5, 1, 1)
    y = channel_affine(x, s, b)
    torch.testing.assert_close(y, x * s.reshape(view) + b.reshape(view), rtol=1e-13, atol=1e-13)
    xs = [t.detach().requires_grad_() for t in (x, s, b)]
    torch.autograd.gradcheck(channel_affine, tuple(xs))


@pytest.mark.parametrize("chunk", [1 << 17, 1, 100])  # one chunk; one row per chunk; uneven chunks of 2 rows
def test_affine_l1_sums_match_float64_definition_value_and_gradient(chunk, monkeypatch):
    """evalnorm eq 9's L1 sums (native kernel / chunked torch route): mean|x·a + b| and its gradients
    ∂/∂a = S₂/n, ∂/∂b = S₁/n against autograd of the float64 definition."""
    monkeypatch.setattr(evalnorm_module, "L1_CHUNK_ELEMENTS", chunk)
    x = _x((4, 6, 7, 5), seed=4, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    a = torch.randn(4, 6, generator=g) * 0.3
    b = torch.randn(4, 6, generator=g)
    abs_sum, s1, s2 = evalnorm_module._affine_l1_sums(x, a, b)
    assert s1.shape == s2.shape == (4, 6)
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    ref = (x.double() * a64[:, :, None, None] + b64[:, :, None, None]).abs().mean()
    ref.backward()
    n = x.numel()
    torch.testing.assert_close(abs_sum.double() / n, ref.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(s2.double() / n, a64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s1.double() / n, b64.grad, rtol=1e-5, atol=1e-7)


def _randomized(m):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5 + 1)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g))
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) + 2)
        if hasattr(m, "running_var"):
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 20 + 1)
        else:
            m.running_mean_sq.copy_(m.running_mean.square() + torch.rand(m.running_mean.shape, generator=g) * 20 + 1)
    return m


LAYERS = {
    "ExampleWeightedBN": lambda: ExampleWeightedBatchNorm2d(16, alpha=0.3),
    "EvalNorm": lambda: EvalNorm2d(16, init_alpha=0.2, init_beta=0.3),
    "BGN": lambda: BatchGroupNorm(16, num_groups=4, alpha=0.4),
    "BatchStatsBN": lambda: BatchStatsBatchNorm2d(16),
    "GhostBN": lambda: GhostBatchNorm2d(16, ghost_size=3),  # N=4: [2, 2]; N=64: 22 sub-batches of 3 and 2
}


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("training", [False, True])
def test_float32_fast_paths_equal_the_float64_layer_in_every_layout(name, training):
    """The same layer in float64 (whose paths the layer tests check against the papers' equations) and the
    float32 fast path agree to float32 accuracy, forward and backward, contiguous and channels-last, on a
    ResNet-like and an RoI-like shape."""
    for shape in ((4, 16, 14, 14), (64, 16, 7, 7), (3, 16, 16, 17)):  # H·W < 256 and >= 256 (two kernel routes)
        m64 = _randomized(LAYERS[name]()).double().train(training)
        m32 = _randomized(LAYERS[name]()).float().train(training)
        x64 = _x(shape, seed=8).requires_grad_()
        y64 = m64(x64)
        dy = torch.randn(y64.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        y64.backward(dy)
        for layout in (torch.contiguous_format, torch.channels_last):
            x32 = x64.detach().float().contiguous(memory_format=layout).requires_grad_()
            m32.zero_grad()
            y32 = m32(x32)
            y32.backward(dy.float())
            torch.testing.assert_close(y32.double(), y64.detach(), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(m32.weight.grad.double(), m64.weight.grad, rtol=1e-3, atol=1e-3)
        m64.zero_grad()
        x64.grad = None


def _ref_example_group_norm(x, groups, sizes, w, b, eps=1e-5):
    """float64 definition: every (example group × channel group) block normalized by its own mean and biased
    variance, block by block, then γ_c·x̂ + β_c."""
    n, c = x.shape[:2]
    cpg = c // groups
    out = torch.empty_like(x)
    start = 0
    for size in sizes:
        for g in range(groups):
            blk = x[start:start + size, g * cpg:(g + 1) * cpg]
            mean = blk.mean()
            var = (blk - mean).square().mean()
            out[start:start + size, g * cpg:(g + 1) * cpg] = (blk - mean) / torch.sqrt(var + eps)
        start += size
    if w is not None:
        out = out * w[None, :, None, None] + b[None, :, None, None]
    return out


@pytest.mark.parametrize("groups,sizes", [(6, (2, 2, 1)), (2, (3, 2)), (1, (5,)), (3, (1, 1, 1, 1, 1))])
@pytest.mark.parametrize("affine", [True, False])
def test_example_group_norm_value_and_gradients_equal_the_definition(groups, sizes, affine):
    """GhostBN / BGN training normalization (four-things eq 4, §3.4): value, per-example moments and the
    gradients of x, γ, β against autograd of the float64 block-by-block definition, with both routes (the
    closed-form native backward and autograd of the torch route); gradcheck in float64."""
    g = torch.Generator().manual_seed(14)
    x = (_x((5, 6, 4, 5), seed=15) * 3 + 2).requires_grad_()
    w = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_() if affine else None
    y, mu, var = kernels.example_group_norm(x, groups, sizes, w, b, 1e-5)
    xr = x.detach().clone().requires_grad_()
    wr = w.detach().clone().requires_grad_() if affine else None
    br = b.detach().clone().requires_grad_() if affine else None
    ref = _ref_example_group_norm(xr, groups, sizes, wr, br)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    rmu, rvar = _ref_moments(x.detach(), groups)
    torch.testing.assert_close(mu, rmu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, rvar, rtol=1e-12, atol=1e-12)
    assert not mu.requires_grad and not var.requires_grad
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy)
    ref.backward(gy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-11)
    if affine:
        torch.testing.assert_close(w.grad, wr.grad, rtol=1e-10, atol=1e-11)
        torch.testing.assert_close(b.grad, br.grad, rtol=1e-10, atol=1e-11)
        fn = lambda t, ww, bb: kernels.example_group_norm(t, groups, sizes, ww, bb, 1e-5)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x.detach().requires_grad_(), w.detach().requires_grad_(),
                                             b.detach().requires_grad_()))
    # only some inputs need a gradient: the others get none
    x2 = x.detach().clone()
    w2 = w.detach().clone().requires_grad_() if affine else None
    y2, _, _ = kernels.example_group_norm(x2, groups, sizes, w2, b.detach() if affine else None, 1e-5)
    if affine:
        y2.backward(gy)
        torch.testing.assert_close(w2.grad, wr.grad, rtol=1e-10, atol=1e-11)
    else:
        assert not y2.requires_grad


@pytest.mark.parametrize("affine", [True, False])
def test_native_mix_normalize_is_eq3_and_eqs5_6(moments_route, affine):
    """Mean mixed with α_m, variance with α_v (four-things eq 3: α_m = α_v, per channel or per channel group as
    BGN; evalnorm eqs 5-6: α̂, β̂) against a float64 formula; refused (None) when a gradient is needed or the
    sizes do not fit."""
    if moments_route != "native":
        return
    g = torch.Generator().manual_seed(16)
    for shape, groups in (((3, 5, 4, 6), None), ((4, 6, 7, 7), None), ((2, 3, 16, 20), None), ((3, 6, 4, 6), 2),
                          ((4, 8, 7, 7), 4), ((2, 6, 5, 5), 1)):
        c = shape[1]
        k = c if groups is None else groups
        for dtype in (torch.float64, torch.float32):
            x = _x(shape, seed=17, dtype=dtype)
            pm = torch.randn(k, generator=g, dtype=torch.float64).to(dtype)
            pv = (torch.rand(k, generator=g, dtype=torch.float64) * 5 + 0.5).to(dtype)
            w = (torch.randn(c, generator=g, dtype=torch.float64).to(dtype)) if affine else None
            b = (torch.randn(c, generator=g, dtype=torch.float64).to(dtype)) if affine else None
            am, av = 0.3, 0.7
            y = mix_normalize(x, pm, pv, w, b, am, av, 1e-5, groups=groups)
            mu_i, var_i = _ref_moments(x, k)  # (N, k) per (sample, group)
            d = mu_i - pm.double()
            mu = pm.double() + am * d
            var = av * var_i + (1 - av) * pv.double() + av * (1 - av) * d.square()
            xg = x.double().reshape(shape[0], k, -1)
            ref = ((xg - mu[..., None]) / torch.sqrt(var[..., None] + 1e-5)).reshape(shape)
            if affine:
                ref = ref * w.double()[None, :, None, None] + b.double()[None, :, None, None]
            tol = 1e-12 if dtype == torch.float64 else 2e-5
            assert y.dtype == dtype and y.shape == x.shape
            torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    xg = _x((2, 3, 4, 4)).requires_grad_()
    assert mix_normalize(xg, torch.zeros(3, dtype=xg.dtype), torch.ones(3, dtype=xg.dtype), None, None,
                         0.5, 0.5, 1e-5) is None
    x = _x((2, 6, 4, 4))
    one = torch.ones(3, dtype=x.dtype)
    assert mix_normalize(x, one, one, None, None, 0.5, 0.5, 1e-5, groups=4) is None  # 4 does not divide 6
    assert mix_normalize(x, one, one, None, None, 0.5, 0.5, 1e-5, groups=2) is None  # 3 stats for 2 groups


def test_native_channel_moments_are_the_batch_statistics(moments_route):
    """Per-channel mean / biased variance over N·H·W (two-pass float64 reference), at offsets where
    E[x²] − E[x]² would fail, for long rows (per-channel two-pass) and short rows (streamed shifted sums);
    refused when a gradient is needed."""
    if moments_route != "native":
        return
    for shape in ((3, 5, 4, 6), (64, 4, 7, 7), (2, 3, 1, 1), (2, 3, 17), (3, 2, 16, 21)):  # L=336: 32 lanes
        for dtype in (torch.float64, torch.float32):
            x = (_x(shape, seed=18) * 0.01 + 1e3).to(dtype)
            mean, var = channel_moments(x)
            xr = x.double().transpose(0, 1).reshape(shape[1], -1)
            rm = xr.mean(1)
            rv = (xr - rm[:, None]).square().mean(1)
            tol = 1e-13 if dtype == torch.float64 else 1e-6
            assert mean.shape == var.shape == (shape[1],) and mean.dtype == dtype
            torch.testing.assert_close(mean.double(), rm, rtol=tol, atol=0)
            torch.testing.assert_close(var.double(), rv, rtol=max(tol, 1e-4 if dtype == torch.float32 else 0),
                                       atol=1e-300)
    # short rows over several sample chunks, with sample means spread far beyond the within-sample spread (the
    # shifted sums' hard case: the shift is the first row's mean)
    x = _x((200, 64, 3, 3), seed=19) * 0.1 + 1e3 + torch.arange(200, dtype=torch.float64).view(-1, 1, 1, 1) * 5
    for dtype in (torch.float64, torch.float32):
        mean, var = channel_moments(x.to(dtype))
        xr = x.to(dtype).double().transpose(0, 1).reshape(64, -1)
        rm = xr.mean(1)
        torch.testing.assert_close(mean.double(), rm, rtol=1e-13 if dtype == torch.float64 else 1e-6, atol=0)
        torch.testing.assert_close(var.double(), (xr - rm[:, None]).square().mean(1),
                                   rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)
    assert channel_moments(_x((2, 3, 4, 4)).requires_grad_()) is None


def test_first_build_of_the_native_kernels_says_so(monkeypatch, capsys):
    """The first layer forward of an environment builds the kernels (~1 min): it says so on stderr, once."""
    import torch.utils.cpp_extension as ext

    from d2norm.layers import native

    built = {}
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native, "_is_built", lambda name: bool(built))
    monkeypatch.setattr(ext, "load_inline", lambda name, **kw: built.setdefault("m", object()))
    assert native.native_module() is built["m"]
    err = capsys.readouterr().err
    assert "d2norm: building the native CPU kernels (once per environment" in err and "built in" in err
    monkeypatch.setattr(native, "_status", None)
    native.native_module()  # cached: silent
    assert "building" not in capsys.readouterr().err
