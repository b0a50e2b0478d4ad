"""Every registered d2norm name, through every detectron2 NORM key, builds inside the stock architectures and a
tiny model with it trains a few iterations on the synthetic set without NaN."""
import copy

import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.utils.events import EventStorage

import d2norm  # noqa: F401  (compat + registrations)
from d2norm.data import SyntheticSpec, register_synthetic_dataset
from d2norm.layers import NORM_REGISTRY, D2NormModule, build_model
from d2norm.solver import build_optimizer

from helpers import tiny_r18_fpn_rcnn_cfg

NAMES = sorted(k for k, _ in NORM_REGISTRY)


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    register_synthetic_dataset(str(tmp_path_factory.mktemp("synth")), SyntheticSpec(64, 8, 4, seed=1, min_size=6))
    cfg = _base_cfg()
    mapper = DatasetMapper(cfg, is_train=True)
    dicts = DatasetCatalog.get("d2norm_synthetic_train")
    data = [mapper(copy.deepcopy(d)) for d in dicts]
    return [data[0:4], data[4:8]]


def _base_cfg():
    return tiny_r18_fpn_rcnn_cfg(width=32, mask_convs=1, opts=[
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
        "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 64, "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64,
        "SOLVER.BASE_LR", 0.005,
        # stock architectures cannot tell DomainBN which domain a call is: one domain there
        "D2NORM.DOMAIN_BN.NUM_DOMAINS", 1,
    ])


def _rcnn_cfg(name):
    cfg = _base_cfg()
    for key in ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"):
        cfg.MODEL[key].NORM = name
    return cfg


def _retina_cfg(name):
    cfg = _base_cfg()
    cfg.merge_from_list(
        [
            "MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.MASK_ON", False,
            "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone",
            "MODEL.RESNETS.OUT_FEATURES", ["res3", "res4", "res5"], "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"],
            "MODEL.RESNETS.NORM", name, "MODEL.FPN.NORM", name, "MODEL.RETINANET.NORM", name,
        ]
    )
    return cfg


def _train(cfg, batches):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    opt = build_optimizer(cfg, model)
    for batch in batches:
        with EventStorage():
            losses = model(batch)
        total = sum(losses.values())
        assert torch.isfinite(total), f"non-finite loss {losses}"
        opt.zero_grad()
        total.backward()
        opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
    return model


def _prefixes_with(model, cls):
    return {n for n, m in model.named_modules() if type(m) is cls}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_registered_norm_in_every_norm_key_trains(name, batches):
    cls = NORM_REGISTRY.get(name)
    assert issubclass(cls, D2NormModule)

    model = _train(_rcnn_cfg(name), batches)
    found = _prefixes_with(model, cls)
    for prefix in ("backbone.bottom_up.stem", "backbone.bottom_up.res5", "backbone.fpn_lateral2",
                   "roi_heads.box_head.conv1", "roi_heads.mask_head.mask_fcn1"):
        assert any(f.startswith(prefix) for f in found), f"{name} missing under {prefix}"

    model = _train(_retina_cfg(name), batches)
    found = _prefixes_with(model, cls)
    for prefix in ("backbone.bottom_up.res3", "backbone.fpn_output3", "head.cls_subnet", "head.bbox_subnet"):
        assert any(f.startswith(prefix) for f in found), f"{name} missing under {prefix}"
    model.eval()
    with torch.no_grad():
        out = model([{"image": b["image"], "height": 64, "width": 64} for b in batches[0][:2]])
    assert len(out) == 2 and all(torch.isfinite(o["instances"].scores).all() for o in out)
