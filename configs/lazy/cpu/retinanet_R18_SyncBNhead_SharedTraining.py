"""CPU twin of configs/lazy/rethinking/retinanet_SyncBNhead_SharedTraining.py (rethinking Table 5 row 1): R18 from
scratch on the synthetic set (see common.py)."""
from .common import shrink
from ..rethinking.retinanet_SyncBNhead_SharedTraining import dataloader, lr_multiplier, model, optimizer, train

shrink(model, dataloader, optimizer, lr_multiplier, train,
       output_dir="output/lazy/cpu/retinanet_R18_SyncBNhead_SharedTraining")
