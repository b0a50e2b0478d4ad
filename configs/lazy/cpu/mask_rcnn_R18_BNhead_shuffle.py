"""CPU twin of configs/lazy/rethinking/mask_rcnn_BNhead_shuffle.py (rethinking Table 6 rows 4-5, shuffled heads;
--num-gpus 2 for the shuffle to take effect): R18 from scratch on the synthetic set (see common.py)."""
from .common import shrink
from ..rethinking.mask_rcnn_BNhead_shuffle import dataloader, lr_multiplier, model, optimizer, train

shrink(model, dataloader, optimizer, lr_multiplier, train,
       output_dir="output/lazy/cpu/mask_rcnn_R18_BNhead_shuffle")
