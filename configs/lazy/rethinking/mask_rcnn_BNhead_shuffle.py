"""rethinking §6.1, Fig. 9, Table 6 rows 4-5 ("per-GPU BN w/ shuffle"): the BN heads of mask_rcnn_BNhead.py run on
an equal random share of all workers' RoIs (d2norm's shuffled heads; upstream wraps the stock heads with
batch_shuffle)."""
from d2norm.modeling.roi_heads.shuffle_heads import ShuffledConvFCHead, ShuffledMaskRCNNConvUpsampleHead

from .mask_rcnn_BNhead import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.box_head._target_ = ShuffledConvFCHead
model.roi_heads.mask_head._target_ = ShuffledMaskRCNNConvUpsampleHead
train.output_dir = "output/lazy/rethinking/mask_rcnn_BNhead_shuffle"
