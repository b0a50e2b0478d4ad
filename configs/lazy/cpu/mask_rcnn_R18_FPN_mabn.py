"""CPU twin of configs/lazy/mabn/mask_rcnn_R50_FPN_mabn_scratch.py (mabn Table 3): R18 from scratch on the synthetic
set (see common.py)."""
from .common import shrink
from ..mabn.mask_rcnn_R50_FPN_mabn_scratch import dataloader, lr_multiplier, model, optimizer, train

shrink(model, dataloader, optimizer, lr_multiplier, train,
       output_dir="output/lazy/cpu/mask_rcnn_R18_FPN_mabn")
