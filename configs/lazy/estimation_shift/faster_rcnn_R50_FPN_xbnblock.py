"""estimation-shift §5.1-5.3, Table 5: Faster R-CNN R50-FPN (2fc head) whose ResNet has XBNBlocks (P2: the norm
after conv2 is GroupNorm in every block, D1), 1x, single-scale 800 px training. GroupNorm uses 32 groups as the
official detection code (huangleiBuaa/XBNBlock, maskrcnn-benchmark's group_norm = MODEL.GROUP_NORM.NUM_GROUPS 32,
also the stem's StemWithGN); the paper's g = 64 is its ImageNet ablation (§5.2.1).

Weights: detectron2's BN ImageNet R-50 (MSRA) as a stand-in that runs: the GN slots start from the BN γ/β and their
BN statistics are dropped (logged). The paper fine-tunes its own ImageNet XBNBlock_GN R-50 (Table 2), which is not
public: set train.init_checkpoint to a converted copy of it to reproduce the row."""
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from d2norm.modeling.backbone.xbn_resnet import xbn_resnet

from ..common import dataloader, faster_rcnn, optimizer, single_scale_train, train

model = get_config("common/models/mask_rcnn_fpn.py").model
faster_rcnn(model, dataloader)
_resnet = model.backbone.bottom_up
_resnet.freeze_at = 0  # xbn_resnet freezes after the swap
model.backbone.in_features = _resnet.out_features
model.backbone.bottom_up = L(xbn_resnet)(resnet=_resnet, position=2, density=1, norm_type="GN", num_groups=32,
                                         freeze_at=2)

single_scale_train(dataloader)
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.max_iter = 90000
train.output_dir = "output/lazy/estimation_shift/faster_rcnn_R50_FPN_xbnblock"
