"""Numerical precision of every layer that pools statistics across ranks / domains / EMA steps when |mean| ≫ std
(rethinking A.10 "numerical precision"; A.6 SyncBN).

float32 inputs with mean 0, 1e2, 1e3, 1e4 and std 1, against an independent float64 reference written from
the definitions (BatchNorm over the concatenation of every rank's / domain's batch; four-things eq 3 from
float64 EMAs of E[x], E[x²]). Thresholds: output and input gradient max abs error ≤ 2e-3, running-variance
relative error ≤ 1e-3 — torch's own float32 ``nn.BatchNorm2d`` meets them on the same inputs (checked here too).
E[x²] − E[x]² in float32 misses them by orders of magnitude at 1e3–1e4.
"""
import pytest
import torch
from torch import nn

import d2norm  # noqa: F401
from d2norm.layers.batch_group_norm import BatchGroupNorm
from d2norm.layers.domain_bn import DomainBatchNorm2d
from d2norm.layers.sync_bn import AnySyncBatchNorm2d, SyncBatchNormFunction
from d2norm.layers.sync_domain_bn import SyncDomainBatchNorm2d
from dist_utils import run_distributed
from helpers import bn_train, ema

OFFSETS = (0.0, 1e2, 1e3, 1e4)
C = 4
EPS = 1e-5
MOMENTUM = 0.1
OUT_TOL, GRAD_TOL, VAR_RTOL = 2e-3, 2e-3, 1e-3
# per-rank shapes (rank 0, rank 1): uneven and one empty rank
RANK_SHAPES = {"uneven": [(3, C, 5, 5), (5, C, 5, 5)], "empty_rank": [(0, C, 5, 5), (4, C, 5, 5)]}


# ---- independent float64 reference ------------------------------------------------------------------------
def ref_bn(xs, dys, rv0=1.0):
    """BN over the concatenation of all elements of ``xs`` (per channel), float64: outputs, input gradients of
    Σ y·dy, and the EMA running_var after one update from ``rv0`` (unbiased variance, torch's convention)."""
    xs = [x.detach().double().requires_grad_() for x in xs]
    ys, _, unbiased = bn_train(xs, eps=EPS)
    sum((y * dy.double()).sum() for y, dy in zip(ys, dys)).backward()
    rv = ema(rv0, unbiased.detach(), MOMENTUM)
    return [y.detach() for y in ys], [x.grad for x in xs], rv


def _max_err(got, ref):
    return 0.0 if ref.numel() == 0 else (got.double() - ref).abs().max().item()


def _rel(got, ref):
    return ((got.double() - ref).abs() / ref.abs()).max().item()


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for case, shapes in RANK_SHAPES.items():
        for off in OFFSETS:
            # two domains per rank with different offsets (domain 1 = offset + 3 std), for the domain layers
            xs = [[(torch.randn(s, generator=g, dtype=torch.float64) + off + 3 * d).float() for s in shapes]
                  for d in range(2)]
            dys = [[torch.randn(s, generator=g, dtype=torch.float64).float() for s in shapes] for d in range(2)]
            out[(case, off)] = (xs, dys)
    return out


def _check(name, ys, gxs, rv, ref):
    ys_ref, gxs_ref, rv_ref = ref
    for y, yr in zip(ys, ys_ref):
        assert _max_err(y, yr) <= OUT_TOL, (name, "output", _max_err(y, yr))
    for gx, gr in zip(gxs, gxs_ref):
        assert _max_err(gx, gr) <= GRAD_TOL, (name, "grad", _max_err(gx, gr))
    assert _rel(rv, rv_ref) <= VAR_RTOL, (name, "running_var", _rel(rv, rv_ref))


# ---- one process ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", OFFSETS)
def test_single_process_any_sync_bn_function_domain_bn(offset):
    xs_all, dys_all = _data()[("uneven", offset)]
    x, dy = torch.cat(xs_all[0]), torch.cat(dys_all[0])
    ref = ref_bn([x], [dy])
    # torch's float32 BN meets the thresholds (the bar every d2norm layer is measured against)
    bn = nn.BatchNorm2d(C, eps=EPS, momentum=MOMENTUM, affine=False).train()
    xb = x.clone().requires_grad_()
    yb = bn(xb)
    (yb * dy).sum().backward()
    _check("nn.BatchNorm2d", [yb.detach()], [xb.grad], bn.running_var, ref)
    # AnySyncBN in one process, and its synchronized autograd Function itself (what runs on every rank)
    layer = AnySyncBatchNorm2d(C, eps=EPS, momentum=MOMENTUM, affine=False).train()
    xa = x.clone().requires_grad_()
    ya = layer(xa)
    (ya * dy).sum().backward()
    _check("AnySyncBN", [ya.detach()], [xa.grad], layer.running_var, ref)
    xf = x.clone().requires_grad_()
    yf, _, var, count = SyncBatchNormFunction.apply(xf, None, None, EPS, None)
    (yf * dy).sum().backward()
    m = float(count)
    _check("SyncBatchNormFunction", [yf.detach()], [xf.grad], 0.9 + 0.1 * var * m / (m - 1), ref)
    # DomainBN with shared training statistics over two domains of different means (rethinking Alg. 1 Row1)
    dom = DomainBatchNorm2d(C, 2, train_stats="shared", pop_stats="shared", eps=EPS, momentum=MOMENTUM).train()
    xd = [torch.cat(xs_all[d]).requires_grad_() for d in range(2)]
    dyd = [torch.cat(dys_all[d]) for d in range(2)]
    yd = dom.forward_domains(xd)
    sum((y * g).sum() for y, g in zip(yd, dyd)).backward()
    _check("DomainBN shared", [y.detach() for y in yd], [t.grad for t in xd], dom.running_var, ref_bn(xd, dyd))


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_bgn_inference_after_ema(offset, alpha):
    """four-things eq 3 after 30 cumulative-average EMA steps (momentum None forgets the init at once, so the
    variance is ~1 while E[x²] ~ offset²): the float64 reference keeps literal EMAs of E[x] and E[x²]."""
    G = 2
    g = torch.Generator().manual_seed(3)
    layer = BatchGroupNorm(C, G, example_group_size=2, alpha=alpha, eps=EPS, momentum=None, affine=False).train()
    m_x = torch.zeros(G, dtype=torch.float64)
    m_x2 = torch.ones(G, dtype=torch.float64)
    for k in range(1, 31):
        x = (torch.randn(4, C, 3, 3, generator=g, dtype=torch.float64) + offset).float()
        layer(x)
        xg = x.double().reshape(4, G, -1)
        f = 1.0 / k
        m_x = (1 - f) * m_x + f * xg.mean((0, 2))
        m_x2 = (1 - f) * m_x2 + f * (xg * xg).mean((0, 2))
    torch.testing.assert_close(layer.running_var.double(), m_x2 - m_x * m_x, rtol=VAR_RTOL, atol=0)
    x = (torch.randn(3, C, 3, 3, generator=g, dtype=torch.float64) + offset).float()
    dy = torch.randn(3, C, 3, 3, generator=g, dtype=torch.float64)
    layer.eval()
    xe = x.clone().requires_grad_()
    y = layer(xe)
    (y * dy.float()).sum().backward()
    xr = x.double().requires_grad_()
    xg = xr.reshape(3, G, -1)
    mu = alpha * xg.mean(2) + (1 - alpha) * m_x  # eq 3
    var = alpha * (xg * xg).mean(2) + (1 - alpha) * m_x2 - mu * mu
    yr = ((xg - mu[..., None]) / torch.sqrt(var[..., None] + EPS)).reshape_as(xr)
    (yr * dy).sum().backward()
    assert _max_err(y, yr.detach()) <= OUT_TOL, _max_err(y, yr.detach())
    assert _max_err(xe.grad, xr.grad) <= GRAD_TOL, _max_err(xe.grad, xr.grad)


# ---- 2 gloo processes -------------------------------------------------------------------------------------
def _worker(rank, world_size, data):
    out = {}
    for key, (xs, dys) in data.items():
        layer = AnySyncBatchNorm2d(C, eps=EPS, momentum=MOMENTUM, affine=False).train()
        x = xs[0][rank].clone().requires_grad_()
        y = layer(x)
        (y * dys[0][rank]).sum().backward()
        out[("anysync",) + key] = ([y.detach()], [x.grad], layer.running_var.clone())
        for ts in ("shared", "per_domain"):
            dom = SyncDomainBatchNorm2d(C, 2, train_stats=ts, pop_stats="per_domain", eps=EPS,
                                        momentum=MOMENTUM).train()
            xd = [xs[d][rank].clone().requires_grad_() for d in range(2)]
            yd = dom.forward_domains(xd)
            sum((t * dys[d][rank]).sum() for d, t in enumerate(yd)).backward()
            out[(ts,) + key] = ([t.detach() for t in yd], [t.grad for t in xd], dom.running_var.clone())
    return out


def test_two_gloo_ranks_uneven_and_empty():
    data = _data(seed=1)
    res = run_distributed(_worker, world_size=2, args=(data,))
    for (case, off), (xs, dys) in data.items():
        name = (case, off)
        # AnySyncBN: BN of the concatenation of both ranks' batches
        ys, gxs, rv = ref_bn(xs[0], dys[0])
        for r in range(2):
            y, gx, rv_got = res[r][("anysync", case, off)]
            _check(("anysync",) + name, y, gx, rv_got, ([ys[r]], [gxs[r]], rv))
        # SyncDomainBN shared training statistics: one BN over both ranks and both domains; each domain's EMA
        # row is that domain's own global statistics (Table 5 row 2 layout)
        ys, gxs, _ = ref_bn(xs[0] + xs[1], dys[0] + dys[1])
        rows = [ref_bn(xs[d], dys[d]) for d in range(2)]
        for r in range(2):
            y, gx, rv_got = res[r][("shared", case, off)]
            _check(("shared",) + name, y, gx, rv_got[0], ([ys[r], ys[2 + r]], [gxs[r], gxs[2 + r]], rows[0][2]))
            assert _rel(rv_got[1], rows[1][2]) <= VAR_RTOL, name
            # per-domain training statistics: each domain is BN over both ranks' inputs of that domain
            y, gx, rv_got = res[r][("per_domain", case, off)]
            for d in range(2):
                _check(("per_domain", d) + name, [y[d]], [gx[d]], rv_got[d], ([rows[d][0][r]], [rows[d][1][r]],
                                                                            rows[d][2]))
