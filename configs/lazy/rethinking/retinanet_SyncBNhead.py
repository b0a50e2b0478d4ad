"""rethinking §5.2, Table 5 row 3 (the "standard" implementation: one SyncBN layer shared by all FPN levels, so
training statistics per level, population statistics shared): RetinaNet R50-FPN, 3x, 16 images.

Upstream's projects/Rethinking-BatchNorm/configs/retinanet_SyncBNhead.py sets ``nn.SyncBatchNorm2d``, which torch
does not have; here the head is d2norm's DomainBNRetinaNetHead with that layout (any Table 5 row: set
train_stats / pop_stats / affine)."""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config

from d2norm.modeling.meta_arch.retinanet_domain import DomainBNRetinaNetHead

from ..common import dataloader, optimizer, train

model = get_config("common/models/retinanet.py").model
model.backbone.bottom_up.freeze_at = 2
model.head = L(DomainBNRetinaNetHead)(
    input_shape=[ShapeSpec(channels=256)] * 5,
    num_classes="${..num_classes}",
    num_anchors=9,
    conv_dims=[256, 256, 256, 256],
    levels="${..head_in_features}",
    train_stats="per_level",
    pop_stats="shared",
    affine="shared",
    sync=True,
    prior_prob=0.01,
)

lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_3x
optimizer.lr = 0.01
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.max_iter = 270000  # 3x for batch size 16
train.output_dir = "output/lazy/rethinking/retinanet_SyncBNhead"
