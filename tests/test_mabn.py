"""MABN (mabn §4, eqs 12-20) and the weight-centralized convolution (eq 18).

The reference below is written from the paper's equations in float64, independently of d2norm.layers.mabn.
"""
import io

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg

from d2norm import add_d2norm_config
import d2norm.layers.mabn  # noqa: F401  (registers "MABN")
from d2norm.layers.mabn import CenteredConv2d, MABN2d, MABNFunction
from d2norm.layers.registry import NORM_REGISTRY, get_norm, norm_options

from helpers import buffers, d2norm_cfg

torch.set_num_threads(1)
DIMS = (0, 2, 3)


def cview(t):
    return t.view(1, -1, 1, 1)


class RefMABN:
    """mabn eqs 15, 19, 20 with plain lists as the SMA windows (eq 13) and χ̂ as in the text below eq 20."""

    def __init__(self, m, alpha, lam, warmup, eps):
        self.m, self.alpha, self.lam, self.warmup, self.eps = m, alpha, lam, warmup, eps
        self.chi_sq_hist, self.psi_hist = [], []
        self.chi_hat = None  # set on first step from init 1
        self.t = 0

    def forward(self, x, gamma, beta, chi_hat_prev):
        chi_sq_b = (x * x).mean(dim=DIMS) + self.eps  # χ²_B (eq 15, + ε)
        self.warm = self.t < self.warmup
        self.chi_sq_hist.append(chi_sq_b)
        window = self.chi_sq_hist[-self.m:]
        chi_bar = chi_sq_b.sqrt() if self.warm else (sum(window) / len(window)).sqrt()
        self.chi_hat = self.alpha * chi_hat_prev + (1 - self.alpha) * chi_sq_b.sqrt()
        ratio = chi_bar / self.chi_hat
        self.r = torch.ones_like(ratio) if self.warm else ratio.clamp(1 / self.lam, self.lam)
        self.clipped = (ratio < 1 / self.lam) | (ratio > self.lam)  # per channel
        self.x, self.gamma, self.chi_bar = x, gamma, chi_bar
        self.Y = x / cview(chi_bar)
        self.Yhat = cview(self.r) * self.Y
        self.t += 1
        return cview(gamma) * self.Yhat + cview(beta)

    def backward(self, gz):
        dYhat = cview(self.gamma) * gz
        dY = cview(self.r) * dYhat  # eq 20, left
        psi_b = (self.Y * dY).mean(dim=DIMS)  # eq 5
        self.psi_hist.append(psi_b)
        window = self.psi_hist[-self.m:]
        psi_bar = psi_b if self.warm else sum(window) / len(window)  # eq 13
        dx = (dY - self.Y * cview(psi_bar)) / cview(self.chi_bar)  # eq 20, right
        return dx, (gz * self.Yhat).sum(dim=DIMS), gz.sum(dim=DIMS)


def make_layer(C=3, m=4, alpha=0.6, lam=1.3, warmup=1, eps=1e-5, dtype=torch.float64, seed=0):
    layer = MABN2d(C, buffer_size=m, momentum=alpha, clip=lam, warmup_iters=warmup, eps=eps).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=g, dtype=dtype) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=g, dtype=dtype))
    return layer


def batch(step, shape=(2, 3, 4, 5), dtype=torch.float64, seed=100):
    g = torch.Generator().manual_seed(seed + step)
    scale = [1.0, 1.2, 4.0, 0.3, 1.0, 2.5, 0.8, 1.1, 3.0][step % 9]  # moves χ_B so r is clipped at times
    x = (torch.randn(shape, generator=g, dtype=dtype) * 3 + 2) * scale
    gz = torch.randn(shape, generator=g, dtype=dtype) * 2 - 0.5
    return x, gz


def assert_buffers_equal(module, snap, names=None):
    for k, v in module.named_buffers():
        if names is None or k in names:
            assert torch.equal(v, snap[k]), k


@pytest.fixture(params=["native", "torch"])
def route(request, monkeypatch):
    """MABN's two CPU routes: d2norm's native kernels (per-channel moments, Σg / Σg·x, the one-pass eq-20 input
    gradient, the weight centering) and torch ops (what CUDA, channels-last and a machine without a compiler
    run)."""
    import d2norm.layers.mabn as mabn_module
    from d2norm.layers.native import native_status

    if request.param == "torch":
        monkeypatch.setattr(mabn_module, "native_for", lambda x, min_dim=1: None)
        monkeypatch.setattr(mabn_module, "row_center", lambda x, rows: None)
    elif native_status() != "ok":
        pytest.skip(f"native kernels unavailable here ({native_status()}); the torch route is tested")
    return request.param


@pytest.mark.parametrize("m,warmup", [(4, 1), (3, 5), (1, 0)])
def test_training_matches_float64_reference(m, warmup, route):
    """Forward and input/γ/β gradients at each step: warm-up, partially filled ring, full ring, wrap-around."""
    alpha, lam, eps = 0.6, 1.3, 1e-5
    layer = make_layer(m=m, alpha=alpha, lam=lam, warmup=warmup, eps=eps)
    ref = RefMABN(m, alpha, lam, warmup, eps)
    chi_hat = torch.ones(3, dtype=torch.float64)
    seen_clip = seen_unclipped = seen_partial = False
    for step in range(9):
        x, gz = batch(step)
        x.requires_grad_(True)
        layer.zero_grad()
        z = layer(x)
        zr = ref.forward(x.detach(), layer.weight.detach(), layer.bias.detach(), chi_hat)
        chi_hat = ref.chi_hat
        torch.testing.assert_close(z, zr, rtol=1e-10, atol=1e-10)
        z.backward(gz)
        dx, dg, db = ref.backward(gz)
        torch.testing.assert_close(x.grad, dx, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.weight.grad, dg, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.bias.grad, db, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.running_chi, ref.chi_hat, rtol=1e-12, atol=0)
        assert int(layer.num_batches_tracked) == step + 1 and int(layer.psi_count) == step + 1
        if not ref.warm:
            seen_clip |= bool(ref.clipped.any())
            seen_unclipped |= bool((~ref.clipped).any())
            seen_partial |= len(ref.chi_sq_hist) < m
    assert seen_clip and seen_unclipped  # both branches of the clip exercised (per channel)
    if warmup + 1 < m:
        assert seen_partial  # the SMA over a partially filled ring was exercised after warm-up


def test_warmup_is_eq15_with_exact_gradient():
    """During warm-up the layer is eq 15 (batch χ_B, r = 1); its backward equals autograd of eq 15 (eq 16)."""
    layer = make_layer(warmup=3)
    for step in range(3):
        x, gz = batch(step)
        x1 = x.clone().requires_grad_(True)
        x2 = x.clone().requires_grad_(True)
        w = layer.weight.detach().clone().requires_grad_(True)
        z = layer(x1)
        z.backward(gz)
        chi = ((x2 * x2).mean(dim=DIMS, keepdim=True) + layer.eps).sqrt()
        z2 = cview(w) * x2 / chi + cview(layer.bias.detach())
        z2.backward(gz)
        torch.testing.assert_close(z, z2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-10, atol=1e-12)
        layer.zero_grad()


def test_forward_uses_ema_when_r_not_clipped():
    """Eq 19: r·x/χ̄_t = x/χ̂_t whenever the clip is inactive ("EMAS in FP", mabn Table 2)."""
    layer = make_layer(m=3, lam=1e6, warmup=2)
    for step in range(6):
        x, gz = batch(step)
        z = layer(x)
        z.backward(gz)
        if step >= 2:
            expect = cview(layer.weight) * x / cview(layer.running_chi) + cview(layer.bias)
            torch.testing.assert_close(z, expect, rtol=1e-12, atol=1e-12)


def _function_args(layer, x, update=False):
    return (layer.chi_sq_buffer, layer.psi_buffer, layer.running_chi, layer.num_batches_tracked,
            layer.psi_count, layer.warmup_iters, layer.momentum, layer.clip, layer.eps, update, 0)


@pytest.mark.parametrize("case", ["warmup", "sma_clipped", "sma_no_clip_partial"])
def test_gradcheck_function_with_fixed_state(case):
    """gradcheck (float64) of MABNFunction with the moving-average state held fixed (update_state=False).

    With past Ψ entries 0 and r locally constant, eq 20 is the exact gradient of eq 19 (see MABNFunction).
    """
    C = 3
    if case == "warmup":
        layer = make_layer(C=C, m=3, warmup=10)
        layer.num_batches_tracked.fill_(4)
    elif case == "sma_clipped":
        # large past χ² -> χ̄/χ̂ far above λ = 2 -> r = λ, constant under perturbation of x
        layer = make_layer(C=C, m=3, alpha=0.5, lam=2.0, warmup=0)
        layer.chi_sq_buffer.copy_(torch.rand(3, C, dtype=torch.float64) * 50 + 300)
        layer.num_batches_tracked.fill_(7)
        layer.psi_count.fill_(7)
        layer.running_chi.fill_(1e-3)
    else:
        # λ = 1 -> r = 1; only one past χ² entry -> window of 2
        layer = make_layer(C=C, m=4, lam=1.0, warmup=0)
        layer.chi_sq_buffer[0].copy_(torch.rand(C, dtype=torch.float64) * 10 + 1)
        layer.num_batches_tracked.fill_(1)
        layer.psi_count.fill_(1)
    before = buffers(layer)
    x = (torch.randn(2, C, 3, 2, dtype=torch.float64) * 3 + 2).requires_grad_(True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)

    def f(x, w, b):
        return MABNFunction.apply(x, w, b, *_function_args(layer, x))

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert_buffers_equal(layer, before)
    if case == "sma_clipped":  # the case really is clipped at λ
        chi_b = ((x.detach() ** 2).mean(dim=DIMS) + layer.eps).sqrt()
        chi_bar = ((layer.chi_sq_buffer[1:].sum(0) + chi_b ** 2) / 3).sqrt()
        assert bool((chi_bar / (0.5e-3 + 0.5 * chi_b) > 2.0).all())


def test_backward_injects_past_psi():
    """With past Ψ ≠ 0 the backward differs from the exact gradient by exactly −Y·P/(k·χ̄) (eq 20)."""
    C, m = 3, 3
    layer = make_layer(C=C, m=m, lam=1.0, warmup=0)
    layer.chi_sq_buffer.copy_(torch.rand(m, C, dtype=torch.float64) * 10 + 1)
    layer.psi_buffer.copy_(torch.randn(m, C, dtype=torch.float64))
    layer.num_batches_tracked.fill_(5)
    layer.psi_count.fill_(5)  # next push goes to row 2; rows 0, 1 are the past window
    x, gz = batch(0, shape=(2, C, 3, 2))
    x1 = x.clone().requires_grad_(True)
    MABNFunction.apply(x1, layer.weight, layer.bias, *_function_args(layer, x)).backward(gz)
    x2 = x.clone().requires_grad_(True)
    chi_bar = ((layer.chi_sq_buffer[:2].sum(0) + (x2 * x2).mean(dim=DIMS) + layer.eps) / 3).sqrt()
    (cview(layer.weight.detach()) * x2 / cview(chi_bar) + cview(layer.bias.detach())).backward(gz)
    P = layer.psi_buffer[:2].sum(0)
    expect = x2.grad - (x / cview(chi_bar.detach())) * cview(P) / (3 * cview(chi_bar.detach()))
    torch.testing.assert_close(x1.grad, expect, rtol=1e-10, atol=1e-12)


def test_eval_is_linear_and_uses_ema():
    layer = make_layer(m=3, warmup=1)
    for step in range(4):
        x, gz = batch(step)
        layer(x).backward(gz)
    layer.eval()
    before = buffers(layer)
    x1, _ = batch(11)
    x2, _ = batch(12)
    x1.requires_grad_(True)
    z1, z2, z12 = layer(x1), layer(x2), layer(x1.detach() + 2.0 * x2)
    bias = cview(layer.bias)
    torch.testing.assert_close(z12 - bias, (z1 - bias) + 2.0 * (z2 - bias), rtol=1e-12, atol=1e-12)
    expect = cview(layer.weight) * x1 / cview(layer.running_chi) + bias
    torch.testing.assert_close(z1, expect, rtol=1e-14, atol=1e-14)
    gz = torch.randn_like(z1)
    z1.backward(gz)
    torch.testing.assert_close(x1.grad, gz * cview(layer.weight / layer.running_chi).detach())
    assert_buffers_equal(layer, before)  # eval never writes a buffer (forward or backward)
    assert not torch.equal(layer.running_chi, torch.ones(3, dtype=torch.float64))


def test_training_updates_exactly_the_documented_buffers():
    layer = make_layer(m=3, warmup=1)
    x, gz = batch(0)
    before = buffers(layer)
    z = layer(x)
    fwd_changed = {"running_chi", "chi_sq_buffer", "num_batches_tracked"}
    assert_buffers_equal(layer, before, names={"psi_buffer", "psi_count"})
    for k in fwd_changed:
        assert not torch.equal(getattr(layer, k), before[k]), k
    after_fwd = buffers(layer)
    z.backward(gz)
    assert_buffers_equal(layer, after_fwd, names=fwd_changed)
    assert not torch.equal(layer.psi_buffer, after_fwd["psi_buffer"])
    assert int(layer.psi_count) == 1 and int(layer.num_batches_tracked) == 1
    # only row 0 of each ring written
    assert torch.equal(layer.chi_sq_buffer[1:], before["chi_sq_buffer"][1:])
    assert torch.equal(layer.psi_buffer[1:], before["psi_buffer"][1:])
    # a training forward without backward pushes χ² but no Ψ
    with torch.no_grad():
        layer(x)
    assert int(layer.num_batches_tracked) == 2 and int(layer.psi_count) == 1


@pytest.mark.parametrize("training", [True, False])
def test_zero_size_input(training):
    layer = make_layer(m=2, warmup=0).train(training)
    for step in range(2):  # some real statistics first
        layer.train()
        x, gz = batch(step)
        layer(x).backward(gz)
    layer.train(training)
    layer.zero_grad()
    before = buffers(layer)
    x = torch.randn(0, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    z = layer(x)
    assert z.shape == (0, 3, 4, 5) and z.dtype == torch.float64
    z.sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros(3, dtype=torch.float64))
    assert x.grad.shape == x.shape
    assert_buffers_equal(layer, before)
    for k, v in layer.named_buffers():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k


def test_bf16_input_float32_statistics():
    layer = make_layer(m=3, warmup=1, dtype=torch.float32)
    layer32 = make_layer(m=3, warmup=1, dtype=torch.float32)
    for step in range(4):
        x, gz = batch(step, dtype=torch.float32)
        xb = x.to(torch.bfloat16).requires_grad_(True)
        x32 = xb.detach().float().requires_grad_(True)  # the same values in float32
        gzb = gz.to(torch.bfloat16)
        z = layer(xb)
        assert z.dtype == torch.bfloat16
        z32 = layer32(x32)
        z.backward(gzb)
        z32.backward(gzb.float())
        assert xb.grad.dtype == torch.bfloat16
        for k, v in layer.named_buffers():
            if v.is_floating_point():
                assert v.dtype == torch.float32, k
        # statistics are float32: identical to a float32 run on the same values
        torch.testing.assert_close(layer.running_chi, layer32.running_chi, rtol=1e-6, atol=0)
        torch.testing.assert_close(layer.chi_sq_buffer, layer32.chi_sq_buffer, rtol=1e-6, atol=0)
        torch.testing.assert_close(layer.psi_buffer, layer32.psi_buffer, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z.float(), z32, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(xb.grad.float(), x32.grad, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(layer.weight.grad, layer32.weight.grad, rtol=1e-4, atol=1e-4)
    layer.eval()
    z = layer(xb.detach())
    assert z.dtype == torch.bfloat16


def _train_steps(layer, steps, start):
    outs = []
    for step in range(start, start + steps):
        x, gz = batch(step)
        x.requires_grad_(True)
        layer.zero_grad()
        z = layer(x)
        z.backward(gz)
        outs.append((z.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
        with torch.no_grad():  # an SGD step, so parameters evolve too
            for p in layer.parameters():
                p.sub_(0.05 * p.grad)
    return outs


def test_state_dict_resume_is_bit_exact():
    K, more = 5, 5  # warm-up 2, m = 3: resume after warm-up with a wrapped ring, continue past another wrap
    full = make_layer(m=3, warmup=2)
    ref_outs = _train_steps(full, K + more, 0)

    first = make_layer(m=3, warmup=2)
    _train_steps(first, K, 0)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    fresh = MABN2d(3, buffer_size=3, momentum=0.6, clip=1.3, warmup_iters=2).double()
    result = fresh.load_state_dict(torch.load(buf))
    assert not result.missing_keys and not result.unexpected_keys
    outs = _train_steps(fresh, more, K)
    for a, b in zip(ref_outs[K:], outs):
        for ta, tb in zip(a, b):
            assert torch.equal(ta, tb)
    for (k, v), (k2, v2) in zip(full.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert set(fresh.state_dict()) == {
        "weight", "bias", "running_chi", "chi_sq_buffer", "psi_buffer", "num_batches_tracked", "psi_count"}


def test_missing_state_is_reported():
    layer = MABN2d(3)
    sd = layer.state_dict()
    del sd["psi_buffer"]
    with pytest.raises(RuntimeError, match="psi_buffer"):
        MABN2d(3).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="chi_sq_buffer"):  # a different m cannot be loaded silently
        MABN2d(3, buffer_size=5).load_state_dict(layer.state_dict())


def _cfg(**mabn):
    return d2norm_cfg("MABN", **mabn)


def test_registry_builds_with_cfg_options():
    assert "MABN" in NORM_REGISTRY
    cfg_a = _cfg(BUFFER_SIZE=4, MOMENTUM=0.9, CLIP=3.0, WARMUP_ITERS=7, EPS=1e-3)
    cfg_b = _cfg(BUFFER_SIZE=32, MOMENTUM=0.5, CLIP=1.5, WARMUP_ITERS=0, EPS=0.0)
    with norm_options(cfg_a):
        a = get_norm("MABN", 8)
    with norm_options(cfg_b):
        b = get_norm("MABN", 8)
    assert isinstance(a, MABN2d) and isinstance(b, MABN2d)
    assert (a.buffer_size, a.momentum, a.clip, a.warmup_iters, a.eps) == (4, 0.9, 3.0, 7, 1e-3)
    assert (b.buffer_size, b.momentum, b.clip, b.warmup_iters, b.eps) == (32, 0.5, 1.5, 0, 0.0)
    assert a.chi_sq_buffer.shape == (4, 8) and b.psi_buffer.shape == (32, 8)
    with norm_options(add_d2norm_config(get_cfg())):
        d = get_norm("MABN", 8)
    assert (d.buffer_size, d.momentum, d.warmup_iters) == (16, 0.98, 100)


@pytest.mark.parametrize("key,value", [
    ("BUFFER_SIZE", 0), ("BUFFER_SIZE", -3), ("CLIP", 0.5), ("CLIP", -2.0), ("MOMENTUM", 1.0),
    ("MOMENTUM", -0.1), ("MOMENTUM", 1.5), ("WARMUP_ITERS", -1), ("EPS", -1e-5),
])
def test_bad_options_raise(key, value):
    with pytest.raises(ValueError, match=str(value).replace(".", r"\.").replace("-", r"\-")):
        with norm_options(_cfg(**{key: value})):
            get_norm("MABN", 4)
    kw = {"BUFFER_SIZE": "buffer_size", "CLIP": "clip", "MOMENTUM": "momentum",
          "WARMUP_ITERS": "warmup_iters", "EPS": "eps"}[key]
    with pytest.raises(ValueError, match=r"\[0, 1\)|>= 1|>= 0"):
        MABN2d(4, **{kw: value})
    with pytest.raises(ValueError, match="integer"):
        MABN2d(4, buffer_size=2.5)


def test_wrong_channel_count_raises():
    with pytest.raises(ValueError, match="expects"):
        MABN2d(4)(torch.randn(2, 3, 2, 2))


# ---- CenteredConv2d (eq 18) ----------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 2])
def test_centered_conv_forward_and_gradient(groups):
    from detectron2.layers import Conv2d

    torch.manual_seed(0)
    conv = CenteredConv2d(4, 6, kernel_size=3, padding=1, stride=1, groups=groups, bias=True).double()
    assert isinstance(conv, Conv2d)
    with torch.no_grad():
        conv.weight.mul_(3).add_(0.7)  # non-zero mean per output channel
    x = (torch.randn(2, 4, 5, 5, dtype=torch.float64) * 3 + 2).requires_grad_(True)
    W = conv.weight.detach()
    # eq 18: W̄ = mean over the p = in/groups*kh*kw inputs of each output row
    p = W[0].numel()
    Wc = W - W.reshape(6, p).sum(1).div(p).view(6, 1, 1, 1)
    z = conv(x)
    torch.testing.assert_close(z, F.conv2d(x, Wc, conv.bias, 1, 1, 1, groups), rtol=1e-12, atol=1e-12)
    assert torch.allclose(conv.centered_weight().sum(dim=(1, 2, 3)), torch.zeros(6, dtype=torch.float64))
    gz = torch.randn_like(z)
    z.backward(gz)
    G = torch.nn.grad.conv2d_weight(x.detach(), W.shape, gz, 1, 1, 1, groups)  # ∂L/∂(W − W̄)
    expect_w = G - G.reshape(6, p).sum(1).div(p).view(6, 1, 1, 1)  # chain rule through the centering
    torch.testing.assert_close(conv.weight.grad, expect_w, rtol=1e-10, atol=1e-10)
    expect_x = torch.nn.grad.conv2d_input(x.shape, Wc, gz, 1, 1, 1, groups)
    torch.testing.assert_close(x.grad, expect_x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(conv.bias.grad, gz.sum(dim=(0, 2, 3)))


def test_centered_weight_first_and_second_order_gradients():
    """The written-out backward of eq 18's centering (∂L/∂W = G − mean(G)) against finite differences, to
    first and second order (the projection is linear, so higher-order gradients must still flow)."""
    from d2norm.layers.mabn import _CenterRows

    torch.manual_seed(1)
    w = (torch.randn(4, 3, 3, 3, dtype=torch.float64) * 2 + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(_CenterRows.apply, (w,))
    assert torch.autograd.gradgradcheck(_CenterRows.apply, (w,))


def test_centered_conv_accepts_norm_and_activation_like_detectron2():
    from detectron2.layers import Conv2d

    with norm_options(_cfg(WARMUP_ITERS=0, BUFFER_SIZE=2)):
        conv = CenteredConv2d(3, 4, kernel_size=3, padding=1, bias=False, norm=get_norm("MABN", 4),
                              activation=F.relu)
    assert isinstance(conv.norm, MABN2d) and conv.norm.buffer_size == 2
    plain = Conv2d(3, 4, kernel_size=3, padding=1, bias=False, norm=MABN2d(4, buffer_size=2))
    assert set(plain.state_dict()) == set(conv.state_dict())
    conv.load_state_dict(plain.state_dict())  # loads detectron2 Conv2d checkpoints unchanged
    conv.eval()
    x = torch.randn(2, 3, 6, 6) * 3 + 2
    w = conv.weight - conv.weight.mean(dim=(1, 2, 3), keepdim=True)
    expect = F.relu(conv.norm(F.conv2d(x, w, None, 1, 1)))
    torch.testing.assert_close(conv(x), expect)
    assert (conv(x) >= 0).all()
    conv.train()
    z = conv(torch.zeros(0, 3, 6, 6))
    assert z.shape == (0, 4, 6, 6)


def test_2d_input_equals_4d_with_unit_spatial_size():
    """(N, C) input (e.g. a box-head feature) is the (N, C, 1, 1) case."""
    a, b = make_layer(m=2, warmup=1), make_layer(m=2, warmup=1)
    for step in range(3):
        x, gz = batch(step, shape=(5, 3, 1, 1))
        x4 = x.clone().requires_grad_(True)
        x2 = x.view(5, 3).clone().requires_grad_(True)
        z4, z2 = a(x4), b(x2)
        z4.backward(gz)
        z2.backward(gz.view(5, 3))
        assert z2.shape == (5, 3)
        torch.testing.assert_close(z2, z4.view(5, 3), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x2.grad, x4.grad.view(5, 3), rtol=1e-12, atol=1e-12)
    for (k, v), (_, w) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(v, w, rtol=1e-12, atol=0, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    cpu = make_layer(m=3, warmup=2, dtype=torch.float32)
    gpu = make_layer(m=3, warmup=2, dtype=torch.float32).cuda()
    for step in range(6):
        x, gz = batch(step, dtype=torch.float32)
        xc = x.to(dtype).requires_grad_(True)
        xg = x.to(dtype).cuda().requires_grad_(True)
        zc, zg = cpu(xc), gpu(xg)
        assert zg.dtype == dtype
        zc.backward(gz.to(dtype))
        zg.backward(gz.to(dtype).cuda())
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(zg.cpu(), zc, **tol)
        torch.testing.assert_close(xg.grad.cpu(), xc.grad, **tol)
        torch.testing.assert_close(gpu.weight.grad.cpu(), cpu.weight.grad, rtol=1e-3, atol=1e-3)
        cpu.zero_grad()
        gpu.zero_grad()
    for (k, v), (_, w) in zip(cpu.named_buffers(), gpu.named_buffers()):
        torch.testing.assert_close(w.cpu(), v, rtol=1e-4, atol=1e-6, msg=k)


def test_weight_decay_norm_applies_to_gamma_beta():
    """four-things §3.3: SOLVER.WEIGHT_DECAY_NORM applies to MABN's γ/β; the conv weight keeps WEIGHT_DECAY."""
    from d2norm.solver import get_optimizer_params

    conv = CenteredConv2d(3, 4, kernel_size=3, bias=False, norm=MABN2d(4))
    groups = get_optimizer_params(conv, base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.0)
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd[id(conv.norm.weight)] == 0.0 and wd[id(conv.norm.bias)] == 0.0
    assert wd[id(conv.weight)] == 1e-4


class RefReleasedSchedule(RefMABN):
    """The released code's schedule (megvii MABN.py) on top of eqs 15, 19, 20, with t = 1, 2, ...: batch
    statistics while t <= m or t < warm-up; r = 1 while t <= max(1000, warm-up); λ = 5."""

    def forward(self, x, gamma, beta, chi_hat_prev):
        t = self.t + 1
        chi_sq_b = (x * x).mean(dim=DIMS) + self.eps
        self.warm = t <= self.m or t < self.warmup
        self.chi_sq_hist.append(chi_sq_b)
        window = self.chi_sq_hist[-self.m:]
        chi_bar = chi_sq_b.sqrt() if self.warm else (sum(window) / len(window)).sqrt()
        self.chi_hat = self.alpha * chi_hat_prev + (1 - self.alpha) * chi_sq_b.sqrt()
        ratio = chi_bar / self.chi_hat
        r_one = self.warm or t <= max(1000, self.warmup)
        self.r = torch.ones_like(ratio) if r_one else ratio.clamp(1 / 5, 5)
        self.clipped = (ratio < 1 / 5) | (ratio > 5)
        self.x, self.gamma, self.chi_bar = x, gamma, chi_bar
        self.Y = x / cview(chi_bar)
        self.Yhat = cview(self.r) * self.Y
        self.t += 1
        return cview(gamma) * self.Yhat + cview(beta)


@pytest.mark.slow
@pytest.mark.parametrize("m,warmup", [(3, 5), (6, 2), (2, 1200)])
def test_released_schedule_matches_float64_reference(m, warmup):
    """SCHEDULE "released" over 1210 steps (the r = 1 phase ends after step max(1000, warm-up)): forward,
    gradients and χ̂ against the float64 reference of that schedule; the default ("paper") is unchanged."""
    alpha, eps = 0.6, 1e-5
    layer = MABN2d(3, buffer_size=m, momentum=alpha, clip=5.0, warmup_iters=warmup, eps=eps,
                   schedule="released").double()
    assert MABN2d(3).schedule == "paper" and layer.phase_iters() == (max(m, warmup - 1), max(1000, warmup))
    ref = RefReleasedSchedule(m, alpha, 5.0, warmup, eps)
    chi_hat = torch.ones(3, dtype=torch.float64)
    r_not_one = []
    for step in range(1210):
        x, gz = batch(step, shape=(2, 3, 2, 2))
        x.requires_grad_(True)
        layer.zero_grad()
        z = layer(x)
        zr = ref.forward(x.detach(), layer.weight.detach(), layer.bias.detach(), chi_hat)
        chi_hat = ref.chi_hat
        z.backward(gz)
        dx, dg, db = ref.backward(gz)
        if step % 50 == 0 or 995 <= step <= 1005 or step >= 1195 or step < 10:
            torch.testing.assert_close(z, zr, rtol=1e-10, atol=1e-10, msg=lambda s: f"step {step + 1}: {s}")
            torch.testing.assert_close(x.grad, dx, rtol=1e-9, atol=1e-10, msg=lambda s: f"step {step + 1}: {s}")
            torch.testing.assert_close(layer.weight.grad, dg, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(layer.running_chi, ref.chi_hat, rtol=1e-12, atol=0)
        r_not_one.append(bool((ref.r != 1).any()))
    first = r_not_one.index(True) + 1 if any(r_not_one) else None
    assert first == max(1000, warmup) + 1  # renormalization starts right after the r = 1 phase


def test_schedule_option_from_cfg_and_validation():
    cfg = add_d2norm_config(get_cfg())
    assert cfg.D2NORM.MABN.SCHEDULE == "paper"
    cfg.D2NORM.MABN.SCHEDULE = "released"
    with norm_options(cfg):
        assert get_norm("MABN", 4).schedule == "released"
    with pytest.raises(ValueError, match=r"SCHEDULE.*\('paper', 'released'\).*'official'"):
        MABN2d(4, schedule="official")
