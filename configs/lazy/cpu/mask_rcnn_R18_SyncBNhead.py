"""CPU twin of configs/lazy/rethinking/mask_rcnn_SyncBNhead.py (rethinking Table 6 row 6, SyncBN heads; --num-gpus 2 to
synchronize): R18 from scratch on the synthetic set (see common.py)."""
from .common import shrink
from ..rethinking.mask_rcnn_SyncBNhead import dataloader, lr_multiplier, model, optimizer, train

shrink(model, dataloader, optimizer, lr_multiplier, train,
       output_dir="output/lazy/cpu/mask_rcnn_R18_SyncBNhead")
