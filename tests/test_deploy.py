"""Folding fixed-affine norms into the preceding convolution (d2norm.deploy; rethinking §4.3, A.8).

Every foldable norm in the backbone of the main-job detector (Faster R-CNN R18-FPN) and in a RetinaNet head:
the folded model's boxes and scores equal the unfolded model's (≤ 1e-4 relative), nothing foldable is left,
and the per-sample-statistics norms are reported, not folded, and leave the output unchanged."""
import copy

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import Conv2d
from torch import nn

import d2norm
from d2norm.deploy import fold_norms, norm_inference_affine
from d2norm.layers import DomainBatchNorm2d, build_model, domain_scope
from d2norm.layers.base import NotAnAffine

FOLDABLE = ["BN", "FrozenBN", "GhostBN", "DomainBN", "AnySyncBN", "MABN", "ExampleWeightedBN", "BGN"]
NOT_FOLDABLE = {"EvalNorm": "own statistics", "BatchStatsBN": "mini-batch", "GN": "GroupNorm"}


def _cfg(norm, meta="rcnn"):
    cfg = d2norm.add_d2norm_config(get_cfg())
    if meta == "rcnn":
        cfg.merge_from_file("configs/cpu/faster_rcnn_R18_FPN_ghostbn.yaml")
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    else:
        cfg.merge_from_file("configs/cpu/retinanet_R18_ghostbn.yaml")
        # "BN" heads are detectron2's per-level CycleBatchNormList (not foldable: one shared conv, a BN per level)
        cfg.MODEL.RETINANET.NORM = norm if norm not in ("MABN", "BN") else ""
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RESNETS.NORM = norm
    cfg.D2NORM.DOMAIN_BN.NUM_DOMAINS = 1
    cfg.D2NORM.EXAMPLE_WEIGHING.ALPHA = 0.0  # α = 0: BN inference, foldable (four-things eq 3)
    cfg.D2NORM.BGN.ALPHA = 0.0
    cfg.D2NORM.BGN.NUM_CHANNEL_GROUPS = 16
    if norm == "MABN":
        cfg.MODEL.BACKBONE.NAME = "build_mabn_resnet_fpn_backbone"
    return cfg


@torch.no_grad()
def _randomize_norms(model, seed=0):
    """Non-trivial population statistics and affines in every norm (fresh ones are the identity map)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if not t.is_floating_point() or t.dim() == 0 or name not in (
                "weight", "bias", "running_mean", "running_var", "running_chi", "running_mean_sq"
            ) or isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            if name == "weight":
                t.copy_(torch.rand(t.shape, generator=g) * 0.8 + 0.6)
            elif name in ("bias", "running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            elif name in ("running_var", "running_chi"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
        if hasattr(m, "running_mean_sq"):
            m.running_mean_sq.copy_(m.running_mean.square() + torch.rand(m.running_mean.shape, generator=g) + 0.5)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return [{"image": (torch.rand(3, 128, 128, generator=g) * 255), "height": 128, "width": 128} for _ in range(2)]


def _detections(model, inputs):
    with torch.no_grad():
        outs = model(inputs)
    return [(o["instances"].pred_boxes.tensor, o["instances"].scores, o["instances"].pred_classes) for o in outs]


def _assert_same_detections(ref, out):
    """Same detections, boxes and scores within 1e-4 relative. A randomly initialized detector has near-tied
    scores whose order (and so the index of a detection) can flip with float rounding: each detection is
    matched to the reference detection of the same class nearest in box coordinates, and the matching must be
    one-to-one."""
    for (b0, s0, c0), (b1, s1, c1) in zip(ref, out):
        assert b0.shape == b1.shape and b0.shape[0] > 0
        d = torch.cdist(b1.double(), b0.double(), p=float("inf"))
        d[c1[:, None] != c0[None, :]] = float("inf")
        d = d + (s1.double()[:, None] - s0.double()[None, :]).abs() * 1e3  # ties in box: the closer score
        j = d.argmin(1)
        assert torch.equal(j.sort().values, torch.arange(len(j))), "detections do not match one-to-one"
        torch.testing.assert_close(b1, b0[j], rtol=1e-4, atol=1e-4 * 128)
        torch.testing.assert_close(s1, s0[j], rtol=1e-4, atol=1e-6)


def _build(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    _randomize_norms(model)
    return model


# (MABN RetinaNet is its own meta-arch; the R-CNN case covers MABN with its CenteredConv2d backbone)
@pytest.mark.parametrize("norm, meta", [(n, "rcnn") for n in FOLDABLE] + [(n, "retinanet") for n in FOLDABLE if n != "MABN"])
def test_folded_detector_equals_unfolded(norm, meta):
    cfg = _cfg(norm, meta)
    model = _build(cfg)
    inputs = _inputs()
    ref = _detections(model, inputs)
    folded = copy.deepcopy(model)
    report = fold_norms(folded)
    assert report.converted, "nothing folded"
    # nothing foldable is left: every remaining norm module was reported with a reason
    for name, m in folded.named_modules():
        if isinstance(m, Conv2d):
            assert m.norm is None or name + ".norm" in report.skipped, name
    from d2norm.layers.mabn import WeightCentralized

    # a folded weight-centralized conv became a plain conv (its folded weight is centered already)
    assert not any(isinstance(m, WeightCentralized) for m in folded.backbone.modules())
    norm_type = type(model.backbone.bottom_up.stem.conv1.norm)
    assert not any(type(m) is norm_type for m in folded.backbone.modules()), "a backbone norm survived folding"
    if meta == "retinanet" and cfg.MODEL.RETINANET.NORM:
        assert "head.cls_subnet.1" in report.converted and "head.bbox_subnet.4" in report.converted
    _assert_same_detections(ref, _detections(folded, inputs))


@pytest.mark.parametrize("norm", sorted(NOT_FOLDABLE))
def test_per_sample_norms_are_reported_and_left(norm):
    cfg = _cfg(norm)
    if norm == "GN":
        cfg.MODEL.RESNETS.NORM = "GN"
    model = _build(cfg)
    inputs = _inputs()
    ref = _detections(model, inputs)
    report = fold_norms(model)
    assert not report.converted
    stem = "backbone.bottom_up.stem.conv1.norm"
    assert NOT_FOLDABLE[norm] in report.skipped[stem]
    assert model.backbone.bottom_up.stem.conv1.norm is not None
    for r, o in zip(ref, _detections(model, inputs)):
        assert all(torch.equal(a, b) for a, b in zip(r, o))


def test_sequential_pattern_and_static_domain():
    """conv → norm inside nn.Sequential (RetinaNet subnets); a per-domain DomainBN folds for a static domain."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), DomainBatchNorm2d(6, num_domains=3), nn.ReLU())
    _randomize_norms(seq)
    seq.eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        ref = seq[2](seq[1](seq[0](x), domain=2))
    report = fold_norms(copy.deepcopy(seq).eval())
    assert not report.converted and "no static domain" in report.skipped["1"]
    with domain_scope(2):
        report = fold_norms(seq)
    assert report.converted == {"1": "0"} and isinstance(seq[1], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(seq(x), ref, rtol=1e-5, atol=1e-5)


def test_retinanet_per_level_bn_head_is_reported():
    cfg = _cfg("BN", "retinanet")
    cfg.MODEL.RETINANET.NORM = "BN"  # detectron2's CycleBatchNormList: a BN per FPN level after a shared conv
    model = _build(cfg)
    report = fold_norms(model)
    assert "per FPN level" in report.skipped["head.cls_subnet.1"]
    assert "backbone.bottom_up.stem.conv1.norm" in report.converted


def test_fold_refuses_training_mode_and_dispatches_torch_norms():
    with pytest.raises(ValueError, match="model.eval"):
        fold_norms(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))
    with pytest.raises(NotAnAffine, match="GroupNorm"):
        norm_inference_affine(nn.GroupNorm(1, 2))
    with pytest.raises(NotAnAffine, match="track_running_stats"):
        norm_inference_affine(nn.BatchNorm2d(2, track_running_stats=False))


def test_sequential_centered_conv_mabn_becomes_a_plain_conv():
    """MABN after a weight-centralized plain conv in an nn.Sequential (MABNRetinaNet's head subnets)."""
    from d2norm.layers import MABN2d
    from d2norm.layers.mabn import CenteredPlainConv2d

    torch.manual_seed(0)
    seq = nn.Sequential(CenteredPlainConv2d(3, 6, 3, padding=1), MABN2d(6), nn.ReLU())
    _randomize_norms(seq)
    seq.eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        ref = seq(x)
    report = fold_norms(seq)
    assert report.converted == {"1": "0"} and type(seq[0]) is nn.Conv2d and isinstance(seq[1], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(seq(x), ref, rtol=1e-5, atol=1e-5)
