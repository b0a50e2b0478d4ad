"""convert_norm carries affine and statistics from BN / FrozenBN into every registered layer, and reports
what it cannot map."""
import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

import d2norm
from d2norm.layers import NORM_REGISTRY, GhostBatchNorm2d, convert_norm

BN_DERIVED = ["GhostBN", "BatchStatsBN", "ExampleWeightedBN", "EvalNorm", "AnySyncBN", "DomainBN", "BRN"]


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 1), FrozenBatchNorm2d(32))
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return m


def test_every_registered_name_converts(d2cfg):
    assert set(BN_DERIVED) <= set(k for k, _ in NORM_REGISTRY)
    for name, _ in NORM_REGISTRY:
        src = _model()
        ref = {i: {k: v.clone() for k, v in src[i].state_dict().items()} for i in (1, 4)}
        model, report = convert_norm(src, name, d2cfg)
        assert report.target == name and report.converted == {"1": "BatchNorm2d", "4": "FrozenBatchNorm2d"}
        for i in (1, 4):
            new = model[i]
            assert type(new) is NORM_REGISTRY.get(name)
            for key in ("weight", "bias"):
                got = new.state_dict()[key]
                torch.testing.assert_close(got.reshape(-1, 32)[0], ref[i][key], msg=f"{name}.{key}")
            if name in BN_DERIVED:
                for key in ("running_mean", "running_var"):
                    got = new.state_dict()[key]
                    torch.testing.assert_close(got.reshape(-1, 32)[-1], ref[i][key], msg=f"{name}.{key}")
                assert str(i) not in report.unmapped_source
            else:  # MABN, BGN: BN statistics have no counterpart: reported, not defaulted silently
                assert {"running_mean", "running_var"} <= set(report.unmapped_source[str(i)])
                assert report.uninitialized_target[str(i)], "target statistics left at init must be reported"
        # the FrozenBN source stays frozen
        assert all(not p.requires_grad for p in model[4].parameters(recurse=False))
        assert all(p.requires_grad for p in model[1].parameters(recurse=False))


def test_converted_ghostbn_equals_source_in_eval(d2cfg):
    src = _model().eval()
    x = torch.randn(4, 3, 8, 8) * 3 + 1
    y_ref = src(x)
    model, _ = convert_norm(src, "GhostBN", d2cfg)
    model.eval()
    assert isinstance(model[1], GhostBatchNorm2d)
    torch.testing.assert_close(model(x), y_ref)


def test_converts_a_detectron2_resnet_and_keeps_d2norm_layers(d2cfg):
    from detectron2.modeling import ShapeSpec, build_resnet_backbone

    cfg = d2cfg.clone()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    n_frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    model, report = convert_norm(backbone, "EvalNorm", d2cfg)
    assert len(report.converted) == n_frozen > 0
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    # converting again finds nothing: d2norm layers are not re-converted
    _, again = convert_norm(model, "GhostBN", d2cfg)
    assert again.converted == {}


def test_unknown_target():
    with pytest.raises(ValueError, match="'BN' is not a d2norm registered norm"):
        convert_norm(_model(), "BN")
