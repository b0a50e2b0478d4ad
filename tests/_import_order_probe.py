"""Run in a fresh interpreter: import the detectron2 modules named on the command line, then d2norm, and report
(as JSON on the last line) whether d2norm's registrations and compat shims took effect."""
import importlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

for name in sys.argv[1:]:
    importlib.import_module(name)

import d2norm  # noqa: E402
from d2norm import compat  # noqa: E402

import detectron2.layers  # noqa: E402
import detectron2.modeling.backbone.fpn as fpn  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data.transforms import ExtentTransform  # noqa: E402
from detectron2.model_zoo import get_config_file  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

cfg = d2norm.add_d2norm_config(get_cfg())
cfg.merge_from_file(os.path.join(ROOT, "configs", "cpu", "faster_rcnn_R18_FPN_ghostbn.yaml"))
cfg.D2NORM.GHOST_BN.SIZE = 3
model = build_model(cfg)  # detectron2's own build_model, bound by d2norm
ghost = [m.ghost_size for m in model.modules() if isinstance(m, d2norm.layers.GhostBatchNorm2d)]
extent = ExtentTransform(src_rect=(0, 0, 8, 8), output_size=(4, 4))
print(json.dumps({
    "ghost_sizes": sorted(set(ghost)),
    "num_ghost": len(ghost),
    "get_norm_is_d2norm": detectron2.layers.get_norm is d2norm.layers.get_norm and fpn.get_norm is d2norm.get_norm,
    "model_zoo": get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml").endswith("retinanet_R_50_FPN_1x.yaml"),
    "extent_interp": int(extent.interp),
    "applied": compat.APPLIED,
}))
