"""RetinaNet with a per-level BN head: rethinking §5.2, Table 5 (six layouts), Alg. 1, A.9, A.10.

The float64 reference below is written from the paper: Alg. 1 ``RetinaNetHead_Row1`` (flatten every level,
concatenate on the spatial axis, one BN, split back) for shared SGD statistics, ``RetinaNetHead_Row3`` /
``Row6`` (BN applied per level; one shared set of population statistics, or one per level) otherwise, and
torch's EMA convention for the population statistics. It reuses nothing from the code under test.
"""
import logging

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

import d2norm  # noqa: F401
import d2norm.modeling.meta_arch.retinanet_domain  # noqa: F401  (registers "DomainBNRetinaNet")
from d2norm import add_d2norm_config
from d2norm.layers.domain_bn import DomainBatchNorm2d
from d2norm.layers import build_model
from d2norm.layers.sync_domain_bn import SyncDomainBatchNorm2d
from d2norm.modeling.meta_arch.retinanet_domain import (
    DomainBNRetinaNet,
    DomainBNRetinaNetHead,
    convert_retinanet_head_state_dict,
)
from dist_utils import run_distributed
from helpers import buffers

EPS = 1e-5
C, NCONV, NCLS = 4, 2, 2
LEVELS = ("p3", "p4", "p5")
K = len(LEVELS)
SIZES = ((5, 6), (3, 3), (2, 2))
# Table 5 rows as (SGD training statistics, population statistics, affine)
TABLE5 = {
    1: ("shared", "shared", "shared"),
    2: ("shared", "per_level", "shared"),
    3: ("per_level", "shared", "shared"),
    4: ("per_level", "per_level", "shared"),
    5: ("per_level", "shared", "per_level"),
    6: ("per_level", "per_level", "per_level"),
}
ROWS = sorted(TABLE5)


# ---- construction helpers -----------------------------------------------------------------------------------
def _shapes():
    return [ShapeSpec(channels=C, stride=8 * 2 ** k) for k in range(K)]


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random, non-trivial values for every parameter and statistic (positive γ and variances)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("num_batches_tracked"):
                continue
            leaf = name.rsplit(".", 1)[-1]
            r = torch.rand(t.shape, generator=g, dtype=torch.float64)
            n = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if leaf == "running_var" or (leaf == "weight" and t.dim() <= 2):
                t.copy_(r * 1.5 + 0.5)
            elif leaf == "weight":  # conv
                t.copy_(n * 0.4)
            else:  # biases, running_mean
                t.copy_(n * 0.7)
    return module


def make_head(row, sync=False, momentum=0.3, seed=0) -> DomainBNRetinaNetHead:
    t, p, a = TABLE5[row]
    head = DomainBNRetinaNetHead(
        input_shape=_shapes(), num_classes=NCLS, num_anchors=1, conv_dims=[C] * NCONV, levels=LEVELS,
        train_stats=t, pop_stats=p, affine=a, sync=sync, bn_eps=EPS, bn_momentum=momentum,
    )
    return _randomize(head.double(), seed)


def make_feats(n=2, seed=0, dtype=torch.float64):
    """One feature map per level: different sizes and clearly different statistics per level."""
    g = torch.Generator().manual_seed(100 + seed)
    return [
        (torch.randn(n, C, h, w, generator=g, dtype=torch.float64) * (1.0 + k) + (2.0 - 1.5 * k)).to(dtype)
        for k, (h, w) in enumerate(SIZES)
    ]


def make_dys(feats, seed=0):
    g = torch.Generator().manual_seed(200 + seed)
    dl = [torch.randn(f.shape[0], NCLS, *f.shape[2:], generator=g, dtype=torch.float64) for f in feats]
    db = [torch.randn(f.shape[0], 4, *f.shape[2:], generator=g, dtype=torch.float64) for f in feats]
    return dl, db


# ---- independent float64 reference (rethinking §5.2, Alg. 1) --------------------------------------------------
def _ema(S, key, k, mean, unbiased, momentum):
    """torch's EMA convention running <- (1 - m) running + m batch, on row k or on the single set;
    momentum None = cumulative average (m = 1 / number of updates of that row / set)."""
    rm, rv, nbt = S[key + ".running_mean"], S[key + ".running_var"], S[key + ".num_batches_tracked"]
    if k is None:
        nbt.add_(1)
        m = 1.0 / float(nbt) if momentum is None else momentum
        rm.mul_(1 - m).add_(m * mean)
        rv.mul_(1 - m).add_(m * unbiased)
    else:
        nbt[k] += 1
        m = 1.0 / float(nbt[k]) if momentum is None else momentum
        rm[k] = (1 - m) * rm[k] + m * mean
        rv[k] = (1 - m) * rv[k] + m * unbiased


def _moments(x):
    """μ, biased σ² and element count per channel of x (N, C, H, W) over N, H, W."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    mu = flat.mean(1)
    return mu, ((flat - mu[:, None]) ** 2).mean(1), flat.shape[1]


def ref_head(P, feats, S, *, training, layout, momentum):
    """The head with parameters P (float64, may be autograd leaves) and statistics S (updated in training)."""
    t, p, a = layout
    out = {}
    for subnet, final in (("cls_subnet", "cls_score"), ("bbox_subnet", "bbox_pred")):
        xs = list(feats)
        for j in range(NCONV):
            conv, bn = f"{subnet}.{3 * j}", f"{subnet}.{3 * j + 1}"
            xs = [F.conv2d(x, P[conv + ".weight"], P[conv + ".bias"], padding=1) for x in xs]
            if training and t == "shared":
                # Alg. 1 RetinaNetHead_Row1: flatten(2), concatenate on the spatial axis, one BN, split back.
                cat = torch.cat([x.flatten(2) for x in xs], dim=2).unsqueeze(3)
                mu, var, n = _moments(cat)
                stats = [(mu, var)] * K
                if p == "shared":
                    _ema(S, bn, None, mu.detach(), var.detach() * n / (n - 1), momentum)
                else:  # row 2: each level's EMA row from that level's own statistics
                    for k, x in enumerate(xs):
                        mk, vk, nk = _moments(x)
                        _ema(S, bn, k, mk.detach(), vk.detach() * nk / (nk - 1), momentum)
            elif training:
                # Alg. 1 Row3 / Row6: BN applied to each level separately
                stats = []
                for k, x in enumerate(xs):
                    mk, vk, nk = _moments(x)
                    stats.append((mk, vk))
                    _ema(S, bn, None if p == "shared" else k, mk.detach(), vk.detach() * nk / (nk - 1), momentum)
            else:
                rm, rv = S[bn + ".running_mean"], S[bn + ".running_var"]
                stats = [(rm, rv) if p == "shared" else (rm[k], rv[k]) for k in range(K)]
            ys = []
            for k, (x, (mu, var)) in enumerate(zip(xs, stats)):
                w = P[bn + ".weight"] if a == "shared" else P[bn + ".weight"][k]
                b = P[bn + ".bias"] if a == "shared" else P[bn + ".bias"][k]
                xhat = (x - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS)
                ys.append(torch.relu(xhat * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)))
            xs = ys
        out[final] = [F.conv2d(x, P[final + ".weight"], P[final + ".bias"], padding=1) for x in xs]
    return out["cls_score"], out["bbox_pred"]


def _ref_state(head):
    P = {k: v.detach().clone().double().requires_grad_() for k, v in head.named_parameters()}
    S = {k: v.detach().clone() for k, v in head.named_buffers()}
    return P, S


def _loss(logits, bbox, dys):
    dl, db = dys
    return sum((y * d).sum() for y, d in zip(logits, dl)) + sum((y * d).sum() for y, d in zip(bbox, db))


TOL = dict(rtol=1e-9, atol=1e-10)


# ---- the six layouts against the reference -----------------------------------------------------------------
@pytest.mark.parametrize("row", ROWS)
def test_head_matches_reference_train_eval(row):
    layout, momentum = TABLE5[row], 0.3
    head = make_head(row, momentum=momentum)
    P, S = _ref_state(head)
    for step in range(2):  # two steps: the EMA accumulates as the layout says
        feats = make_feats(seed=step)
        dys = make_dys(feats, seed=step)
        x_ours = [f.clone().requires_grad_() for f in feats]
        x_ref = [f.clone().requires_grad_() for f in feats]
        head.train()
        head.zero_grad()
        logits, bbox = head(x_ours)
        _loss(logits, bbox, dys).backward()
        for p in P.values():
            p.grad = None
        rl, rb = ref_head(P, x_ref, S, training=True, layout=layout, momentum=momentum)
        _loss(rl, rb, dys).backward()
        for a, b in zip(logits + bbox, rl + rb):
            torch.testing.assert_close(a, b, **TOL)
        for a, b in zip(x_ours, x_ref):
            torch.testing.assert_close(a.grad, b.grad, **TOL)
        for name, prm in head.named_parameters():
            torch.testing.assert_close(prm.grad, P[name].grad, **TOL, msg=lambda m: f"grad {name}: {m}")
        for name, buf in head.named_buffers():
            torch.testing.assert_close(buf, S[name], **TOL, msg=lambda m: f"row {row} {name}: {m}")

    # eval: population statistics of the layout, and no buffer written
    head.eval()
    before = buffers(head)
    feats = make_feats(seed=7)
    with torch.no_grad():
        logits, bbox = head(feats)
        rl, rb = ref_head(P, feats, S, training=False, layout=layout, momentum=momentum)
    for a, b in zip(logits + bbox, rl + rb):
        torch.testing.assert_close(a, b, **TOL)
    after = buffers(head)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("row", ROWS)
def test_cumulative_average_follows_layout(row):
    """The documented PreciseBN-without-hook recipe: reset, momentum None, forward in train mode -> per-layout
    average of per-batch statistics (per row, per pooled batch, or per level call)."""
    head = make_head(row, momentum=None).train()
    with torch.no_grad():
        for name, b in head.named_buffers():
            b.copy_(torch.ones_like(b) if name.endswith("running_var") else torch.zeros_like(b))
    P, S = _ref_state(head)
    with torch.no_grad():
        for step in range(3):
            feats = make_feats(seed=10 + step)
            head(feats)
            ref_head(P, feats, S, training=True, layout=TABLE5[row], momentum=None)
    for name, buf in head.named_buffers():
        torch.testing.assert_close(buf, S[name], **TOL)
    nbt = head.cls_subnet[1].num_batches_tracked
    t, p, _ = TABLE5[row]
    assert nbt.tolist() == ([3] * K if p == "per_level" else 3 * (1 if t == "shared" else K))


@pytest.mark.parametrize("row", [1, 3, 6])
def test_zero_size_batch(row):
    head = make_head(row).train()
    before = buffers(head)
    feats = [f[:0].clone().requires_grad_() for f in make_feats()]
    logits, bbox = head(feats)
    assert [t.shape for t in logits] == [(0, NCLS, h, w) for h, w in SIZES]
    assert [t.shape for t in bbox] == [(0, 4, h, w) for h, w in SIZES]
    _loss(logits, bbox, make_dys(feats)).backward()
    assert all(f.grad.shape == f.shape for f in feats)
    after = buffers(head)
    assert all(torch.equal(before[k], after[k]) for k in before)  # statistics undefined: no EMA update (A.10)


@pytest.mark.parametrize("row", [1, 6])
def test_autocast_bf16(row):
    """bf16 activations (autocast): float32 statistics and buffers, bf16 output close to the float32 head."""
    head = make_head(row).float().train()
    ref = make_head(row).float().train()
    feats = [f.float() for f in make_feats()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, bbox = head(feats)
    with torch.no_grad():
        rl, rb = ref(feats)
    assert all(t.dtype == torch.bfloat16 for t in logits + bbox)
    for a, b in zip(logits + bbox, rl + rb):
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.15)
    for (name, buf), (_, rbuf) in zip(head.named_buffers(), ref.named_buffers()):
        assert buf.dtype == rbuf.dtype
        if buf.is_floating_point():
            assert buf.dtype == torch.float32
            torch.testing.assert_close(buf, rbuf, rtol=0.03, atol=0.03)


def test_layouts_really_differ():
    """Guards the reference test: the six rows give six different trained states / outputs."""
    outs = {}
    feats = make_feats()
    for row in ROWS:
        head = make_head(row).train()
        with torch.no_grad():
            head(feats)
            head.eval()
            outs[row] = torch.cat([t.flatten() for t in head(feats)[0]])
    for r1 in ROWS:
        for r2 in ROWS:
            if r1 < r2:
                assert not torch.allclose(outs[r1], outs[r2]), (r1, r2)


@pytest.mark.parametrize("row", ROWS)
def test_parameter_and_buffer_layout(row):
    t, p, a = TABLE5[row]
    head = make_head(row)
    norms = head.domain_norm_layers()
    assert [n for n, _ in norms] == [f"{s}.{3 * j + 1}" for s in ("cls_subnet", "bbox_subnet") for j in range(NCONV)]
    for name, m in norms:
        assert isinstance(m, DomainBatchNorm2d) and m.num_domains == K
        assert m.weight.shape == m.bias.shape == ((K, C) if a == "per_level" else (C,))
        assert m.running_mean.shape == m.running_var.shape == ((K, C) if p == "per_level" else (C,))
        assert m.num_batches_tracked.shape == ((K,) if p == "per_level" else ())
        assert m.train_stats == ("shared" if t == "shared" else "per_domain")
    conv = C * C * 9 + C
    n_norm_params = 2 * C * (K if a == "per_level" else 1)
    expected = 2 * NCONV * (conv + n_norm_params) + (C * NCLS * 9 + NCLS) + (C * 4 * 9 + 4)
    assert sum(q.numel() for q in head.parameters()) == expected
    n_stats = 2 * C * (K if p == "per_level" else 1) + (K if p == "per_level" else 1)
    assert sum(b.numel() for b in head.buffers()) == 2 * NCONV * n_stats
    assert head.levels == LEVELS
    assert head.norm_layout == dict(levels=LEVELS, train_stats=t, pop_stats=p, affine=a, sync=False, sync_group_size=0)


def test_shared_layout_state_dict_is_stock_single_bn_head():
    """Row 1 (all shared) has exactly the names and shapes of detectron2's head with one BatchNorm2d per slot."""
    stock = RetinaNetHead(input_shape=_shapes(), num_classes=NCLS, num_anchors=1, conv_dims=[C] * NCONV,
                          norm=lambda c: nn.BatchNorm2d(c))
    ours = make_head(1)
    assert {k: v.shape for k, v in stock.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(stock.state_dict())  # strict
    for k, v in stock.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v.to(ours.state_dict()[k].dtype))


# ---- stock detectron2 checkpoints ----------------------------------------------------------------------------
def _stock_bn_head(seed=5):
    """detectron2 v0.6 RetinaNetHead with NORM "BN" (CycleBatchNormList: per-level stats, shared affine)."""
    head = RetinaNetHead(input_shape=_shapes(), num_classes=NCLS, num_anchors=1, conv_dims=[C] * NCONV, norm="BN")
    head = _randomize(head.double(), seed)
    with torch.no_grad():
        for name, b in head.named_buffers():
            if name.endswith("num_batches_tracked"):
                b.fill_(int(name.split(".")[-2]) + 3)  # level k -> k + 3, so the mapping is visible
    return head


def test_row4_is_detectron2_bn_head():
    """detectron2's NORM "BN" head is Table 5 row 4: a strict load, then identical train and eval behaviour."""
    stock = _stock_bn_head()
    ours = make_head(4, momentum=0.1)  # CycleBatchNormList uses BatchNorm2d's default momentum
    ours.load_state_dict(stock.state_dict())  # strict: every entry mapped
    feats = make_feats()
    for m in (stock, ours):
        m.train()
    with torch.no_grad():
        ys, yo = stock(feats), ours(feats)
    for a, b in zip(ys[0] + ys[1], yo[0] + yo[1]):
        torch.testing.assert_close(a, b, **TOL)
    sd = stock.state_dict()
    for name, m in ours.domain_norm_layers():
        for stat in ("running_mean", "running_var", "num_batches_tracked"):
            want = torch.stack([sd[f"{name}.{k}.{stat}"] for k in range(K)])
            torch.testing.assert_close(getattr(m, stat), want, **TOL)
    for m in (stock, ours):
        m.eval()
    with torch.no_grad():
        ys, yo = stock(feats), ours(feats)
    for a, b in zip(ys[0] + ys[1], yo[0] + yo[1]):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("row", ROWS)
def test_load_stock_bn_head(row, caplog):
    t, p, a = TABLE5[row]
    stock = _stock_bn_head()
    sd = stock.state_dict()
    ours = make_head(row, seed=9)
    init = buffers(ours)
    with caplog.at_level(logging.WARNING):
        res = ours.load_state_dict(sd, strict=False)
    assert not res.unexpected_keys
    for j in range(NCONV):
        for s in ("cls_subnet", "bbox_subnet"):
            conv, bn = f"{s}.{3 * j}", f"{s}.{3 * j + 1}"
            assert torch.equal(ours.state_dict()[conv + ".weight"], sd[conv + ".weight"])
            w = ours.state_dict()[bn + ".weight"]
            assert torch.equal(w, sd[bn + ".weight"] if a == "shared" else sd[bn + ".weight"].expand(K, C))
            for stat in ("running_mean", "running_var", "num_batches_tracked"):
                got = ours.state_dict()[f"{bn}.{stat}"]
                if p == "per_level":
                    assert torch.equal(got, torch.stack([sd[f"{bn}.{k}.{stat}"] for k in range(K)]))
                else:  # cannot be mapped: kept, reported by torch and by a warning
                    assert torch.equal(got, init[f"{bn}.{stat}"])
                    assert stat == "num_batches_tracked" or f"{bn}.{stat}" in res.missing_keys
    if p == "per_level":
        assert not res.missing_keys
    else:
        assert "POP_STATS is shared" in caplog.text and "PreciseBN" in caplog.text
        assert "num_batches_tracked, running_mean, running_var" in caplog.text
    if a == "per_level":
        assert "copied it into all 3 domains" in caplog.text


def test_load_stock_no_norm_head(caplog):
    stock = RetinaNetHead(input_shape=_shapes(), num_classes=NCLS, num_anchors=1, conv_dims=[C] * NCONV, norm="")
    stock = _randomize(stock.double(), 3)
    sd = stock.state_dict()
    ours = make_head(6, seed=9)
    norm_before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in ours.domain_norm_layers()}
    with caplog.at_level(logging.WARNING):
        res = ours.load_state_dict(sd, strict=False)
    assert not res.unexpected_keys
    for s in ("cls_subnet", "bbox_subnet"):
        for j in range(NCONV):
            for leaf in ("weight", "bias"):
                assert torch.equal(ours.state_dict()[f"{s}.{3 * j}.{leaf}"], sd[f"{s}.{2 * j}.{leaf}"])
    for leaf in ("cls_score.weight", "bbox_pred.bias"):
        assert torch.equal(ours.state_dict()[leaf], sd[leaf])
    # (torch's BN loader silently keeps num_batches_tracked when absent; our warning covers it)
    expected_missing = {f"{n}.{k}" for n, _ in ours.domain_norm_layers() for k in norm_before[n]
                        if k != "num_batches_tracked"}
    assert set(res.missing_keys) == expected_missing
    for n, m in ours.domain_norm_layers():  # left as they were
        assert all(torch.equal(v, norm_before[n][k]) for k, v in m.state_dict().items())
    assert "no norm layers" in caplog.text


def test_convert_for_shape_checking_checkpointer():
    """fvcore's Checkpointer drops shape-mismatched keys before load_state_dict; the converter pre-maps them."""
    from fvcore.common.checkpoint import Checkpointer

    stock = _stock_bn_head()
    ours = make_head(6, seed=9)
    model = nn.Module()
    model.head = ours
    full = {"head." + k: v for k, v in stock.state_dict().items()}
    full["other.weight"] = torch.ones(1)
    converted, notes = convert_retinanet_head_state_dict(full, ours)
    assert notes == [] and torch.equal(converted["other.weight"], torch.ones(1))
    incompatible = Checkpointer(model)._load_model({"model": dict(converted)})
    assert not incompatible.missing_keys and not incompatible.incorrect_shapes
    assert torch.equal(ours.cls_subnet[1].weight, stock.cls_subnet[1].weight.expand(K, C))
    assert torch.equal(ours.cls_subnet[4].running_var[2], stock.cls_subnet[4][2].running_var)


# ---- cfg, meta-architecture ---------------------------------------------------------------------------------
def tiny_cfg(row=4, **overrides):
    cfg = add_d2norm_config(get_cfg())
    cfg.MODEL.META_ARCHITECTURE = "DomainBNRetinaNet"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 8
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[s] for s in (8, 16, 32, 64, 128)]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[1.0]]
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.MODEL.RETINANET.NUM_CONVS = 2
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    t, p, a = TABLE5[row]
    cfg.D2NORM.RETINANET_HEAD.TRAIN_STATS = t
    cfg.D2NORM.RETINANET_HEAD.POP_STATS = p
    cfg.D2NORM.RETINANET_HEAD.AFFINE = a
    for k, v in overrides.items():
        node = cfg
        *path, leaf = k.split(".")
        for q in path:
            node = node[q]
        node[leaf] = v
    return cfg


def _inputs(n=2, size=64):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 12.0, 60.0, 58.0]]))
        inst.gt_classes = torch.tensor([i % 3, 2])
        out.append({"image": torch.rand(3, size, size, generator=g) * 255, "instances": inst,
                    "height": size, "width": size})
    return out


@pytest.mark.parametrize("row", ROWS)
def test_meta_arch_trains_and_evaluates(row):
    torch.manual_seed(0)
    t, p, a = TABLE5[row]
    model = build_model(tiny_cfg(row))
    assert isinstance(model, DomainBNRetinaNet) and isinstance(model.head, DomainBNRetinaNetHead)
    assert model.head.levels == ("p3", "p4", "p5", "p6", "p7")
    assert all(isinstance(m, SyncDomainBatchNorm2d) for _, m in model.head.domain_norm_layers())  # SYNC default
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    params0 = {k: v.detach().clone() for k, v in model.head.named_parameters()}
    model.train()
    iters = 3
    with EventStorage(0):
        for _ in range(iters):
            losses = model(_inputs())
            assert set(losses) == {"loss_cls", "loss_box_reg"}
            total = sum(losses.values())
            assert torch.isfinite(total)
            opt.zero_grad()
            total.backward()
            opt.step()
    for name, v in model.head.named_parameters():
        assert torch.isfinite(v).all()
        if name.startswith("cls_subnet") or name.startswith("cls_score"):
            assert not torch.equal(v, params0[name]), name
    for name, m in model.head.domain_norm_layers():
        assert torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()
        if p == "per_level":
            assert m.num_batches_tracked.tolist() == [iters] * 5, name
        else:  # once per forward (pooled) or once per level call
            assert m.num_batches_tracked.item() == iters * (1 if t == "shared" else 5), name
    model.eval()
    before = buffers(model)
    with torch.no_grad():
        out = model(_inputs(1))
    inst = out[0]["instances"]
    assert len(inst) > 0 and torch.isfinite(inst.scores).all() and torch.isfinite(inst.pred_boxes.tensor).all()
    assert all(torch.equal(v, buffers(model)[k]) for k, v in before.items())


def test_two_cfgs_two_layouts():
    m1 = build_model(tiny_cfg(1, **{"D2NORM.RETINANET_HEAD.SYNC": False}))
    m6 = build_model(tiny_cfg(6))
    l1, l6 = m1.head.cls_subnet[1], m6.head.cls_subnet[1]
    assert type(l1) is DomainBatchNorm2d and type(l6) is SyncDomainBatchNorm2d
    assert (l1.train_stats, l1.pop_stats, l1.affine_per_domain) == ("shared", "shared", False)
    assert (l6.train_stats, l6.pop_stats, l6.affine_per_domain) == ("per_domain", "per_domain", True)
    m2 = build_model(tiny_cfg(2, **{"D2NORM.BN.MOMENTUM": 0.03, "D2NORM.BN.EPS": 1e-3}))
    assert m2.head.bbox_subnet[4].momentum == 0.03 and m2.head.bbox_subnet[4].eps == 1e-3


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("D2NORM.RETINANET_HEAD.TRAIN_STATS", "per_domain", "TRAIN_STATS.*'per_domain'"),
        ("D2NORM.RETINANET_HEAD.POP_STATS", "level", "POP_STATS.*'level'"),
        ("D2NORM.RETINANET_HEAD.AFFINE", "none", "AFFINE.*'none'"),
        ("D2NORM.RETINANET_HEAD.SYNC", "yes", "SYNC.*'yes'"),
        ("D2NORM.RETINANET_HEAD.SYNC_GROUP_SIZE", -1, "SYNC_GROUP_SIZE.*-1"),
        ("MODEL.RETINANET.NORM", "BN", "MODEL.RETINANET.NORM.*'BN'"),
    ],
)
def test_bad_options(key, value, match):
    with pytest.raises(ValueError, match=match):
        build_model(tiny_cfg(4, **{key: value}))


# ---- synchronized statistics on 2 real gloo processes --------------------------------------------------------
# case -> (row, per-rank batch sizes, SYNC, momentum)
DIST_CASES = {f"row{r}": (r, (2, 2), True, 0.3) for r in ROWS}
DIST_CASES.update({
    "row1_uneven": (1, (1, 3), True, 0.3),
    "row6_uneven": (6, (3, 1), True, 0.3),
    "row3_empty_rank": (3, (0, 2), True, 0.3),
    "row1_empty_rank": (1, (2, 0), True, 0.3),
    "row2_cumulative": (2, (1, 2), True, None),
    "row5_cumulative": (5, (2, 1), True, None),
    "row4_per_gpu": (4, (2, 2), False, 0.3),
})


def _dist_worker(rank, world_size, data):
    out = {}
    for name, (row, sizes, sync, momentum) in DIST_CASES.items():
        feats, dys = data[name]
        head = make_head(row, sync=sync, momentum=momentum).train()
        x = [f[rank].clone().requires_grad_() for f in feats]
        dy = ([d[rank] for d in dys[0]], [d[rank] for d in dys[1]])
        logits, bbox = head(x)
        _loss(logits, bbox, dy).backward()
        res = {
            "y": [t.detach() for t in logits + bbox],
            "gx": [t.grad for t in x],
            "gparams": {k: v.grad.clone() for k, v in head.named_parameters()},
            "buffers": buffers(head),
        }
        head.eval()
        with torch.no_grad():
            res["eval"] = [t for t in head([f[rank] for f in feats])[0]]
        out[name] = res
    # bf16 input to the synchronized layer alone: float32 statistics, bf16 output
    layer = SyncDomainBatchNorm2d(C, K, train_stats="shared", pop_stats="shared", sync_group_size=0).train()
    xs = [f[rank].to(torch.bfloat16) for f in data["bf16"]]
    out["bf16"] = {"y": layer.forward_domains(xs), "buffers": buffers(layer)}
    return out


def _split(t, sizes):
    return list(torch.split(t, list(sizes)))


@pytest.mark.slow
def test_sync_statistics_equal_concatenated_batch():
    data = {}
    for i, (name, (row, sizes, sync, _)) in enumerate(DIST_CASES.items()):
        feats = make_feats(n=sum(sizes), seed=i)
        dys = make_dys(feats, seed=i)
        data[name] = (
            [_split(f, sizes) for f in feats],
            ([_split(d, sizes) for d in dys[0]], [_split(d, sizes) for d in dys[1]]),
        )
    data["bf16"] = [_split(f, (2, 2)) for f in make_feats(n=4, seed=50)]
    res = run_distributed(_dist_worker, world_size=2, args=(data,))

    for name, (row, sizes, sync, momentum) in DIST_CASES.items():
        feats = [torch.cat(parts) for parts in data[name][0]]
        dys = tuple([torch.cat(parts) for parts in group] for group in data[name][1])
        if sync:  # single process on the concatenated batch
            refs = [(make_head(row, momentum=momentum).train(), feats, dys, list(range(2)))]
        else:  # per-GPU BN: each rank alone on its own batch
            refs = [
                (make_head(row, momentum=momentum).train(), [f[r * 2:(r + 1) * 2] for f in feats],
                 tuple([d[r * 2:(r + 1) * 2] for d in g] for g in dys), [r])
                for r in range(2)
            ]
        for ref, rf, rdy, ranks in refs:
            x = [f.clone().requires_grad_() for f in rf]
            logits, bbox = ref(x)
            _loss(logits, bbox, rdy).backward()
            ys = [t.detach() for t in logits + bbox]
            for r in ranks:
                got = res[r][name]
                lo = sum(sizes[:r]) if sync else 0
                hi = lo + sizes[r]
                for a, b in zip(got["y"], ys):
                    torch.testing.assert_close(a, b[lo:hi], **TOL, msg=lambda m: f"{name} rank {r} y: {m}")
                for a, b in zip(got["gx"], x):
                    torch.testing.assert_close(a, b.grad[lo:hi], **TOL, msg=lambda m: f"{name} rank {r} dx: {m}")
                for k, v in ref.named_buffers():
                    torch.testing.assert_close(got["buffers"][k], v, **TOL, msg=lambda m: f"{name} {k}: {m}")
                    assert not torch.isnan(got["buffers"][k].double()).any()
            if sync:
                # parameter gradients: each rank holds its share, DDP sums them
                for k, v in ref.named_parameters():
                    total = res[0][name]["gparams"][k] + res[1][name]["gparams"][k]
                    torch.testing.assert_close(total, v.grad, **TOL, msg=lambda m: f"{name} d{k}: {m}")
                # eval: no communication, each rank's own population statistics (identical on both ranks)
                ref.eval()
                with torch.no_grad():
                    for r in range(2):
                        ev = ref([p[r] for p in data[name][0]])[0]
                        for a, b in zip(res[r][name]["eval"], ev):
                            torch.testing.assert_close(a, b, **TOL)
        if not sync:  # the ranks did not share statistics
            assert not torch.allclose(res[0][name]["buffers"]["cls_subnet.1.running_mean"],
                                      res[1][name]["buffers"]["cls_subnet.1.running_mean"])

    ref = DomainBatchNorm2d(C, K, train_stats="shared", pop_stats="shared").double().train()
    full = [torch.cat(p).to(torch.bfloat16).double() for p in data["bf16"]]
    ys = ref.forward_domains(full)
    for r in range(2):
        got = res[r]["bf16"]
        assert all(y.dtype == torch.bfloat16 for y in got["y"])
        assert got["buffers"]["running_mean"].dtype == torch.float32
        for a, b in zip(got["y"], ys):
            torch.testing.assert_close(a.double(), b[2 * r:2 * r + 2], rtol=0.02, atol=0.03)
        torch.testing.assert_close(got["buffers"]["running_var"].double(), ref.running_var, rtol=1e-4, atol=1e-4)


# ---- PreciseBN (d2norm.stats) follows the head's layout ---------------------------------------------------
@pytest.mark.parametrize("row", [1, 3, 6])
def test_precise_bn_follows_layout(row):
    """recompute_population_stats writes, for the head's first cls norm: per level rows (row 6) = statistics of
    that level's input only; one set (rows 1, 3) = statistics of all levels' inputs pooled (eq 2: every call is
    one batch, the population is all of them)."""
    from d2norm.stats import recompute_population_stats

    torch.manual_seed(0)
    model = build_model(tiny_cfg(row)).train()
    layer = model.head.cls_subnet[1]
    seen = []
    handle = model.head.cls_subnet[0].register_forward_hook(lambda m, i, o: seen.append(o.detach().double()))
    batches = [_inputs(2), _inputs(2)[::-1]]
    with EventStorage(0):
        recompute_population_stats(model, batches, num_samples=4, progress=False)
    handle.remove()
    assert len(seen) == 2 * 5  # one call per level per forward, in level order

    def pooled(xs):
        flat = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs], dim=1)
        return flat.mean(1), flat.var(1, unbiased=True)

    tol = dict(rtol=1e-4, atol=1e-5)
    if row == 6:
        for k in range(5):
            mean, var = pooled(seen[k::5])
            torch.testing.assert_close(layer.running_mean[k].double(), mean, **tol)
            torch.testing.assert_close(layer.running_var[k].double(), var, **tol)
    else:
        mean, var = pooled(seen)
        torch.testing.assert_close(layer.running_mean.double(), mean, **tol)
        torch.testing.assert_close(layer.running_var.double(), var, **tol)
