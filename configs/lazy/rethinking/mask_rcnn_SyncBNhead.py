"""rethinking §6.1, Table 6 row 6 (SyncBN heads): the heads of mask_rcnn_BNhead.py with statistics across all
workers, weighted by each worker's RoI count (AnySyncBN: any device, uneven and empty ranks; upstream: "SyncBN")."""
from d2norm.layers import norm_layer

from .mask_rcnn_BNhead import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = norm_layer("AnySyncBN", sync_group_size=0)
train.output_dir = "output/lazy/rethinking/mask_rcnn_SyncBNhead"
