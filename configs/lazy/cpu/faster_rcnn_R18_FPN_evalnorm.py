"""CPU twin of configs/lazy/evalnorm/faster_rcnn_R50_FPN_evalnorm.py (evalnorm online EvalNorm): R18 from scratch on
the synthetic set (see common.py)."""
from .common import shrink
from ..evalnorm.faster_rcnn_R50_FPN_evalnorm import dataloader, lr_multiplier, model, optimizer, train

shrink(model, dataloader, optimizer, lr_multiplier, train,
       output_dir="output/lazy/cpu/faster_rcnn_R18_FPN_evalnorm")
