"""Helpers shared by the tests: tiny detectron2 configs (:mod:`.configs`), independent float64 BatchNorm
references (:mod:`.references`, compared by :func:`.checks.assert_matches_reference`) and module-state snapshots
(:mod:`.state`). Import as ``from helpers import ...``
(pytest puts ``tests/`` on ``sys.path``, as for ``dist_utils``)."""
from .checks import assert_matches_reference, assert_trains_as_batchnorm
from .configs import (
    d2norm_cfg,
    tiny_instance_batch,
    tiny_r18_fpn_rcnn_cfg,
    tiny_retinanet_cfg,
    tiny_retinanet_training_cfg,
    tiny_training_opts,
    trained_demo,
    load_tool,
    DEMO_CONFIG,
)
from .references import TABLE5_ROWS, batch_moments, bn_affine, bn_normalize, bn_train, ema, numeric_grad
from .state import buffers

__all__ = [
    "assert_matches_reference", "assert_trains_as_batchnorm",
    "d2norm_cfg", "tiny_r18_fpn_rcnn_cfg", "tiny_retinanet_cfg", "tiny_training_opts", "tiny_retinanet_training_cfg",
    "tiny_instance_batch", "trained_demo", "load_tool", "DEMO_CONFIG",
    "TABLE5_ROWS", "batch_moments", "bn_affine", "bn_normalize", "bn_train", "ema", "numeric_grad",
    "buffers",
]
