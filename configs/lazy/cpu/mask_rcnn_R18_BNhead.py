"""CPU twin of configs/lazy/rethinking/mask_rcnn_BNhead.py (rethinking Table 6 row 2, BN heads): R18 from scratch on
the synthetic set (see common.py)."""
from .common import shrink
from ..rethinking.mask_rcnn_BNhead import dataloader, lr_multiplier, model, optimizer, train

shrink(model, dataloader, optimizer, lr_multiplier, train,
       output_dir="output/lazy/cpu/mask_rcnn_R18_BNhead")
