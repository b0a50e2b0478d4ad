"""CPU twins of the LazyConfigs in configs/lazy/: the same model with an R18 backbone from scratch (64-channel FPN,
small heads), the bundled synthetic COCO-format set at 128 px, batch 4, gradient clipping, seed 0 (the yacs
configs/cpu/Base-CPU.yaml settings). ``shrink(model, dataloader, optimizer, lr_multiplier, train, output_dir)`` turns
the nodes of a COCO-scale config into its twin, in place."""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

IMAGE_SIZE = 128
CHANNELS = 64


def _bottom_up(backbone):
    """The detectron2 ResNet node under an FPN node (possibly wrapped, e.g. by xbn_resnet / prepare_mabn_part)."""
    node = backbone.module if "module" in backbone else backbone
    node = node.bottom_up
    return node.resnet if "resnet" in node else node


def _fpn(model):
    return model.backbone.module if "module" in model.backbone else model.backbone


def shrink(model, dataloader, optimizer, lr_multiplier, train, output_dir: str, max_iter: int = 300):
    resnet = _bottom_up(model.backbone)
    resnet.stages.depth = 18
    resnet.stages.pop("stride_in_1x1", None)  # BasicBlock has no 1x1 conv
    resnet.freeze_at = 0
    bottom_up = model.backbone.module.bottom_up if "module" in model.backbone else model.backbone.bottom_up
    if "freeze_at" in bottom_up and "resnet" in bottom_up:
        bottom_up.freeze_at = 0
    fpn = _fpn(model)
    fpn.out_channels = CHANNELS
    model.pixel_mean = [127.5, 127.5, 127.5]
    model.pixel_std = [50.0, 50.0, 50.0]
    if "roi_heads" in model:  # R-CNN
        model.proposal_generator.head.in_channels = CHANNELS
        model.proposal_generator.anchor_generator.sizes = [[8], [16], [32], [64], [128]]
        model.proposal_generator.pre_nms_topk = (1000, 500)
        model.proposal_generator.post_nms_topk = (500, 250)
        model.proposal_generator.batch_size_per_image = 128
        heads = model.roi_heads
        heads.num_classes = 3
        heads.batch_size_per_image = 128
        heads.box_head.input_shape = ShapeSpec(channels=CHANNELS, height=7, width=7)
        heads.box_head.conv_dims = [CHANNELS] * len(heads.box_head.conv_dims)
        heads.box_head.fc_dims = [256] * len(heads.box_head.fc_dims)
        heads.box_predictor.input_shape = ShapeSpec(channels=256)
        if heads.get("mask_head") is not None:
            heads.mask_head.input_shape = ShapeSpec(channels=CHANNELS, width=14, height=14)
            heads.mask_head.conv_dims = [CHANNELS] * len(heads.mask_head.conv_dims)
    else:  # RetinaNet
        fpn.top_block.in_channels = 512  # R18 res5
        model.head.input_shape = [ShapeSpec(channels=CHANNELS)] * 5
        model.head.conv_dims = [CHANNELS] * len(model.head.conv_dims)
        model.num_classes = 3
        model.anchor_generator.sizes = [[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [8, 16, 32, 64, 128]]

    data = dataloader
    data.train.dataset.names = "d2norm_synthetic_train"
    data.test.dataset.names = "d2norm_synthetic_val"
    data.train.mapper.augmentations = [
        L(T.ResizeShortestEdge)(short_edge_length=(IMAGE_SIZE,), sample_style="choice", max_size=IMAGE_SIZE),
        L(T.RandomFlip)(horizontal=True),
    ]
    data.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=IMAGE_SIZE, max_size=IMAGE_SIZE)]
    data.train.total_batch_size = 4
    data.train.num_workers = data.test.num_workers = 1

    optimizer.lr = 0.02
    lr_multiplier.scheduler.milestones = [int(0.75 * max_iter), int(0.92 * max_iter), max_iter]
    lr_multiplier.warmup_length = min(100, max_iter) / max_iter
    train.device = "cpu"
    train.init_checkpoint = ""
    train.max_iter = max_iter
    train.eval_period = 0
    train.checkpointer.period = 100000
    train.seed = 0
    # From-scratch training at batch 4 diverged at lr 0.02 without clipping (configs/cpu/Base-CPU.yaml).
    train.clip_gradients = dict(ENABLED=True, CLIP_TYPE="norm", CLIP_VALUE=5.0)
    train.d2norm.DATA = dict(SYNTHETIC_IMAGE_SIZE=IMAGE_SIZE, SYNTHETIC_NUM_TRAIN=400, SYNTHETIC_NUM_VAL=100)
    train.output_dir = output_dir
