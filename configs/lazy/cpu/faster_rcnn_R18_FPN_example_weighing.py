"""CPU twin of configs/lazy/four_things/faster_rcnn_R50_FPN_example_weighing.py (four-things example weighing): R18
from scratch on the synthetic set (see common.py)."""
from .common import shrink
from ..four_things.faster_rcnn_R50_FPN_example_weighing import dataloader, lr_multiplier, model, optimizer, train

shrink(model, dataloader, optimizer, lr_multiplier, train,
       output_dir="output/lazy/cpu/faster_rcnn_R18_FPN_example_weighing")
