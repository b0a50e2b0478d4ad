"""XBNBlock ResNet backbones (estimation-shift §5.1-5.3, Fig. 6, Table 1, Fig. 7)."""
import logging

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone
from torch import nn

import d2norm.modeling.backbone.xbn_resnet  # noqa: F401  (registers the backbones)
from d2norm import add_d2norm_config
from d2norm.layers.ghost_bn import GhostBatchNorm2d
from d2norm.layers.registry import norm_options
from d2norm.modeling.backbone.xbn_resnet import BatchFreeNorm, xbn_load_report

ALL_FEATURES = ["res2", "res3", "res4", "res5"]
BLOCKS = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def make_cfg(depth=50, position=2, density=1, norm_type="GN", groups=4, norm="BN",
             name="build_xbn_resnet_backbone", slim=True, freeze_at=0, stem_norm="RESNETS"):
    """The block tests keep the stem at MODEL.RESNETS.NORM (``stem_norm``); the stem tests set "BFN"."""
    cfg = add_d2norm_config(get_cfg())
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    r = cfg.MODEL.RESNETS
    r.DEPTH, r.NORM, r.OUT_FEATURES = depth, norm, list(ALL_FEATURES)
    if slim and depth >= 50:  # bottleneck widths 8/16/32/64, outputs 32/64/128/256
        r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, r.WIDTH_PER_GROUP = 8, 32, 8
    elif slim:  # R18 needs RES2_OUT_CHANNELS 64
        r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS = 16, 64
    cfg.MODEL.FPN.IN_FEATURES = list(ALL_FEATURES)
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    x = cfg.D2NORM.XBNBLOCK
    x.POSITION, x.DENSITY, x.NORM_TYPE, x.NUM_GROUPS = position, density, norm_type, groups
    x.STEM_NORM = stem_norm
    return cfg


def build(cfg):
    with norm_options(cfg):
        return build_backbone(cfg, ShapeSpec(channels=3))


def stock_cfg(cfg):
    cfg = cfg.clone()
    cfg.MODEL.BACKBONE.NAME = {
        "build_xbn_resnet_backbone": "build_resnet_backbone",
        "build_xbn_resnet_fpn_backbone": "build_resnet_fpn_backbone",
        "build_xbn_retinanet_resnet_fpn_backbone": "build_retinanet_resnet_fpn_backbone",
    }[cfg.MODEL.BACKBONE.NAME]
    return cfg


def global_blocks(depth):
    """[(name, k)] with k the 1-based global block index, written from §5.2.1's counting."""
    out, k = [], 0
    for stage, n in zip(ALL_FEATURES, BLOCKS[depth]):
        for i in range(n):
            k += 1
            out.append((f"{stage}.{i}", k))
    return out


def _images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g) * 3 + 2


@pytest.mark.parametrize("position", [1, 2, 3])
@pytest.mark.parametrize("density", [1, 2, 4, 8])
def test_norm_types_follow_position_and_density(position, density):
    model = build(make_cfg(position=position, density=density, groups=4))
    modules = dict(model.named_modules())
    assert type(modules["stem.conv1"].norm) is nn.BatchNorm2d
    n_xbn = 0
    for name, k in global_blocks(50):
        block = modules[name]
        is_xbn = k % density == 0
        for p in (1, 2, 3):
            norm = getattr(block, f"conv{p}").norm
            if is_xbn and p == position:
                n_xbn += 1
                assert type(norm) is BatchFreeNorm, (name, p)
                assert norm.num_groups == 4 and not norm.is_instance_norm
                assert norm.num_channels == getattr(block, f"conv{p}").out_channels
            else:
                assert type(norm) is nn.BatchNorm2d, (name, p, type(norm))
        if block.shortcut is not None:
            assert type(block.shortcut.norm) is nn.BatchNorm2d
    assert n_xbn == 16 // density
    assert sum(isinstance(m, BatchFreeNorm) for m in model.modules()) == n_xbn


@pytest.mark.parametrize("depth,density,expected", [
    (50, 4, ["res3.0", "res4.0", "res4.4", "res5.2"]),   # blocks 4, 8, 12, 16 of 16
    (50, 8, ["res4.0", "res5.2"]),                       # blocks 8, 16
    (101, 8, ["res4.0", "res4.8", "res4.16", "res5.1"]),  # blocks 8, 16, 24, 32 of 33
    (18, 2, ["res2.1", "res3.1", "res4.1", "res5.1"]),
    (50, 32, []),
])
def test_density_counts_blocks_globally_across_stages(depth, density, expected):
    model = build(make_cfg(depth=depth, density=density, groups=4))
    xbn = sorted(n.rsplit(".conv2.norm", 1)[0] for n, m in model.named_modules() if isinstance(m, BatchFreeNorm))
    assert xbn == sorted(expected)


def test_instance_norm_and_basic_blocks():
    model = build(make_cfg(norm_type="IN", groups=5))  # NUM_GROUPS is ignored for IN
    norms = [m for m in model.modules() if isinstance(m, BatchFreeNorm)]
    assert len(norms) == 16 and all(m.is_instance_norm and m.num_groups == m.num_channels for m in norms)
    r18 = build(make_cfg(depth=18, position=1, groups=8))
    assert sorted(n for n, m in r18.named_modules() if isinstance(m, BatchFreeNorm)) == sorted(
        f"{b}.conv1.norm" for b, _ in global_blocks(18))
    with pytest.raises(ValueError, match=r"POSITION=3.*res2\.0 \(BasicBlock\) has 2 norms"):
        build(make_cfg(depth=18, position=3, groups=8))


@pytest.mark.parametrize("norm,cls", [("FrozenBN", FrozenBatchNorm2d), ("GhostBN", GhostBatchNorm2d)])
def test_bn_part_keeps_resnets_norm(norm, cls):
    model = build(make_cfg(norm=norm, density=2))
    for name, m in model.named_modules():
        if hasattr(m, "norm") and m.norm is not None:
            is_slot = name.endswith("conv2") and isinstance(m.norm, BatchFreeNorm)
            assert is_slot or type(m.norm) is cls, name
    assert sum(isinstance(m, BatchFreeNorm) for m in model.modules()) == 8


@pytest.mark.parametrize("key,value,match", [
    ("POSITION", 4, "POSITION must be an integer >= 1 and <= 3.*got 4"),
    ("POSITION", 0, "POSITION must be an integer >= 1 and <= 3.*got 0"),
    ("DENSITY", 0, "DENSITY must be an integer >= 1.*got 0"),
    ("NORM_TYPE", "BN", r"NORM_TYPE must be one of \('GN', 'IN'\), got 'BN'"),
    ("NUM_GROUPS", 0, "NUM_GROUPS must be an integer >= 1, got 0"),
    ("EPS", 0.0, "EPS must be a number > 0, got 0.0"),
])
def test_bad_options_raise(key, value, match):
    cfg = make_cfg()
    cfg.D2NORM.XBNBLOCK[key] = value
    with pytest.raises(ValueError, match=match):
        build(cfg)


def test_group_count_must_divide_channels():
    with pytest.raises(ValueError) as err:
        build(make_cfg(groups=16))  # P2 slot channels 8/16/32/64: res2 (8) fails
    msg = str(err.value)
    assert "NUM_GROUPS=16" in msg and "res2.0.conv2.norm (8 channels)" in msg and "res2.2.conv2.norm" in msg
    assert "res3." not in msg  # 16, 32, 64 are fine


def _randomize_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                t.fill_(7)


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
def test_standard_r50_state_dict_loads(norm, caplog):
    """A detectron2 R-50 (full size) checkpoint loads strictly; GN slots keep gamma/beta; statistics reported."""
    cfg = make_cfg(norm=norm, groups=64, slim=False)
    stock = build(stock_cfg(cfg))
    _randomize_(stock)
    sd = stock.state_dict()
    xbn = build(cfg)
    with caplog.at_level(logging.WARNING):
        result = xbn.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    stats = ["running_mean", "running_var"] + (["num_batches_tracked"] if norm == "BN" else [])
    expected = [f"{b}.conv2.norm.{s}" for b, _ in global_blocks(50) for s in stats]
    report = xbn_load_report(xbn)
    assert report.unmapped_source == {f"{b}.conv2.norm": stats for b, _ in global_blocks(50)}
    assert not report.converted and not report.uninitialized_target
    assert "res4.5.conv2.norm.{" + ", ".join(stats) + "}" in caplog.text
    mine = xbn.state_dict()
    assert set(mine) == set(sd) - set(expected)
    for k, v in mine.items():
        assert torch.equal(v, sd[k]), k  # gamma/beta of GN slots included
    assert torch.equal(xbn.res3[1].conv2.norm.weight, sd["res3.1.conv2.norm.weight"])
    assert sd["res3.1.conv2.norm.running_mean"].abs().sum() > 0  # the dropped entries held real statistics


def test_checkpointer_load_into_fpn_reports_prefixed_keys(tmp_path, caplog):
    cfg = make_cfg(name="build_xbn_resnet_fpn_backbone", density=8)
    stock = build(stock_cfg(cfg))
    _randomize_(stock, seed=1)
    torch.save({"model": stock.state_dict()}, tmp_path / "stock.pth")
    xbn = build(cfg)
    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(xbn).load(str(tmp_path / "stock.pth"))
    assert xbn_load_report(xbn).unmapped_source == {
        f"bottom_up.{b}.conv2.norm": ["running_mean", "running_var", "num_batches_tracked"] for b in ("res4.0", "res5.2")
    }
    assert "bottom_up.res5.2.conv2.norm.{running_mean, running_var, num_batches_tracked}" in caplog.text
    assert torch.equal(xbn.bottom_up.res4[0].conv2.norm.weight, stock.bottom_up.res4[0].conv2.norm.weight)


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("name", ["build_xbn_resnet_backbone", "build_xbn_resnet_fpn_backbone",
                                  "build_xbn_retinanet_resnet_fpn_backbone"])
def test_shapes_equal_stock_and_forward_backward(depth, name):
    cfg = make_cfg(depth=depth, name=name, groups=8 if depth == 18 else 4)
    if "retinanet" in name:
        cfg.MODEL.RESNETS.OUT_FEATURES = cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    torch.manual_seed(0)
    model = build(cfg)
    stock = build(stock_cfg(cfg))
    assert model.output_shape() == stock.output_shape()
    x = _images()
    out, ref = model(x), stock(x)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref.items()}
    loss = sum((v * v).mean() for v in out.values())
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    slot = next(m for m in model.modules() if isinstance(m, BatchFreeNorm))
    assert slot.weight.grad.abs().sum() > 0


def test_no_xbn_block_equals_stock_numerically():
    """Density above the block count replaces nothing: same module tree, same outputs as detectron2's."""
    cfg = make_cfg(density=17)
    stock = build(stock_cfg(cfg))
    xbn = build(cfg)
    xbn.load_state_dict(stock.state_dict())
    x = _images()
    for mode in (True, False):
        stock.train(mode)
        xbn.train(mode)
        out, ref = xbn(x), stock(x)
        assert out.keys() == ref.keys()
        for k, v in ref.items():
            torch.testing.assert_close(out[k], v, rtol=0, atol=0)


def _bn_ref(x, bn, training):
    if training:
        mu = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mu) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    else:
        mu, var = bn.running_mean.view(1, -1, 1, 1), bn.running_var.view(1, -1, 1, 1)
    return (x - mu) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def _gn_ref(x, groups, gn):
    n, c, h, w = x.shape
    xg = x.reshape(n, groups, c // groups * h * w)
    mu = xg.mean(-1, keepdim=True)
    var = ((xg - mu) ** 2).mean(-1, keepdim=True)
    y = ((xg - mu) / torch.sqrt(var + gn.eps)).reshape(n, c, h, w)
    return y * gn.weight.view(1, -1, 1, 1) + gn.bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("training", [True, False])
def test_xbnblock_p2_matches_float64_reference(training):
    """Fig. 6b: conv1-BN-ReLU, conv2-GN-ReLU, conv3-BN, + shortcut, ReLU (block res2.1, identity shortcut)."""
    model = build(make_cfg(groups=4)).double()
    _randomize_(model, seed=3)
    model.train(training)
    block = model.res2[1]
    x = torch.randn(3, 32, 6, 5, dtype=torch.float64) * 3 + 2
    h = F.relu(_bn_ref(F.conv2d(x, block.conv1.weight), block.conv1.norm, training))
    h = F.relu(_gn_ref(F.conv2d(h, block.conv2.weight, padding=1), 4, block.conv2.norm))
    h = _bn_ref(F.conv2d(h, block.conv3.weight), block.conv3.norm, training)
    ref = F.relu(h + x)
    torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-10)


def test_freeze_at_freezes_batch_free_norms_too():
    model = build(make_cfg(freeze_at=2))
    assert isinstance(model.res2[0].conv1.norm, FrozenBatchNorm2d)
    assert isinstance(model.res2[0].conv2.norm, BatchFreeNorm)
    assert not model.res2[0].conv2.norm.weight.requires_grad
    assert model.res3[0].conv2.norm.weight.requires_grad
    assert type(model.res3[0].conv1.norm) is nn.BatchNorm2d


def test_batch_free_norm_zero_size_and_bf16():
    norm = BatchFreeNorm(2, 4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.5, -1.0, 2.0]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    x0 = torch.randn(0, 4, 3, 3, requires_grad=True)
    y0 = norm(x0)
    assert y0.shape == (0, 4, 3, 3)
    y0.sum().backward()
    assert x0.grad.shape == (0, 4, 3, 3)
    # bf16 input: the values of the float32 GN reference (float64 formula) on the same (bf16-rounded) input,
    # within bf16 output rounding
    x = (torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 3 + 5).bfloat16()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    ref = _gn_ref(x.double(), 2, norm)
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(norm(x.float()).double(), ref.detach(), rtol=1e-5, atol=1e-5)


# ---- the stem (official code: batch-free stem) and loads that leave BN layers without statistics ------------
def _gn_stem_checkpoint(cfg):
    """A checkpoint in the format of the authors' XBNBlock models converted to detectron2 names: the stem norm
    and the GN slots hold gamma/beta only, every BN holds statistics; a plain dict (no torch version metadata,
    like a converted .pkl)."""
    ref = build(cfg)
    _randomize_(ref, seed=4)
    return {k: v.clone() for k, v in ref.state_dict().items()}


def test_default_stem_is_batch_free_as_the_official_code():
    cfg = add_d2norm_config(get_cfg())
    assert cfg.D2NORM.XBNBLOCK.STEM_NORM == "BFN"
    full = build(make_cfg(groups=64, slim=False, stem_norm="BFN"))  # 64-channel stem, GN 64 groups = IN
    stem = full.stem.conv1.norm
    assert isinstance(stem, BatchFreeNorm) and stem.num_groups == 64 and stem.is_instance_norm
    slim = build(make_cfg(norm_type="IN", stem_norm="BFN"))
    assert slim.stem.conv1.norm.is_instance_norm
    x = _images(2, 32)
    h = F.conv2d(x, slim.stem.conv1.weight, stride=2, padding=3)
    ref = F.max_pool2d(F.relu(_gn_ref(h, 8, slim.stem.conv1.norm)), 3, 2, 1)
    torch.testing.assert_close(slim.stem(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"STEM_NORM must be one of \('BFN', 'RESNETS'\).*'GN'"):
        build(make_cfg(stem_norm="GN"))
    with pytest.raises(ValueError, match=r"NUM_GROUPS=3.*stem\.conv1\.norm \(8 channels"):
        build(make_cfg(groups=3, stem_norm="BFN", density=99))


def test_gn_stem_checkpoint_loads_completely_with_default_stem(tmp_path, caplog):
    from d2norm.engine.checkpoint import D2NormCheckpointer

    cfg = make_cfg(norm="FrozenBN", stem_norm="BFN")
    sd = _gn_stem_checkpoint(cfg)
    assert "stem.conv1.norm.weight" in sd and "stem.conv1.norm.running_mean" not in sd
    torch.save({"model": sd}, tmp_path / "xbn.pth")
    model = build(cfg)
    with caplog.at_level(logging.WARNING):
        incompatible = D2NormCheckpointer(model)._load_model(torch.load(tmp_path / "xbn.pth"))
    assert not incompatible.missing_keys and "no population statistics" not in caplog.text
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("backbone", ["xbn_stem_resnets", "resnet", "mabn"])
def test_load_without_statistics_is_reported_loudly(tmp_path, caplog, backbone):
    """A BN-family layer left without loaded statistics is named in a warning and in the checkpointer's
    missing keys — even a FrozenBN, which detectron2 silently fills with mean 0 / var 1."""
    from d2norm.engine.checkpoint import D2NormCheckpointer

    if backbone == "mabn":
        cfg = make_cfg(norm="MABN", name="build_mabn_resnet_backbone")
        layer, stats = "res3.0.conv1.norm", ["running_chi"]
    else:
        cfg = make_cfg(norm="FrozenBN", stem_norm="RESNETS")
        if backbone == "resnet":
            cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
        layer, stats = "stem.conv1.norm", ["running_mean", "running_var"]
    sd = _gn_stem_checkpoint(cfg)
    for s_ in stats:
        sd.pop(f"{layer}.{s_}")  # e.g. the authors' GN stem: gamma/beta only
    torch.save({"model": sd}, tmp_path / "ckpt.pth")
    model = build(cfg)
    with caplog.at_level(logging.WARNING):
        D2NormCheckpointer(model).load(str(tmp_path / "ckpt.pth"))
    assert "no population statistics for 1 normalization layer" in caplog.text and layer in caplog.text
    report = caplog.text.split("not found in the checkpoint", 1)  # fvcore's missing-keys report
    assert len(report) == 2 and layer in report[1] and all(s_ in report[1] for s_ in stats)
    incompatible = D2NormCheckpointer(build(cfg))._load_model(torch.load(tmp_path / "ckpt.pth"))
    assert sorted(incompatible.missing_keys) == sorted(f"{layer}.{s_}" for s_ in stats)
    # the same checkpoint with the statistics: nothing reported
    caplog.clear()
    full = _gn_stem_checkpoint(cfg)
    torch.save({"model": full}, tmp_path / "full.pth")
    with caplog.at_level(logging.WARNING):
        incompatible = D2NormCheckpointer(build(cfg))._load_model(torch.load(tmp_path / "full.pth"))
    assert not incompatible.missing_keys and "no population statistics" not in caplog.text


def test_caffe2_checkpoint_folded_statistics_are_not_a_warning(caplog):
    from d2norm.engine.checkpoint import report_unloaded_statistics

    model = build(make_cfg(norm="FrozenBN"))
    keys = {k for k in model.state_dict() if "running_" not in k}
    missing = []
    with caplog.at_level(logging.INFO):
        assert report_unloaded_statistics(model, keys, missing, author="Caffe2") == []
    assert missing == [] and "folded into the affine" in caplog.text
    added = report_unloaded_statistics(model, keys, missing, author="torchvision")
    assert len(added) == 2 * sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) and missing == added
