"""CPU twin of configs/lazy/ghost_bn/faster_rcnn_R50_FPN_ghostbn.py (GhostBN backbone, 2 ghost sub-batches of 2 images:
the LazyConfig twin of the main job): R18 from scratch on the synthetic set (see common.py)."""
from .common import shrink
from ..ghost_bn.faster_rcnn_R50_FPN_ghostbn import dataloader, lr_multiplier, model, optimizer, train

shrink(model, dataloader, optimizer, lr_multiplier, train,
       output_dir="output/lazy/cpu/faster_rcnn_R18_FPN_ghostbn")
