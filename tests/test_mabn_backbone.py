"""MABN ResNet backbones and heads: weight-centralized convs before every MABN (mabn §4.2 eq 18) and per-part
warm-up with batch statistics (mabn Appendix B.3)."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.engine import SimpleTrainer
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.roi_heads import build_box_head
from torch import nn

import d2norm.modeling.backbone.mabn_resnet  # noqa: F401  (registers backbones and heads)
from d2norm import add_d2norm_config
from d2norm.layers.mabn import CenteredConv2d, MABN2d
from d2norm.layers import build_model, norm_options
from d2norm.modeling.roi_heads.mabn_heads import MABNConvFCHead, MABNMaskRCNNConvUpsampleHead

from helpers import tiny_instance_batch

FEATURES = ["res2", "res3", "res4", "res5"]


def make_cfg(depth=18, name="build_mabn_resnet_fpn_backbone", fpn_norm="MABN"):
    cfg = add_d2norm_config(get_cfg())
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    r = cfg.MODEL.RESNETS
    r.DEPTH, r.NORM, r.OUT_FEATURES = depth, "MABN", list(FEATURES)
    if depth >= 50:
        r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, r.WIDTH_PER_GROUP = 8, 32, 8
    else:
        r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS = 16, 64
    cfg.MODEL.FPN.IN_FEATURES = list(FEATURES)
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.MODEL.FPN.NORM = fpn_norm
    return cfg


def build(cfg):
    with norm_options(cfg):
        return build_backbone(cfg, ShapeSpec(channels=3))


def _images(n=2, size=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=g) * 3 + 2).to(dtype)


@pytest.mark.parametrize("depth,fpn_norm,expected", [
    (50, "MABN", 1 + 16 * 3 + 4 + 8),  # stem, 3 per bottleneck, 4 projection shortcuts, 4 lateral + 4 output
    (50, "", 1 + 16 * 3 + 4),
    (18, "MABN", 1 + 8 * 2 + 4 + 8),   # R18: 2 per BasicBlock; 16-ch stem -> res2.0 has a shortcut too
])
def test_every_norm_is_mabn_after_a_centered_conv(depth, fpn_norm, expected):
    model = build(make_cfg(depth=depth, fpn_norm=fpn_norm))
    normed = [(n, m) for n, m in model.named_modules() if isinstance(m, Conv2d) and m.norm is not None]
    assert len(normed) == expected
    for name, conv in normed:
        assert type(conv) is CenteredConv2d and type(conv.norm) is MABN2d, name
    assert sum(isinstance(m, MABN2d) for m in model.modules()) == expected
    # no other normalization anywhere
    others = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    assert not [n for n, m in model.named_modules() if isinstance(m, others)]
    # convs without a norm (FPN without norm) stay plain
    plain = [m for m in model.modules() if isinstance(m, Conv2d) and m.norm is None]
    assert all(type(m) is Conv2d for m in plain)
    assert len(plain) == (0 if fpn_norm else 8)


def test_state_dict_names_equal_stock_resnet():
    cfg = make_cfg(depth=50, name="build_mabn_resnet_backbone")
    stock = cfg.clone()
    stock.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    a, b = build(cfg).state_dict(), build(stock).state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)


@pytest.mark.parametrize("depth", [18, 50])
def test_convs_are_centralized_in_the_forward_pass(depth):
    """Every conv output fed to an MABN equals a float64 conv with W - mean(W) (eq 18), not with W."""
    model = build(make_cfg(depth=depth)).double()
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CenteredConv2d):
                m.weight.add_(torch.randn_like(m.weight) * 0.05 + 0.1)  # clearly non-zero per-channel mean
    seen = {}

    def conv_in(mod, args):
        seen.setdefault(id(mod), {})["x"] = args[0].detach()

    def norm_in(mod, args):
        seen.setdefault(id(mod), {})["y"] = args[0].detach()

    convs = [m for m in model.modules() if isinstance(m, CenteredConv2d)]
    hooks = [c.register_forward_pre_hook(conv_in) for c in convs]
    hooks += [c.norm.register_forward_pre_hook(norm_in) for c in convs]
    out = model(_images(dtype=torch.float64))
    for h in hooks:
        h.remove()
    for c in convs:
        x, y = seen[id(c)]["x"], seen[id(c.norm)]["y"]
        w = c.weight.detach()
        w_centered = w - w.mean(dim=(1, 2, 3), keepdim=True)
        kw = dict(stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups)
        torch.testing.assert_close(y, F.conv2d(x, w_centered, c.bias, **kw), rtol=1e-10, atol=1e-10)
        assert (y - F.conv2d(x, w, c.bias, **kw)).abs().max() > 1e-3
    # the weight gradient is projected: zero mean per output channel
    sum(v.sum() for v in out.values()).backward()
    for c in convs:
        torch.testing.assert_close(c.weight.grad.mean(dim=(1, 2, 3)), torch.zeros(c.out_channels,
                                   dtype=torch.float64), rtol=0, atol=1e-10)


def test_bad_configs_raise():
    cfg = make_cfg()
    cfg.MODEL.RESNETS.NORM = "BN"
    with pytest.raises(ValueError, match="MODEL.RESNETS.NORM must be 'MABN'.*got 'BN'"):
        build(cfg)
    cfg = make_cfg(fpn_norm="GN")
    with pytest.raises(ValueError, match="MODEL.FPN.NORM must be '' or 'MABN'.*got 'GN'"):
        build(cfg)
    cfg = make_cfg()
    cfg.D2NORM.MABN_MODEL.BACKBONE_WARMUP_ITERS = -2
    with pytest.raises(ValueError, match="BACKBONE_WARMUP_ITERS must be an integer >= 0, or -1.*got -2"):
        build(cfg)
    cfg = make_cfg()
    cfg.MODEL.ROI_BOX_HEAD.NAME = "MABNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_CONV = 1
    with pytest.raises(ValueError, match="MODEL.ROI_BOX_HEAD.NORM must be 'MABN'.*got ''"):
        with norm_options(cfg):
            build_box_head(cfg, ShapeSpec(channels=8, height=7, width=7))


def tiny_mask_rcnn_cfg(backbone_warmup=1, head_warmup=2):
    cfg = make_cfg(fpn_norm="")
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[8], [16], [32], [64], [128]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    b = cfg.MODEL.ROI_BOX_HEAD
    b.NAME, b.NORM, b.NUM_CONV, b.CONV_DIM, b.NUM_FC, b.FC_DIM = "MABNConvFCHead", "MABN", 2, 8, 1, 16
    mk = cfg.MODEL.ROI_MASK_HEAD
    mk.NAME, mk.NORM, mk.NUM_CONV, mk.CONV_DIM = "MABNMaskRCNNConvUpsampleHead", "MABN", 2, 8
    cfg.D2NORM.MABN.BUFFER_SIZE = 4
    cfg.D2NORM.MABN.WARMUP_ITERS = 5
    cfg.D2NORM.MABN_MODEL.BACKBONE_WARMUP_ITERS = backbone_warmup
    cfg.D2NORM.MABN_MODEL.HEAD_WARMUP_ITERS = head_warmup
    return cfg


class _Recorder:
    """Records (input, gamma, beta, output) of every forward of an MABN layer."""

    def __init__(self, layer):
        self.calls = []
        layer.register_forward_hook(self)

    def __call__(self, mod, args, out):
        self.calls.append(tuple(t.detach().double().clone() for t in (args[0], mod.weight, mod.bias, out)))


def _expected(calls, m, alpha, clip, eps):
    """Float64 reference (mabn eqs 15, 19): per step the batch-statistics output and the moving-average one."""
    chi_sq_hist, chi_hat = [], None
    batch_out, moving_out = [], []
    for x, w, b, _ in calls:
        c = x.shape[1]
        chi_sq = x.transpose(0, 1).reshape(c, -1).pow(2).mean(1) + eps
        chi_sq_hist.append(chi_sq)
        prev = torch.ones(c, dtype=torch.float64) if chi_hat is None else chi_hat
        chi_hat = alpha * prev + (1 - alpha) * chi_sq.sqrt()
        chi_bar = torch.stack(chi_sq_hist[-m:]).mean(0).sqrt()
        r = (chi_bar / chi_hat).clamp(1 / clip, clip)
        view = (1, -1, 1, 1)
        batch_out.append(x / chi_sq.sqrt().view(view) * w.view(view) + b.view(view))
        moving_out.append(x * (r / chi_bar).view(view) * w.view(view) + b.view(view))
    return batch_out, moving_out


def test_warmup_switch_happens_at_the_configured_iteration():
    """Backbone warm-up 1, heads warm-up 2 (Appendix B.3 uses 10 000 for the heads): 4 real training steps."""
    torch.manual_seed(0)
    cfg = tiny_mask_rcnn_cfg(backbone_warmup=1, head_warmup=2)
    model = build_model(cfg)
    model.train()
    layers = {
        "backbone": model.backbone.bottom_up.stem.conv1.norm,
        "res4": model.backbone.bottom_up.res4[1].conv2.norm,
        "box_head": model.roi_heads.box_head.conv1.norm,
        "mask_head": model.roi_heads.mask_head.mask_fcn2.norm,
    }
    warmup = {"backbone": 1, "res4": 1, "box_head": 2, "mask_head": 2}
    recorders = {k: _Recorder(v) for k, v in layers.items()}
    steps = 4
    data = (tiny_instance_batch(it) for it in range(steps))
    trainer = SimpleTrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.01))
    trainer.train(0, steps)  # detectron2's own training loop
    losses = trainer.storage.latest()
    assert "loss_mask" in losses and all(torch.isfinite(torch.tensor(v[0])) for k, v in losses.items() if "loss" in k)
    for name, layer in layers.items():
        assert layer.warmup_iters == warmup[name]
        assert int(layer.num_batches_tracked) == steps  # one forward per training iteration
        calls = recorders[name].calls
        assert len(calls) == steps
        batch_out, moving_out = _expected(calls, m=4, alpha=layer.momentum, clip=layer.clip, eps=layer.eps)
        for t, (_, _, _, out) in enumerate(calls):
            if t < warmup[name]:
                torch.testing.assert_close(out, batch_out[t], rtol=1e-4, atol=1e-4, msg=f"{name} step {t}")
            else:
                torch.testing.assert_close(out, moving_out[t], rtol=1e-4, atol=1e-4, msg=f"{name} step {t}")
                assert (out - batch_out[t]).abs().max() > 1e-2, f"{name} step {t} still uses batch statistics"


def test_warmup_defaults_and_part_assignment():
    cfg = tiny_mask_rcnn_cfg(backbone_warmup=-1, head_warmup=7)
    model = build_model(cfg)
    backbone = {m.warmup_iters for m in model.backbone.modules() if isinstance(m, MABN2d)}
    heads = {m.warmup_iters for m in model.roi_heads.modules() if isinstance(m, MABN2d)}
    assert backbone == {5} and heads == {7}  # -1 = D2NORM.MABN.WARMUP_ITERS
    assert isinstance(model.roi_heads.box_head, MABNConvFCHead)
    assert isinstance(model.roi_heads.mask_head, MABNMaskRCNNConvUpsampleHead)
    for head in (model.roi_heads.box_head, model.roi_heads.mask_head):
        # the heads' forward iterates over the same (now centered) conv objects
        convs = [m for m in head.modules() if isinstance(m, Conv2d) and m.norm is not None]
        assert len(convs) == 2 and all(type(c) is CenteredConv2d and isinstance(c.norm, MABN2d) for c in convs)
        assert all(type(c) is CenteredConv2d for c in head.conv_norm_relus)


@pytest.mark.parametrize("name", ["build_mabn_resnet_backbone", "build_mabn_retinanet_resnet_fpn_backbone"])
def test_tiny_forward_backward_train_and_eval(name):
    cfg = make_cfg(depth=50, name=name)
    if "retinanet" in name:
        cfg.MODEL.RESNETS.OUT_FEATURES = cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    model = build(cfg)
    stock_cfg = cfg.clone()
    stock_cfg.MODEL.BACKBONE.NAME = name.replace("mabn_", "")
    stock_cfg.MODEL.RESNETS.NORM = "BN"
    stock_cfg.MODEL.FPN.NORM = ""
    assert model.output_shape() == build(stock_cfg).output_shape()
    out = model(_images())
    assert {k: v.shape[1] for k, v in out.items()} == {k: s.channels for k, s in model.output_shape().items()}
    sum((v * v).mean() for v in out.values()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    model.eval()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out_eval = model(_images(seed=1))
    assert all(torch.isfinite(v).all() for v in out_eval.values())
    assert all(torch.equal(buffers[k], v) for k, v in model.state_dict().items())
