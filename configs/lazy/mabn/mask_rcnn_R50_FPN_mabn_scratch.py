"""mabn §5.2, Table 3 row "MABN": Mask R-CNN R50-FPN from scratch, 2x, 8 GPUs x 2 images, single-scale 800 px
training (B.3: "other basic settings follow He et al. (2017)"); every backbone norm (ResNet and FPN, as the official
R-50-FPN-MABN body) is MABN (momentum 0.98, buffer m = 16) after a weight-centralized conv (eq 18,
prepare_mabn_part); heads without norm (Table 5's MABN heads: roi_heads.box_head._target_ = MABNConvFCHead with
conv_norm=norm_layer("MABN"))."""
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from d2norm.layers import norm_layer
from d2norm.modeling.backbone.mabn_resnet import prepare_mabn_part

from ..common import dataloader, optimizer, single_scale_train, train

model = get_config("common/models/mask_rcnn_fpn.py").model
_mabn = norm_layer("MABN", buffer_size=16, momentum=0.98, warmup_iters=100)
model.backbone.bottom_up.freeze_at = 0
model.backbone.bottom_up.stem.norm = model.backbone.bottom_up.stages.norm = _mabn
model.backbone.bottom_up.stages.stride_in_1x1 = False
model.backbone.norm = _mabn  # the FPN's lateral and output convs
model.backbone = L(prepare_mabn_part)(module=model.backbone, warmup_iters=100, where="MABN ResNet-FPN")
model.pixel_std = [57.375, 57.120, 58.395]

single_scale_train(dataloader)
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_2x
dataloader.train.dataset.names = ("coco_2014_train", "coco_2014_valminusminival")
dataloader.test.dataset.names = "coco_2014_minival"
train.init_checkpoint = ""
train.max_iter = 180000
train.output_dir = "output/lazy/mabn/mask_rcnn_R50_FPN_mabn_scratch"
