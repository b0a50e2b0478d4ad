"""CPU twin of configs/lazy/rethinking/retinanet_SyncBNhead.py (rethinking Table 5 row 3): R18 from scratch on the
synthetic set (see common.py)."""
from .common import shrink
from ..rethinking.retinanet_SyncBNhead import dataloader, lr_multiplier, model, optimizer, train

shrink(model, dataloader, optimizer, lr_multiplier, train,
       output_dir="output/lazy/cpu/retinanet_R18_SyncBNhead")
