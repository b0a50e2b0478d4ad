"""CPU twin of configs/lazy/estimation_shift/faster_rcnn_R50_FPN_xbnblock.py (estimation-shift XBNBlock P2 D1): R18
from scratch on the synthetic set (see common.py)."""
from .common import shrink
from ..estimation_shift.faster_rcnn_R50_FPN_xbnblock import dataloader, lr_multiplier, model, optimizer, train

shrink(model, dataloader, optimizer, lr_multiplier, train,
       output_dir="output/lazy/cpu/faster_rcnn_R18_FPN_xbnblock")
