"""rethinking §4.2, Table 3 rows 2/4 (= Table 6 row 3): the BN heads of mask_rcnn_BNhead.py normalized with the
mini-batch statistics at inference too (BatchStatsBN; training is exactly BN, so a mask_rcnn_BNhead.py checkpoint
can be evaluated with this config: --eval-only train.init_checkpoint=<pth>)."""
from d2norm.layers import norm_layer

from .mask_rcnn_BNhead import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = norm_layer("BatchStatsBN")
train.output_dir = "output/lazy/rethinking/mask_rcnn_BNhead_batch_stats"
