"""four-things §3.1 (eq 3, inference example weighing): Faster R-CNN R50-FPN whose backbone BN layers train as BN
and at inference mix each example's own statistics with the population statistics (α = 0.1; tune α without
retraining with tools/tune_example_weight.py)."""
from detectron2.model_zoo import get_config

from d2norm.layers import norm_layer

from ..common import dataloader, faster_rcnn, optimizer, torchvision_r50, train

model = get_config("common/models/mask_rcnn_fpn.py").model
faster_rcnn(model, dataloader)
torchvision_r50(model, dataloader, train)
model.backbone.bottom_up.stem.norm = model.backbone.bottom_up.stages.norm = norm_layer("ExampleWeightedBN", alpha=0.1)

lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x
train.max_iter = 90000
train.output_dir = "output/lazy/four_things/faster_rcnn_R50_FPN_example_weighing"
