"""AnySyncBN (rethinking A.5, A.6, A.10) against an independent float64 BatchNorm reference over the union of
every rank's batch, on 2 real gloo processes (equal, uneven, empty and differently-shaped per-rank batches),
plus the single-process shared requirements."""
import logging

import pytest
import torch
from torch import nn

import d2norm  # noqa: F401
import d2norm.layers.sync_bn  # noqa: F401  (registers "AnySyncBN")
from d2norm.layers.registry import get_norm, norm_options
from d2norm.layers.sync_bn import AnySyncBatchNorm2d, SyncBatchNormFunction
from dist_utils import run_distributed
from helpers import bn_normalize, bn_train

C = 3
EPS = 1e-5


# ---- independent float64 reference (rethinking A.6: statistics of the whole normalization batch) ----------


def ref_step(xs, dys, w, b, rm0, rv0, momentum):
    """Reference forward/backward over the union and the EMA update; float64."""
    xs = [x.detach().double().clone().requires_grad_() for x in xs]
    w = w.detach().double().clone().requires_grad_()
    b = b.detach().double().clone().requires_grad_()
    ys, mu, unbiased = bn_train(xs, w, b, EPS)
    sum(((y * dy.double()).sum() for y, dy in zip(ys, dys)), torch.zeros((), dtype=torch.float64)).backward()
    m = sum(x.shape[0] * x.shape[2] * x.shape[3] for x in xs)
    if m > 0:
        rm = (1 - momentum) * rm0.double() + momentum * mu.detach()
        rv = (1 - momentum) * rv0.double() + momentum * unbiased.detach()
    else:
        rm, rv = rm0.double(), rv0.double()
    return dict(
        ys=[y.detach() for y in ys],
        gx=[x.grad if x.grad is not None else torch.zeros_like(x) for x in xs],
        gw=w.grad if w.grad is not None else torch.zeros_like(w),
        gb=b.grad if b.grad is not None else torch.zeros_like(b),
        rm=rm,
        rv=rv,
    )


def _rand(shape, g, dtype=torch.float64):
    return torch.randn(shape, generator=g, dtype=dtype) * 3 + 2


def _params(g):
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(C, generator=g, dtype=torch.float64)
    rm0 = torch.randn(C, generator=g, dtype=torch.float64)
    rv0 = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    return w, b, rm0, rv0


def _make_layer(w, b, rm0, rv0, dtype=torch.float64, **kw):
    layer = AnySyncBatchNorm2d(C, eps=EPS, **kw).to(dtype if dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
        layer.running_mean.copy_(rm0)
        layer.running_var.copy_(rv0)
    return layer


# ---- 2 real gloo processes ---------------------------------------------------------------------------------

# name -> per-rank input shapes (rank 0, rank 1), dtype, layer kwargs
DIST_CASES = {
    "equal": ([(4, C, 3, 2), (4, C, 3, 2)], torch.float64, dict(momentum=0.1)),
    "uneven": ([(3, C, 3, 2), (5, C, 3, 2)], torch.float64, dict(momentum=0.3)),
    "empty_rank": ([(0, C, 3, 2), (4, C, 3, 2)], torch.float64, dict(momentum=0.1)),
    "all_empty": ([(0, C, 3, 2), (0, C, 3, 2)], torch.float64, dict(momentum=0.1)),
    "different_hw": ([(2, C, 3, 3), (3, C, 2, 4)], torch.float64, dict(momentum=None)),
    "bf16_uneven": ([(3, C, 4, 4), (5, C, 4, 4)], torch.bfloat16, dict(momentum=0.1)),
    "group_of_one": ([(3, C, 3, 2), (5, C, 3, 2)], torch.float64, dict(momentum=0.1, sync_group_size=1)),
}


def _dist_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    data = {}
    for name, (shapes, dtype, kw) in DIST_CASES.items():
        xs = [_rand(s, g).to(dtype) for s in shapes]
        dys = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
        data[name] = (xs, dys, _params(g))
    data["roi"] = [_rand((n, C, 3, 3), g) for n in ROI_SIZES]
    data["roi_dy"] = [torch.randn(n, 6, generator=g, dtype=torch.float64) for n in ROI_SIZES]
    return data


ROI_SIZES = (0, 5)  # RoIs per rank


def _box_head():
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead

    from d2norm import add_d2norm_config

    cfg = add_d2norm_config(get_cfg())
    cfg.MODEL.ROI_BOX_HEAD.NORM = "AnySyncBN"
    cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.CONV_DIM = 2, 4
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC, cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 1, 6
    torch.manual_seed(0)  # identical weights on every rank and in the single-process reference
    with norm_options(cfg):
        head = FastRCNNConvFCHead(cfg, ShapeSpec(channels=C, height=3, width=3)).double().train()
    assert sum(isinstance(m, AnySyncBatchNorm2d) for m in head.modules()) == 2
    return head


class _CountingAllReduce:
    """Counts torch.distributed collectives (all_reduce, all_gather_into_tensor); the layer must make exactly
    one per forward and one per backward."""

    _NAMES = ("all_reduce", "all_gather_into_tensor", "all_gather", "broadcast")

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.calls = dist, 0
        self.orig = {n: getattr(dist, n) for n in self._NAMES}

    def __enter__(self):
        def counting(fn):
            def counted(*a, **k):
                self.calls += 1
                return fn(*a, **k)

            return counted

        for n, fn in self.orig.items():
            setattr(self.dist, n, counting(fn))
        return self

    def __exit__(self, *exc):
        for n, fn in self.orig.items():
            setattr(self.dist, n, fn)


# ---- reference implementations of torch's CUDA SyncBN kernels (CUDA-only ops), for the layer's CUDA route ------
# Written from what the kernels compute (ATen Normalization.cuh: Welford statistics with invstd = 1/sqrt(var + eps),
# 0 when var and eps are both 0; backward_reduce's sums; backward_elemt's BN input gradient with 1/Σcount). They
# let the CPU suite run the route's plumbing (argument order, eps, counts, dtypes, empty ranks);
# tools/gpu_selfcheck.py runs the real kernels.


def _ref_batch_norm_stats(x, eps):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(x.to(acc), dim=(0, 2, 3), correction=0)
    invstd = torch.where((var == 0) & (eps == 0), torch.zeros_like(var), (var + eps).rsqrt())
    return mean, invstd


def _ref_batch_norm_backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g):
    acc, shape = mean.dtype, (1, -1, 1, 1)
    sum_dy = dy.to(acc).sum((0, 2, 3))
    sum_dy_xmu = (dy.to(acc) * (x.to(acc) - mean.view(shape))).sum((0, 2, 3))
    return (sum_dy if input_g else None, sum_dy_xmu if input_g else None,
            (sum_dy_xmu * invstd).to(weight.dtype) if weight_g else None,
            sum_dy.to(weight.dtype) if bias_g else None)


def _ref_batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    assert count.dtype == torch.int32
    acc, shape = mean.dtype, (1, -1, 1, 1)
    norm = 1.0 / count.sum().to(acc)
    scale = invstd * (weight.to(acc) if weight is not None else 1.0)
    gx = (dy.to(acc) - (sum_dy * norm).view(shape)
          - (x.to(acc) - mean.view(shape)) * (invstd * invstd * sum_dy_xmu * norm).view(shape)) * scale.view(shape)
    return gx.to(x.dtype)


def _use_kernel_route():
    """In a worker process: AnySyncBN's CUDA route on CPU tensors, with the reference kernels above."""
    import d2norm.layers.sync_bn as sync_bn

    sync_bn.torch_kernels_enabled = lambda x: x.numel() > 0
    torch.batch_norm_stats = _ref_batch_norm_stats
    torch.batch_norm_backward_reduce = _ref_batch_norm_backward_reduce
    torch.batch_norm_backward_elemt = _ref_batch_norm_backward_elemt


def _sync_bn_worker(rank, world_size, data, route="torch"):
    if route == "kernels":
        _use_kernel_route()
    out = {}
    for name, (shapes, dtype, kw) in DIST_CASES.items():
        xs, dys, (w, b, rm0, rv0) = data[name]
        layer = _make_layer(w, b, rm0, rv0, dtype=dtype, **kw).train()
        x = xs[rank].clone().requires_grad_()
        with _CountingAllReduce() as fwd:
            y = layer(x)
        with _CountingAllReduce() as bwd:
            (y * dys[rank]).sum().backward()
        out[name] = dict(
            y=y.detach(), gx=x.grad.clone(), gw=layer.weight.grad.clone(), gb=layer.bias.grad.clone(),
            buffers={k: v.clone() for k, v in layer.named_buffers()}, calls=(fwd.calls, bwd.calls),
        )
        # eval: population statistics, no communication, no buffer change (only rank 0 runs it: a collective
        # would deadlock, and the helper would fail the test after its timeout)
        if rank == 0 and name == "uneven":
            layer.eval()
            before = {k: v.clone() for k, v in layer.named_buffers()}
            xe = xs[1].clone().requires_grad_()
            with _CountingAllReduce() as ev:
                ye = layer(xe)
            ye.sum().backward()
            out["eval"] = dict(y=ye.detach(), gx=xe.grad.clone(), calls=ev.calls,
                               unchanged=all(torch.equal(before[k], v) for k, v in layer.named_buffers()))
    # stock detectron2 box head with NORM "AnySyncBN", rank 0 with no RoI (rethinking A.10): no deadlock
    head = _box_head()
    roi = data["roi"][rank].clone().requires_grad_()
    feat = head(roi)
    (feat * data["roi_dy"][rank]).sum().backward()
    out["head"] = dict(y=feat.detach(), grads={k: p.grad.clone() for k, p in head.named_parameters()},
                       buffers={k: v.clone() for k, v in head.named_buffers()})
    # a group size that does not divide the world size: ValueError on every rank
    try:
        AnySyncBatchNorm2d(C, sync_group_size=3).train()(torch.randn(2, C, 2, 2))
        out["bad_group"] = None
    except ValueError as e:
        out["bad_group"] = str(e)
    return out


@pytest.mark.parametrize("route", ["torch", "kernels"])
def test_sync_bn_two_gloo_ranks_equals_bn_on_concatenation(route):
    """Both routes of the layer: the torch ops every device runs, and the CUDA route (torch's SyncBN kernels,
    here their reference implementations)."""
    data = _dist_data()
    res = run_distributed(_sync_bn_worker, world_size=2, args=(data, route))
    for name, (shapes, dtype, kw) in DIST_CASES.items():
        xs, dys, (w, b, rm0, rv0) = data[name]
        momentum = kw["momentum"]
        if kw.get("sync_group_size") == 1:  # each rank alone: plain BN on its own batch
            refs = [ref_step([xs[r]], [dys[r]], w, b, rm0, rv0, momentum) for r in range(2)]
            per_rank = [(refs[r]["ys"][0], refs[r]["gx"][0], refs[r]["gw"], refs[r]["gb"], refs[r]) for r in range(2)]
            gw_total = gb_total = None
        else:
            ref = ref_step(xs, dys, w, b, rm0, rv0, 1.0 if momentum is None else momentum)
            per_rank = [(ref["ys"][r], ref["gx"][r], None, None, ref) for r in range(2)]
            gw_total, gb_total = ref["gw"], ref["gb"]
        tol = dict(rtol=0, atol=1e-10) if dtype == torch.float64 else dict(rtol=0.02, atol=0.05)
        stat_tol = dict(rtol=0, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
        for r in range(2):
            got = res[r][name]
            y_ref, gx_ref, gw_ref, gb_ref, ref_r = per_rank[r]
            assert got["y"].dtype == dtype and got["y"].shape == shapes[r], name
            assert got["gx"].dtype == dtype and got["gx"].shape == shapes[r], name
            torch.testing.assert_close(got["y"].double(), y_ref, **tol, msg=lambda m: f"{name} y: {m}")
            torch.testing.assert_close(got["gx"].double(), gx_ref, **tol, msg=lambda m: f"{name} dx: {m}")
            if gw_ref is not None:
                torch.testing.assert_close(got["gw"].double(), gw_ref, **tol)
                torch.testing.assert_close(got["gb"].double(), gb_ref, **tol)
            bufs = got["buffers"]
            assert bufs["running_mean"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert not any(torch.isnan(v.double()).any() for v in bufs.values()), name
            torch.testing.assert_close(bufs["running_mean"].double(), ref_r["rm"], **stat_tol)
            torch.testing.assert_close(bufs["running_var"].double(), ref_r["rv"], **stat_tol)
            assert bufs["num_batches_tracked"].item() == 1
            # one all-reduce forward, one backward (a single process makes none)
            assert got["calls"] == ((0, 0) if kw.get("sync_group_size") == 1 else (1, 1)), name
        if gw_total is not None:
            # each rank returns its share of dγ, dβ; data parallelism sums them (DDP all-reduces gradients)
            torch.testing.assert_close((res[0][name]["gw"] + res[1][name]["gw"]).double(), gw_total, **tol)
            torch.testing.assert_close((res[0][name]["gb"] + res[1][name]["gb"]).double(), gb_total, **tol)
            # every rank ends with identical buffers
            for k in res[0][name]["buffers"]:
                assert torch.equal(res[0][name]["buffers"][k], res[1][name]["buffers"][k]), (name, k)
    # the empty rank's share of dγ, dβ is exactly zero and its outputs are empty
    assert torch.equal(res[0]["empty_rank"]["gw"], torch.zeros(C, dtype=torch.float64))
    assert res[0]["empty_rank"]["y"].shape == (0, C, 3, 2)
    # all ranks empty: EMA untouched
    assert torch.equal(res[0]["all_empty"]["buffers"]["running_mean"], data["all_empty"][2][2])

    # eval on one rank only: population statistics, no collective, buffers unchanged
    ev = res[0]["eval"]
    xs, _, (w, b, _, _) = data["uneven"]
    rm, rv = res[0]["uneven"]["buffers"]["running_mean"], res[0]["uneven"]["buffers"]["running_var"]
    xe = xs[1].clone().requires_grad_()
    ye = bn_normalize(xe, rm, rv, EPS, w, b)
    ye.sum().backward()
    assert ev["calls"] == 0 and ev["unchanged"]
    torch.testing.assert_close(ev["y"], ye.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(ev["gx"], xe.grad, rtol=0, atol=1e-10)
    # the box head over 2 ranks (0 and 5 RoIs) equals the same head (plain BN) on the 5 RoIs in one process;
    # parameter gradients summed over ranks (what DDP does) equal the single-process ones
    head = _box_head()
    roi = torch.cat(data["roi"]).requires_grad_()
    feat = head(roi)
    (feat * torch.cat(data["roi_dy"])).sum().backward()
    assert res[0]["head"]["y"].shape == (0, 6)
    torch.testing.assert_close(res[1]["head"]["y"], feat.detach(), rtol=0, atol=1e-10)
    for k, p in head.named_parameters():
        torch.testing.assert_close(res[0]["head"]["grads"][k] + res[1]["head"]["grads"][k], p.grad,
                                   rtol=0, atol=1e-10, msg=lambda m: f"head grad {k}: {m}")
    for k, v in head.named_buffers():
        assert torch.equal(res[0]["head"]["buffers"][k], res[1]["head"]["buffers"][k]), k
        torch.testing.assert_close(res[1]["head"]["buffers"][k], v, rtol=0, atol=1e-10)
    for r in range(2):
        assert res[r]["bad_group"] is not None and "3" in res[r]["bad_group"] and "world size 2" in res[r]["bad_group"]


# ---- single process -----------------------------------------------------------------------------------------


def test_function_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    x = _rand((3, C, 2, 3), g).requires_grad_()
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(C, generator=g, dtype=torch.float64).requires_grad_()
    fn = lambda x, w, b: SyncBatchNormFunction.apply(x, w, b, EPS, None)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    fn_noaffine = lambda x: SyncBatchNormFunction.apply(x, None, None, EPS, None)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn_noaffine, (x,))


def test_function_matches_reference_single_process():
    # The synchronized math itself (what runs on every rank), without communication.
    g = torch.Generator().manual_seed(2)
    x = _rand((4, C, 3, 3), g).requires_grad_()
    dy = torch.randn(4, C, 3, 3, generator=g, dtype=torch.float64)
    w, b, rm0, rv0 = _params(g)
    wp, bp = w.clone().requires_grad_(), b.clone().requires_grad_()
    y, mean, var, count = SyncBatchNormFunction.apply(x, wp, bp, EPS, None)
    (y * dy).sum().backward()
    ref = ref_step([x], [dy], w, b, rm0, rv0, 0.1)
    torch.testing.assert_close(y.detach(), ref["ys"][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, ref["gx"][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(wp.grad, ref["gw"], rtol=0, atol=1e-12)
    torch.testing.assert_close(bp.grad, ref["gb"], rtol=0, atol=1e-12)
    assert count.item() == 36
    torch.testing.assert_close(mean, x.detach().mean((0, 2, 3)), rtol=0, atol=1e-12)
    torch.testing.assert_close(var, x.detach().var((0, 2, 3), unbiased=False), rtol=0, atol=1e-12)


def test_function_bf16_and_zero_size():
    g = torch.Generator().manual_seed(3)
    x64 = _rand((4, C, 4, 4), g)
    xb = x64.bfloat16().requires_grad_()
    w, b = torch.ones(C), torch.zeros(C)
    y, mean, var, _ = SyncBatchNormFunction.apply(xb, w, b, EPS, None)
    assert y.dtype == torch.bfloat16 and mean.dtype == torch.float32 and var.dtype == torch.float32
    xr = xb.detach().double()
    torch.testing.assert_close(mean.double(), xr.mean((0, 2, 3)), rtol=0, atol=1e-5)  # fp32 accumulation
    torch.testing.assert_close(var.double(), xr.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-5)
    y.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    # zero size: empty output, zero statistics (never NaN), empty gradient
    xe = torch.zeros(0, C, 4, 4, requires_grad=True)
    ye, me, ve, ce = SyncBatchNormFunction.apply(xe, w, b, EPS, None)
    assert ye.shape == (0, C, 4, 4) and ce.item() == 0
    assert not torch.isnan(me).any() and not torch.isnan(ve).any()
    ye.sum().backward()
    assert xe.grad.shape == (0, C, 4, 4)


def test_single_process_is_exactly_batchnorm2d():
    g = torch.Generator().manual_seed(4)
    w, b, rm0, rv0 = _params(g)
    layer = _make_layer(w, b, rm0, rv0, momentum=0.2).train()
    bn = nn.BatchNorm2d(C, eps=EPS, momentum=0.2).double()
    bn.load_state_dict(layer.state_dict())
    for _ in range(2):
        x = _rand((4, C, 3, 3), g)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = layer(xa), bn(xb)
        assert torch.equal(ya, yb)
        ya.sum().backward()
        yb.sum().backward()
        assert torch.equal(xa.grad, xb.grad)
    for k, v in bn.state_dict().items():
        assert torch.equal(layer.state_dict()[k], v), k
    # and BN is the reference
    x = _rand((4, C, 3, 3), g)
    ref = ref_step([x], [torch.ones_like(x)], layer.weight, layer.bias, layer.running_mean, layer.running_var, 0.2)
    y = layer(x)
    torch.testing.assert_close(y.detach(), ref["ys"][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.running_mean, ref["rm"], rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.running_var, ref["rv"], rtol=0, atol=1e-12)


def test_train_updates_exactly_documented_buffers_and_eval_mutates_none():
    g = torch.Generator().manual_seed(5)
    layer = _make_layer(*_params(g)).train()
    before = {k: v.clone() for k, v in layer.named_buffers()}
    layer(_rand((3, C, 2, 2), g))
    changed = {k for k, v in layer.named_buffers() if not torch.equal(before[k], v)}
    assert changed == {"running_mean", "running_var", "num_batches_tracked"}
    layer.eval()
    before = {k: v.clone() for k, v in layer.named_buffers()}
    x = _rand((3, C, 2, 2), g).requires_grad_()
    y = layer(x)
    y.sum().backward()
    for k, v in layer.named_buffers():
        assert torch.equal(before[k], v), k
    torch.testing.assert_close(y.detach(), bn_normalize(x.detach(), layer.running_mean, layer.running_var, EPS,
                                                        layer.weight.detach(), layer.bias.detach()), rtol=0, atol=1e-12)


def test_zero_size_single_process():
    layer = _make_layer(*_params(torch.Generator().manual_seed(6))).train()
    rm = layer.running_mean.clone()
    x = torch.zeros(0, C, 4, 4, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, C, 4, 4)
    y.sum().backward()
    assert torch.equal(layer.running_mean, rm) and not torch.isnan(layer.running_var).any()
    layer.eval()
    assert layer(x).shape == (0, C, 4, 4)


def test_bf16_single_process():
    g = torch.Generator().manual_seed(7)
    w, b, rm0, rv0 = _params(g)
    layer = _make_layer(w, b, rm0, rv0, dtype=torch.bfloat16, momentum=0.1).train()
    x = _rand((4, C, 4, 4), g).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.running_mean.dtype == torch.float32
    ref = ref_step([x.double()], [torch.ones_like(x)], w, b, rm0, rv0, 0.1)
    torch.testing.assert_close(y.double(), ref["ys"][0], rtol=0.02, atol=0.05)
    torch.testing.assert_close(layer.running_mean.double(), ref["rm"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.running_var.double(), ref["rv"], rtol=1e-4, atol=1e-4)


def test_state_dict_round_trip_and_bn_checkpoints(caplog):
    from detectron2.layers import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(8)
    layer = _make_layer(*_params(g)).train()
    layer(_rand((3, C, 2, 2), g))
    other = AnySyncBatchNorm2d(C, eps=EPS).double()
    other.load_state_dict(layer.state_dict())
    for k, v in layer.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    # a plain nn.BatchNorm2d checkpoint: same keys, same eval output
    bn = nn.BatchNorm2d(C, eps=EPS).double()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C) + 0.5)
        bn.bias.copy_(torch.randn(C))
        bn.running_mean.copy_(torch.randn(C))
        bn.running_var.copy_(torch.rand(C) + 0.5)
    target = AnySyncBatchNorm2d(C, eps=EPS).double()
    target.load_state_dict(bn.state_dict())  # strict
    x = _rand((2, C, 3, 3), g)
    assert torch.equal(target.eval()(x), bn.eval()(x))
    # detectron2's FrozenBatchNorm2d: weight/bias/statistics map; num_batches_tracked has no source: the
    # current value is kept and reported with a warning (d2norm.layers.base convention), never silently
    frozen = FrozenBatchNorm2d(C, eps=EPS)
    with torch.no_grad():
        frozen.weight.copy_(torch.rand(C) + 0.5)
        frozen.bias.copy_(torch.randn(C))
        frozen.running_mean.copy_(torch.randn(C))
        frozen.running_var.copy_(torch.rand(C) + 0.5)
    target = AnySyncBatchNorm2d(C, eps=EPS)
    target.num_batches_tracked.fill_(7)
    with caplog.at_level(logging.WARNING):
        report = target.load_state_dict(frozen.state_dict())  # strict
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert "num_batches_tracked" in caplog.text and target.num_batches_tracked.item() == 7
    for k in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(target, k), getattr(frozen, k)), k
    # a checkpoint lacking the module entirely is still reported missing
    report = AnySyncBatchNorm2d(C).load_state_dict({}, strict=False)
    assert {"weight", "bias", "running_mean", "running_var"} <= set(report.missing_keys)
    xf = _rand((2, C, 3, 3), g).float()
    torch.testing.assert_close(target.eval()(xf), frozen(xf), rtol=1e-5, atol=1e-5)


def test_registry_builds_with_cfg_options():
    from detectron2.config import get_cfg

    from d2norm import add_d2norm_config

    cfg_a = add_d2norm_config(get_cfg())
    cfg_b = cfg_a.clone()
    cfg_b.D2NORM.SYNC_BN.GROUP_SIZE = 2
    cfg_b.D2NORM.BN.MOMENTUM = 0.03
    cfg_b.D2NORM.BN.EPS = 1e-3
    with norm_options(cfg_a):
        a = get_norm("AnySyncBN", 8)
    with norm_options(cfg_b):
        b = get_norm("AnySyncBN", 8)
    assert type(a) is AnySyncBatchNorm2d and type(b) is AnySyncBatchNorm2d
    assert isinstance(a, nn.BatchNorm2d) and isinstance(a, d2norm.layers.D2NormModule)
    assert (a.sync_group_size, a.momentum, a.eps, a.num_features) == (0, 0.1, 1e-5, 8)
    assert (b.sync_group_size, b.momentum, b.eps, b.num_features) == (2, 0.03, 1e-3, 8)
    cfg_bad = cfg_a.clone()
    cfg_bad.D2NORM.SYNC_BN.GROUP_SIZE = -1
    with norm_options(cfg_bad), pytest.raises(ValueError, match=r"-1.*>= 0|>= 0.*-1"):
        get_norm("AnySyncBN", 8)
    cfg_bad = cfg_a.clone()
    cfg_bad.D2NORM.BN.MOMENTUM = 1.5
    with norm_options(cfg_bad), pytest.raises(ValueError, match=r"\[0, 1\].*1\.5"):
        get_norm("AnySyncBN", 8)


def test_bad_input_rank():
    with pytest.raises(ValueError, match=r"NCHW.*\(2, 3\)"):
        AnySyncBatchNorm2d(3)(torch.randn(2, 3))
