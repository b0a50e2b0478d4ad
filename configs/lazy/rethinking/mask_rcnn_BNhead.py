"""rethinking §6.1, Table 6 row 2 ("per-GPU BN" heads; = upstream projects/Rethinking-BatchNorm mask_rcnn_BNhead.py):
Mask R-CNN R50-FPN, 4conv1fc box head and mask head with BN, FrozenBN backbone, 3x, 16 images."""
from detectron2.model_zoo import get_config

from ..common import dataloader, optimizer, train

model = get_config("common/models/mask_rcnn_fpn.py").model
model.backbone.bottom_up.freeze_at = 2
model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = "BN"
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]  # 4conv1fc head
model.roi_heads.box_head.fc_dims = [1024]

lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_3x
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.max_iter = 270000  # 3x for batch size 16
train.output_dir = "output/lazy/rethinking/mask_rcnn_BNhead"
