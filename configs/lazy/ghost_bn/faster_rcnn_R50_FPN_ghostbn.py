"""rethinking A.5, four-things §3.2 (eq 4): Faster R-CNN R50-FPN whose backbone normalizes over ghost sub-batches of
2 images (GhostBN, trainable statistics; torchvision R-50 weights), 1x, 8 GPUs x 4 images."""
from detectron2.model_zoo import get_config

from d2norm.layers import norm_layer

from ..common import dataloader, faster_rcnn, optimizer, torchvision_r50, train

model = get_config("common/models/mask_rcnn_fpn.py").model
faster_rcnn(model, dataloader)
torchvision_r50(model, dataloader, train)
dataloader.train.total_batch_size = 32
model.backbone.bottom_up.stem.norm = model.backbone.bottom_up.stages.norm = norm_layer("GhostBN", ghost_size=2)

lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x
optimizer.lr = 0.04  # linear scaling for 32 images
train.max_iter = 45000
train.output_dir = "output/lazy/ghost_bn/faster_rcnn_R50_FPN_ghostbn"
