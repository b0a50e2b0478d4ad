"""evalnorm §3.3-3.4 (eqs 5-9, online estimation), Table 2 (d) setting on an FPN model: Faster R-CNN R50-FPN with
EvalNorm in every backbone norm, ImageNet weights and BN statistics fine-tuned (torchvision R-50, which stores
BN statistics), `loss_evalnorm` (eq 9, only α̂/β̂ learn from it) from EvalNormGeneralizedRCNN."""
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from d2norm.layers import norm_layer
from d2norm.modeling.meta_arch.evalnorm_arch import EvalNormGeneralizedRCNN, EvalNormModelOptions

from ..common import dataloader, faster_rcnn, optimizer, torchvision_r50, train

model = get_config("common/models/mask_rcnn_fpn.py").model
model._target_ = EvalNormGeneralizedRCNN
model.evalnorm_options = L(EvalNormModelOptions)(aux_loss_weight=1.0, stats_init="loaded", affine_init="loaded")
faster_rcnn(model, dataloader)
torchvision_r50(model, dataloader, train)
model.backbone.bottom_up.stem.norm = model.backbone.bottom_up.stages.norm = norm_layer("EvalNorm", mode="online")

lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x
train.max_iter = 90000
train.output_dir = "output/lazy/evalnorm/faster_rcnn_R50_FPN_evalnorm"
