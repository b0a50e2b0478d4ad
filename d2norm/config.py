"""Every configuration key d2norm adds, with its default and the paper section it comes from.

Use::

    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(...)

Layer options are read from ``cfg.D2NORM.<FAMILY>`` when a model is built (see
:func:`d2norm.layers.registry.norm_options`), never from module-level state, so two models built from two
configs in one process do not share options (DESIGN principle 1).
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_d2norm_config"]


def add_d2norm_config(cfg: CN) -> CN:
    """Add the ``D2NORM`` node (and friends) to ``cfg`` in place; returns ``cfg`` for chaining.

    Idempotent: calling it twice keeps values already set.
    """
    if "D2NORM" in cfg:
        return cfg
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    _C = cfg
    _C.D2NORM = CN()

    # ---- shared by every BN-derived layer (same meaning as torch's BatchNorm2d arguments) ----------------
    _C.D2NORM.BN = CN()
    # EMA momentum in torch's convention (running = (1 - m) * running + m * batch); detectron2's BN uses 0.1.
    _C.D2NORM.BN.MOMENTUM = 0.1
    _C.D2NORM.BN.EPS = 1e-5

    # ---- GhostBN: rethinking A.5; four-things §3.2, eq 4 ------------------------------------------------
    _C.D2NORM.GHOST_BN = CN()
    # Number of examples (dim 0: images in a backbone, RoIs in a box head) per normalization sub-batch.
    _C.D2NORM.GHOST_BN.SIZE = 16
    # What to do when the batch is not a multiple of SIZE:
    #   "balanced": ceil(N / SIZE) contiguous sub-batches whose sizes differ by at most one (no example dropped)
    #   "error":    raise a ValueError naming N and SIZE
    _C.D2NORM.GHOST_BN.REMAINDER = "balanced"

    # ---- batch statistics in inference: rethinking §4.2, Table 3 ---------------------------------------
    _C.D2NORM.BATCH_STATS_BN = CN()

    # ---- inference example weighing: four-things §3.1, eq 3 -------------------------------------------
    _C.D2NORM.EXAMPLE_WEIGHING = CN()
    # alpha in [0, 1]: weight of the example's own statistics at inference (0 = plain BN, 1 = instance stats).
    _C.D2NORM.EXAMPLE_WEIGHING.ALPHA = 0.1

    # ---- EvalNorm: evalnorm §3.3-3.4, eqs 5-9 ---------------------------------------------------------
    _C.D2NORM.EVALNORM = CN()
    # "online" (alpha/beta learned during training by the stop-gradient aux loss, eq 9),
    # "rule" (alpha = beta = 1/B^2, §4.1 rule of thumb), "offline" (fitted after training, §3.4).
    _C.D2NORM.EVALNORM.MODE = "online"
    # B for the "rule" mode; 0 = the normalization batch size the layer recorded in training.
    _C.D2NORM.EVALNORM.RULE_BATCH_SIZE = 0
    # Weight of the auxiliary loss term `loss_evalnorm` added by EvalNorm-aware models (heads/backbones issue).
    _C.D2NORM.EVALNORM.AUX_LOSS_WEIGHT = 1.0

    # ---- Batch-Group Norm: four-things §3.4 -----------------------------------------------------------
    _C.D2NORM.BGN = CN()
    _C.D2NORM.BGN.NUM_CHANNEL_GROUPS = 32
    # Examples per example-group (1 = GroupNorm).
    _C.D2NORM.BGN.EXAMPLE_GROUP_SIZE = 2
    # Inference example weight alpha (four-things §3.4 combines BGN with §3.1).
    _C.D2NORM.BGN.ALPHA = 0.5

    # ---- MABN: mabn §4, eqs 12-20; Appendix B -----------------------------------------------------------
    _C.D2NORM.MABN = CN()
    _C.D2NORM.MABN.BUFFER_SIZE = 16  # m, mabn Table 3/4 (16; 32 in Tables 5-6)
    _C.D2NORM.MABN.MOMENTUM = 0.98  # EMA momentum of chi-hat (mabn Table 3)
    _C.D2NORM.MABN.CLIP = 2.0  # lambda in r = clip(chi_bar / chi_hat, 1/lambda, lambda)
    _C.D2NORM.MABN.WARMUP_ITERS = 100  # batch statistics and r = 1 for this many training steps

    # ---- per-domain statistics: rethinking §5.2, Table 5 -----------------------------------------------
    _C.D2NORM.DOMAIN_BN = CN()
    _C.D2NORM.DOMAIN_BN.NUM_DOMAINS = 5  # e.g. FPN levels P3-P7 of a RetinaNet head
    _C.D2NORM.DOMAIN_BN.AFFINE_PER_DOMAIN = False
    # "per_domain": SGD training statistics of each domain separately; "shared": over all domains concatenated.
    _C.D2NORM.DOMAIN_BN.TRAIN_STATS = "per_domain"

    # ---- sync BN for any device: rethinking A.6, A.10 -------------------------------------------------
    _C.D2NORM.SYNC_BN = CN()

    # ---- data --------------------------------------------------------------------------------------
    _C.D2NORM.DATA = CN()
    # Root of the bundled synthetic COCO-format set (generated on first use; see d2norm/data/synthetic.py).
    _C.D2NORM.DATA.SYNTHETIC_ROOT = "datasets/d2norm_synthetic"

    if was_frozen:
        cfg.freeze()
    return cfg
