"""Shared pieces of d2norm's COCO-scale LazyConfigs (detectron2's configs/common + d2norm's additions).

* ``optimizer``: detectron2's SGD with d2norm's parameter groups (``weight_decay_norm`` for every d2norm layer's
  γ/β, no weight decay for EvalNorm's α̂/β̂);
* ``train``: detectron2's common ``train`` plus ``train.d2norm`` (the keys of the yacs ``cfg.D2NORM`` node: hooks,
  layer options for norms named by string, synthetic data), read by tools/lazyconfig_train_net.py;
* ``faster_rcnn(model, dataloader)``: detectron2's common Mask R-CNN model without its mask branch;
* ``single_scale_train(dataloader)``: 800 px single-scale training (the papers' setting) instead of 640-800;
* ``torchvision_r50(model, dataloader, train)``: torchvision's ImageNet R-50 (which stores BN statistics, unlike
  the MSRA R-50.pkl that folds them into FrozenBN) with its layout, pixel statistics and RGB input.
"""
from detectron2.model_zoo import get_config

from d2norm.solver import get_optimizer_params

dataloader = get_config("common/data/coco.py").dataloader
optimizer = get_config("common/optim.py").SGD
optimizer.params._target_ = get_optimizer_params
train = get_config("common/train.py").train
train.d2norm = {}


def single_scale_train(dataloader, short_edge=800, max_size=1333):
    """Training images resized to one shorter side (He et al. 2017; the papers' maskrcnn-benchmark default) instead
    of detectron2's common multi-scale 640-800."""
    import detectron2.data.transforms as T
    from detectron2.config import LazyCall as L

    dataloader.train.mapper.augmentations = [
        L(T.ResizeShortestEdge)(short_edge_length=(short_edge,), max_size=max_size, sample_style="choice"),
        L(T.RandomFlip)(horizontal=True),
    ]


def faster_rcnn(model, dataloader):
    model.roi_heads.mask_in_features = None
    model.roi_heads.mask_pooler = None
    model.roi_heads.mask_head = None
    dataloader.train.mapper.use_instance_mask = False


def torchvision_r50(model, dataloader, train):
    model.backbone.bottom_up.freeze_at = 0
    model.backbone.bottom_up.stages.stride_in_1x1 = False
    model.pixel_mean = [123.675, 116.280, 103.530]
    model.pixel_std = [58.395, 57.120, 57.375]
    model.input_format = dataloader.train.mapper.image_format = "RGB"
    train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
