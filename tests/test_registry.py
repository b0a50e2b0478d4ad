"""The norm registry: names in every detectron2 NORM key, errors, and per-build option isolation."""
import logging

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.layers import batch_norm as d2bn
from torch import nn

import d2norm
import d2norm.solver  # noqa: F401
from d2norm.layers import GhostBatchNorm2d, get_norm, norm_options, valid_norm_names
from d2norm.layers.registry import register_norm

from helpers import tiny_instance_batch, tiny_r18_fpn_rcnn_cfg


def test_detectron2_names_keep_their_meaning():
    names = valid_norm_names()
    for n in ("BN", "SyncBN", "FrozenBN", "GN", "naiveSyncBN", "GhostBN"):
        assert n in names
    assert type(get_norm("BN", 8)) is d2bn.BatchNorm2d
    assert type(get_norm("FrozenBN", 8)) is FrozenBatchNorm2d
    gn = get_norm("GN", 64)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 32
    assert get_norm("", 8) is None and get_norm(None, 8) is None
    assert isinstance(get_norm(lambda c: nn.BatchNorm2d(c), 8), nn.BatchNorm2d)


def test_unknown_name_lists_every_valid_name():
    with pytest.raises(ValueError) as e:
        get_norm("GhostBNN", 8)
    msg = str(e.value)
    assert "'GhostBNN'" in msg
    for n in valid_norm_names():
        assert n in msg


def test_unknown_name_fails_at_build_time():
    cfg = _tiny_rcnn_cfg()
    cfg.MODEL.RESNETS.NORM = "NoSuchNorm"
    with pytest.raises(ValueError, match="Unknown norm 'NoSuchNorm'"):
        d2norm.layers.build_model(cfg)


def test_cannot_shadow_detectron2_names():
    with pytest.raises(ValueError, match="must not shadow"):
        register_norm("BN")


def _tiny_rcnn_cfg():
    return tiny_r18_fpn_rcnn_cfg(width=32, box_convs=2, mask_convs=2, opts=["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7])


def _norms_under(module, prefix):
    return {n: m for n, m in module.named_modules() if n.startswith(prefix) and isinstance(m, GhostBatchNorm2d)}


@pytest.mark.parametrize(
    "key,prefix",
    [
        ("MODEL.RESNETS.NORM", "backbone.bottom_up"),
        ("MODEL.FPN.NORM", "backbone.fpn_"),
        ("MODEL.ROI_BOX_HEAD.NORM", "roi_heads.box_head"),
        ("MODEL.ROI_MASK_HEAD.NORM", "roi_heads.mask_head"),
    ],
)
def test_stock_rcnn_builders_pick_up_registered_norm(key, prefix):
    cfg = _tiny_rcnn_cfg()
    cfg.merge_from_list([key, "GhostBN", "D2NORM.GHOST_BN.SIZE", 3])
    model = d2norm.layers.build_model(cfg)
    found = _norms_under(model, prefix)
    assert found, f"no GhostBN under {prefix} with {key}=GhostBN"
    assert all(m.ghost_size == 3 for m in found.values())
    # ...and nowhere else.
    assert set(_norms_under(model, "")) == set(found)


def test_retinanet_and_semseg_heads_pick_up_registered_norm():
    from detectron2.modeling import build_model as stock_build_model  # rebound by d2norm

    cfg = _tiny_rcnn_cfg()
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.RETINANET.NUM_CONVS = 2
    cfg.MODEL.RETINANET.NORM = "GhostBN"
    cfg.D2NORM.GHOST_BN.SIZE = 7
    model = stock_build_model(cfg)
    found = _norms_under(model, "head")
    assert len(found) == 4 and all(m.ghost_size == 7 for m in found.values())

    cfg = _tiny_rcnn_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    cfg.MODEL.SEM_SEG_HEAD.NAME = "SemSegFPNHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 16
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GhostBN"
    cfg.D2NORM.GHOST_BN.SIZE = 5
    model = stock_build_model(cfg)
    found = _norms_under(model, "sem_seg_head")
    assert found and all(m.ghost_size == 5 for m in found.values())


def test_two_builds_do_not_share_options(caplog):
    a, b = _tiny_rcnn_cfg(), _tiny_rcnn_cfg()
    for cfg, size, eps in ((a, 2, 1e-3), (b, 9, 1e-4)):
        cfg.MODEL.RESNETS.NORM = "GhostBN"
        cfg.D2NORM.GHOST_BN.SIZE = size
        cfg.D2NORM.BN.EPS = eps
    ma = d2norm.layers.build_model(a)
    mb = d2norm.layers.build_model(b)
    assert {(m.ghost_size, m.eps) for m in _norms_under(ma, "").values()} == {(2, 1e-3)}
    assert {(m.ghost_size, m.eps) for m in _norms_under(mb, "").values()} == {(9, 1e-4)}
    # Changing a cfg after the build changes nothing; nothing outlives the build.
    a.D2NORM.GHOST_BN.SIZE = 100
    assert {m.ghost_size for m in _norms_under(ma, "").values()} == {2}
    assert d2norm.layers.registry._ACTIVE_CFG.get() is None
    with norm_options(b):
        assert get_norm("GhostBN", 4).ghost_size == 9
    d2norm.layers.registry._state["warned_default"].clear()
    with caplog.at_level(logging.WARNING):
        assert get_norm("GhostBN", 4).ghost_size == 16
    assert "outside d2norm.build_model" in caplog.text


def test_tiny_model_with_registered_norm_trains_without_nan():
    cfg = _tiny_rcnn_cfg()
    cfg.MODEL.RESNETS.NORM = "GhostBN"
    cfg.MODEL.ROI_BOX_HEAD.NORM = "GhostBN"
    cfg.D2NORM.GHOST_BN.SIZE = 64
    torch.manual_seed(0)
    model = d2norm.layers.build_model(cfg)
    model.train()
    batch = tiny_instance_batch(0)
    opt = d2norm.solver.build_optimizer(cfg, model)
    from detectron2.utils.events import EventStorage

    for _ in range(3):
        with EventStorage():
            losses = model(batch)
        total = sum(losses.values())
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        opt.step()
    norms = _norms_under(model, "")
    assert all(int(m.num_batches_tracked) == 3 for m in norms.values())


def test_registry_holds_layer_classes_whose_from_config_gives_constructor_kwargs():
    from d2norm.layers import NORM_REGISTRY, D2NormModule

    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.D2NORM.GHOST_BN.SIZE = 3
    names = [k for k, _ in NORM_REGISTRY]
    assert len(names) == len(NORM_REGISTRY) >= 8 and "GhostBN" in repr(NORM_REGISTRY)
    for name, cls in NORM_REGISTRY:
        assert isinstance(cls, type) and issubclass(cls, D2NormModule), name
        kwargs = cls.from_config(cfg, 64)
        assert isinstance(kwargs, dict) and 64 in kwargs.values(), name
        assert type(cls(**kwargs)) is cls
    kwargs = NORM_REGISTRY.get("GhostBN").from_config(cfg, 16)
    assert kwargs["ghost_size"] == 3 and kwargs["num_features"] == 16
    with pytest.raises(KeyError, match="NoSuch.*registered: .*GhostBN"):
        NORM_REGISTRY.get("NoSuch")


def test_register_norm_rejects_duplicates_and_non_layers():
    from d2norm.layers import NORM_REGISTRY

    with pytest.raises(ValueError, match="already registered"):
        register_norm("GhostBN")(GhostBatchNorm2d)
    with pytest.raises(ValueError, match="D2NormModule"):
        register_norm("NotALayer")(lambda cfg, c: nn.BatchNorm2d(c))
    with pytest.raises(ValueError, match="D2NormModule"):
        register_norm("NotALayer")(nn.BatchNorm2d)
    assert "NotALayer" not in NORM_REGISTRY
