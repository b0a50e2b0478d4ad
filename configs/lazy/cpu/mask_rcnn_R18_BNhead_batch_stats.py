"""CPU twin of configs/lazy/rethinking/mask_rcnn_BNhead_batch_stats.py (rethinking Table 3, batch-statistics heads):
R18 from scratch on the synthetic set (see common.py)."""
from .common import shrink
from ..rethinking.mask_rcnn_BNhead_batch_stats import dataloader, lr_multiplier, model, optimizer, train

shrink(model, dataloader, optimizer, lr_multiplier, train,
       output_dir="output/lazy/cpu/mask_rcnn_R18_BNhead_batch_stats")
