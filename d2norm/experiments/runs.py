"""Training runs shared by several experiments (one training, several inference-time conditions on the same
checkpoint: paired differences remove the training-seed noise).

All are Faster R-CNN R18-FPN (the main-job detector) on the bundled synthetic set, trained from scratch for the
calibrated 400 iterations, with the learning rate scaled linearly with the batch (0.02 at batch 4; detectron2's
rule), unless said otherwise.
"""
from .runner import Run

__all__ = [
    "FRCNN_BN_CONFIG",
    "HEAD_BN_CONFIG",
    "XBN_CONFIG",
    "RETINANET_CONFIG",
    "bn_backbone_run",
    "backbone_norm_run",
    "head_bn_run",
    "xbn_run",
    "retinanet_run",
    "lr_for",
]

#: Faster R-CNN R18-FPN, plain BN backbone from scratch, 400 iterations (the calibrated schedule)
FRCNN_BN_CONFIG = "configs/cpu/faster_rcnn_R18_FPN_bn_scratch.yaml"
#: the same detector with a 4conv1fc BN box head on a FrozenBN backbone (rethinking §4.2 / §6.1 setting)
HEAD_BN_CONFIG = "configs/cpu/faster_rcnn_R18_FPN_headbn_frozenbn.yaml"
#: slim ResNet-50 (bottlenecks: P1/P2/P3 exist) Faster R-CNN FPN for the XBNBlock comparison
XBN_CONFIG = "configs/cpu/faster_rcnn_R50slim_FPN_table6_xbnblock.yaml"
#: DomainBNRetinaNet R18-FPN recipe that learns on the synthetic set in a CPU budget
RETINANET_CONFIG = "configs/cpu/retinanet_R18_table5_cpu.yaml"


def lr_for(batch: int, base: float = 0.005) -> str:
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return f"{base * batch:g}"


def bn_backbone_run(batch: int, checkpoint_period: int = 100) -> Run:
    """The BN-backbone reference at ``batch`` images per iteration, checkpoints every ``checkpoint_period``
    iterations (for evaluations along training and the FrozenBN switch from iteration 300)."""
    return Run(f"frcnn_bn_b{batch}", FRCNN_BN_CONFIG,
               ("SOLVER.IMS_PER_BATCH", str(batch), "SOLVER.BASE_LR", lr_for(batch),
                "SOLVER.CHECKPOINT_PERIOD", str(checkpoint_period)))


def backbone_norm_run(tag: str, batch: int, *opts: str) -> Run:
    """The reference detector with other backbone settings (``opts``: e.g. ``MODEL.RESNETS.NORM GN``)."""
    return Run(f"frcnn_{tag}_b{batch}", FRCNN_BN_CONFIG,
               ("SOLVER.IMS_PER_BATCH", str(batch), "SOLVER.BASE_LR", lr_for(batch)) + tuple(opts))


def head_bn_run(tag: str, batch: int, backbone_weights: str, num_gpus: int = 1, *opts: str) -> Run:
    """BN-head detector fine-tuned from ``backbone_weights`` (a BN-backbone checkpoint, loaded into FrozenBN)."""
    return Run(f"frcnn_head{tag}_b{batch}_g{num_gpus}", HEAD_BN_CONFIG,
               ("SOLVER.IMS_PER_BATCH", str(batch), "SOLVER.BASE_LR", lr_for(batch),
                "MODEL.WEIGHTS", backbone_weights) + tuple(opts), num_gpus=num_gpus)


def xbn_run(tag: str, batch: int, *opts: str) -> Run:
    return Run(f"frcnn_r50slim_{tag}_b{batch}", XBN_CONFIG,
               ("SOLVER.IMS_PER_BATCH", str(batch), "SOLVER.BASE_LR", lr_for(batch),
                "SOLVER.MAX_ITER", "400", "SOLVER.STEPS", "(300, 370)") + tuple(opts))


def retinanet_run(tag: str, *opts: str) -> Run:
    return Run(f"retinanet_{tag}", RETINANET_CONFIG, tuple(opts))
