"""Tiny detectron2 configs for CPU tests: ResNet-18 (64-channel res2) under small FPN heads, 3 classes."""
import os
from typing import Sequence

__all__ = [
    "d2norm_cfg", "tiny_r18_fpn_rcnn_cfg", "tiny_retinanet_cfg", "tiny_training_opts", "tiny_retinanet_training_cfg", "tiny_instance_batch",
]

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
LEVELS = ["res2", "res3", "res4", "res5"]


def _d2norm_cfg():
    from detectron2.config import get_cfg

    from d2norm import add_d2norm_config

    return add_d2norm_config(get_cfg())


def d2norm_cfg(node: str = "", **values):
    """A fresh detectron2 cfg with the D2NORM node, ``cfg.D2NORM.<node>.<key> = value`` for each of ``values``."""
    cfg = _d2norm_cfg()
    for k, v in values.items():
        cfg.D2NORM[node][k] = v
    return cfg


def tiny_r18_fpn_rcnn_cfg(width: int = 16, box_convs: int = 1, mask_convs: int = 0, opts: Sequence = ()):
    """Faster (``mask_convs`` > 0: Mask) R-CNN R18-FPN: FPN of ``width`` channels on res2–res5, anchors 8–128 on
    p2–p6, StandardROIHeads on p2–p5 with a conv-fc box head (``box_convs`` convs of ``width`` channels, one fc of
    32), RetinaNet settings for the same backbone (3 classes, 1 conv); ``opts`` (KEY, VALUE, ...) merged last."""
    cfg = _d2norm_cfg()
    mask = ["MODEL.MASK_ON", True, "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead",
            "MODEL.ROI_MASK_HEAD.NUM_CONV", mask_convs, "MODEL.ROI_MASK_HEAD.CONV_DIM", width] if mask_convs else []
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.RESNETS.OUT_FEATURES", LEVELS, "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
        "MODEL.BACKBONE.FREEZE_AT", 0, "MODEL.FPN.IN_FEATURES", LEVELS, "MODEL.FPN.OUT_CHANNELS", width,
        "MODEL.RPN.IN_FEATURES", ["p2", "p3", "p4", "p5", "p6"],
        "MODEL.ANCHOR_GENERATOR.SIZES", [[8], [16], [32], [64], [128]],
        "MODEL.ROI_HEADS.NAME", "StandardROIHeads", "MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p3", "p4", "p5"],
        "MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead",
        "MODEL.ROI_BOX_HEAD.NUM_CONV", box_convs, "MODEL.ROI_BOX_HEAD.NUM_FC", 1,
        "MODEL.ROI_BOX_HEAD.CONV_DIM", width, "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
        "MODEL.RETINANET.NUM_CLASSES", 3, "MODEL.RETINANET.NUM_CONVS", 1, *mask, *opts,
    ])
    return cfg


def tiny_retinanet_cfg(norm: str = "BN", opts: Sequence = ()):
    """``configs/Base-RetinaNet.yaml`` with an R18 (16-channel stem) backbone, ``norm`` in the backbone and the
    head, a 16-channel FPN and a 1-conv head for 3 classes; ``opts`` merged last."""
    cfg = _d2norm_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, "Base-RetinaNet.yaml"))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.RESNETS.NORM", norm, "MODEL.RETINANET.NORM", norm, "MODEL.RETINANET.NUM_CONVS", 1,
        "MODEL.RETINANET.NUM_CLASSES", 3, "MODEL.FPN.OUT_CHANNELS", 16, "MODEL.BACKBONE.FREEZE_AT", 0,
        "MODEL.RESNETS.STEM_OUT_CHANNELS", 16, "MODEL.RESNETS.STRIDE_IN_1X1", False, *opts,
    ])
    return cfg


def tiny_training_opts(tmp_path, max_iter: int, warmup_iters: int = 0, checkpoint_period: int = 100000) -> list:
    """Opts for a short Trainer run on 6 synthetic 64-px training images (2 per iteration, no evaluation) written
    under ``tmp_path/data``, output in ``tmp_path/out``."""
    return [
        "DATASETS.TRAIN", ("d2norm_synthetic_train",), "DATASETS.TEST", (), "INPUT.MIN_SIZE_TRAIN", (64,),
        "INPUT.MAX_SIZE_TRAIN", 64, "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", max_iter, "SOLVER.BASE_LR", 0.001,
        "SOLVER.WARMUP_ITERS", warmup_iters, "SOLVER.STEPS", (), "DATALOADER.NUM_WORKERS", 0, "TEST.EVAL_PERIOD", 0,
        "SOLVER.CHECKPOINT_PERIOD", checkpoint_period, "OUTPUT_DIR", str(tmp_path / "out"),
        "D2NORM.DATA.SYNTHETIC_ROOT", str(tmp_path / "data"), "D2NORM.DATA.SYNTHETIC_IMAGE_SIZE", 64,
        "D2NORM.DATA.SYNTHETIC_NUM_TRAIN", 6, "D2NORM.DATA.SYNTHETIC_NUM_VAL", 2,
    ]


def tiny_retinanet_training_cfg(tmp_path, max_iter: int, opts: Sequence = (), norm: str = "BN", **training):
    """:func:`tiny_retinanet_cfg` + :func:`tiny_training_opts` (``training``: its keyword arguments) + ``opts``,
    with the synthetic dataset generated: ready for ``d2norm.engine.Trainer(cfg)``."""
    from d2norm.data import prepare_datasets

    cfg = tiny_retinanet_cfg(norm, [*tiny_training_opts(tmp_path, max_iter, **training), *opts])
    prepare_datasets(cfg)
    return cfg


def tiny_instance_batch(seed: int = 0, size: int = 64):
    """Two ``size``-px training inputs for a detectron2 R-CNN (images of different brightness, two boxes of classes
    0 and 2 with their masks each), as a DatasetMapper would give them."""
    import torch
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(2):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]) * (size / 64))
        inst.gt_classes = torch.tensor([0, 2])
        masks = torch.zeros(2, size, size, dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate(inst.gt_boxes.tensor.round().long().tolist()):
            masks[k, y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(masks)
        img = torch.rand(3, size, size, generator=g) * 255 * (0.5 + i)
        out.append({"image": img, "instances": inst, "height": size, "width": size})
    return out


#: the main job's config (GhostBN backbone) at 64 px on a tiny synthetic set
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                           "cpu", "faster_rcnn_R18_FPN_ghostbn.yaml")


def trained_demo(tmp, max_iter: int = 6, num_train: int = 10, num_val: int = 3,
                 checkpoint_period: int = 100000) -> dict:
    """The main job's model trained ``max_iter`` iterations at 64 px into ``tmp/out``: ``{"args": [--config-file,
    --weights], "opts": [KEY VALUE ...] to pass to a tool, "tmp": tmp, "ghost": its GhostBN layer names}``."""
    import torch
    from detectron2.config import get_cfg

    from d2norm import add_d2norm_config
    from d2norm.data import prepare_datasets
    from d2norm.engine import Trainer

    opts = ["INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 64, "INPUT.MIN_SIZE_TEST", 64,
            "INPUT.MAX_SIZE_TEST", 64, "D2NORM.DATA.SYNTHETIC_IMAGE_SIZE", 64,
            "D2NORM.DATA.SYNTHETIC_NUM_TRAIN", num_train, "D2NORM.DATA.SYNTHETIC_NUM_VAL", num_val,
            "DATALOADER.NUM_WORKERS", 0, "SOLVER.MAX_ITER", max_iter, "SOLVER.WARMUP_ITERS", 0,
            "TEST.EVAL_PERIOD", 0, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "SOLVER.CHECKPOINT_PERIOD", checkpoint_period,
            "OUTPUT_DIR", str(tmp / "out"), "D2NORM.DATA.SYNTHETIC_ROOT", str(tmp / "data")]
    cfg = add_d2norm_config(get_cfg())
    cfg.merge_from_file(DEMO_CONFIG)
    cfg.merge_from_list(opts)
    prepare_datasets(cfg)
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    ghost = [n for n, m in trainer.model.named_modules() if type(m).__name__ == "GhostBatchNorm2d"]
    return {"tmp": tmp, "args": ["--config-file", DEMO_CONFIG, "--weights", str(tmp / "out" / "model_final.pth")],
            "opts": [v if isinstance(v, str) else str(v) for v in opts], "ghost": ghost}


def load_tool(name: str):
    """``tools/<name>.py`` as a module (its ``main(argv)`` runs the tool in this process)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(root, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
