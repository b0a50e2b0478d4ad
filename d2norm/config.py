"""Every configuration key d2norm adds, with its default and the paper section it comes from.

Use::

    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(...)

Layer options are read from ``cfg.D2NORM.<FAMILY>`` when a model is built (see
:func:`d2norm.layers.registry.norm_options`), never from module-level state, so two models built from two
configs in one process do not share options.
"""
import os

from detectron2.config import CfgNode as CN

__all__ = ["add_d2norm_config", "config_path", "resolve_config_file"]

#: the repository's ``configs/`` folder (next to the package in the editable install ``make install`` makes)
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def resolve_config_file(path: str) -> str:
    """``path`` if it exists; else, for a relative ``configs/...`` path (as in the README and the tools' help),
    d2norm's own config of that name, so the documented commands work from any directory; else ``path``."""
    if not path or os.path.isfile(path) or os.path.isabs(path):
        return path
    parts = os.path.normpath(path).split(os.sep)
    if parts[0] == "configs" and len(parts) > 1:
        own = os.path.join(CONFIGS_DIR, *parts[1:])
        if os.path.isfile(own):
            return own
    return path


def config_path(name: str) -> str:
    """Absolute path of ``configs/<name>`` (e.g. ``"cpu/retinanet_R18_ghostbn.yaml"``), whatever the working
    directory, as detectron2's ``model_zoo.get_config_file`` does for its own configs; FileNotFoundError naming
    the folder searched."""
    path = os.path.join(CONFIGS_DIR, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config {name!r} under {CONFIGS_DIR} (d2norm's configs folder)")
    return path


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
    # Layer "BatchStatsBN": trains as BN (EMA kept), eval normalizes with the input's own mini-batch statistics.
    # No keys of its own: EPS / MOMENTUM come from D2NORM.BN.
    _C.D2NORM.BATCH_STATS_BN = CN()

    # ---- Batch Renormalization (Ioffe 2017): the "BRN" baseline of mabn Tables 3, 5 --------------------
    # Layer "BRN" (d2norm/layers/batch_renorm.py). r = clip(σ_B/σ, 1/R_MAX, R_MAX), d = clip((μ_B-μ)/σ, ±D_MAX);
    # (R_MAX, D_MAX) relaxed linearly from (1, 0) at WARMUP_ITERS to their values at R_MAX_ITERS / D_MAX_ITERS
    # (Ioffe §4: 5k, 40k, 25k steps of the layer). MOMENTUM in torch's convention (new value's weight): mabn's
    # "momentum 0.98" of BRN = 0.02. EPS comes from D2NORM.BN.
    _C.D2NORM.BRN = CN()
    _C.D2NORM.BRN.R_MAX = 3.0
    _C.D2NORM.BRN.D_MAX = 5.0
    _C.D2NORM.BRN.WARMUP_ITERS = 5000
    _C.D2NORM.BRN.R_MAX_ITERS = 40000
    _C.D2NORM.BRN.D_MAX_ITERS = 25000
    _C.D2NORM.BRN.MOMENTUM = 0.02

    # ---- inference example weighing: four-things §3.1, eq 3 -------------------------------------------
    _C.D2NORM.EXAMPLE_WEIGHING = CN()
    # Layer "ExampleWeightedBN" (training = BN). alpha in [0, 1] of eq 3: weight of the example's own statistics
    # at inference (0 = plain BN inference, 1 = instance statistics). A hyper-parameter tuned on validation
    # data (§3.1, Fig. 1); it only changes inference, so it can be swept on a trained model.
    _C.D2NORM.EXAMPLE_WEIGHING.ALPHA = 0.1

    # ---- EvalNorm: evalnorm §3.3-3.4, eqs 5-9 ---------------------------------------------------------
    _C.D2NORM.EVALNORM = CN()
    # "online" (alpha/beta learned during training by the stop-gradient aux loss, eq 9),
    # "rule" (alpha = beta = 1/B^2, §4.1 rule of thumb), "offline" (fitted after training, §3.4).
    _C.D2NORM.EVALNORM.MODE = "online"
    # B for the "rule" mode; 0 = the normalization batch size the layer recorded in training (buffer
    # `seen_batch_size`: mean number of examples N over the layer's non-empty training forwards).
    _C.D2NORM.EVALNORM.RULE_BATCH_SIZE = 0
    # Weight of the auxiliary loss term `loss_evalnorm` added by the EvalNorm-aware meta-architectures.
    # The layers never apply it themselves (`evalnorm_aux_loss(model)` returns the unweighted sum).
    _C.D2NORM.EVALNORM.AUX_LOSS_WEIGHT = 1.0
    # Initial alpha-hat / beta-hat (eqs 5-6), strictly inside (0, 1): they are stored as logits (alpha =
    # sigmoid(logit)), §3.4 gives no initial value. Also the value kept when a plain BN/FrozenBN checkpoint
    # (which has no alpha/beta) is loaded.
    _C.D2NORM.EVALNORM.INIT_ALPHA = 0.1
    _C.D2NORM.EVALNORM.INIT_BETA = 0.1
    # Offline estimation (§3.4, "Offline estimation"; fit_evalnorm_offline): iterations and Adam learning rate
    # (on the logits) for the hooks/tools that fit alpha/beta on a frozen model.
    _C.D2NORM.EVALNORM.OFFLINE_ITERS = 200
    _C.D2NORM.EVALNORM.OFFLINE_LR = 0.05

    # ---- Batch-Group Norm: four-things §3.4 -----------------------------------------------------------
    _C.D2NORM.BGN = CN()
    # Channel groups, as GroupNorm's num_groups (§3.4 keeps GN's hyper-parameter); must divide every C it is
    # used with, else ValueError naming C.
    _C.D2NORM.BGN.NUM_CHANNEL_GROUPS = 32
    # Examples per example group in training (§3.4 targets B=2); 1 = GroupNorm exactly. A batch not divisible
    # by it is split into ceil(N / size) contiguous groups of near-equal size (GhostBN's "balanced" rule).
    _C.D2NORM.BGN.EXAMPLE_GROUP_SIZE = 2
    # Inference example weight alpha in [0, 1] (§3.4 combines BGN with §3.1, eq 3): 1 = the example's own
    # GroupNorm statistics, 0 = moving statistics only. §3.1: tune on a validation set.
    _C.D2NORM.BGN.ALPHA = 0.5
    # GroupNorm's eps.
    _C.D2NORM.BGN.EPS = 1e-5
    # EMA momentum (torch convention) of the per-channel-group moving E[x] and E[x^2] (m_x, m_{x^2} of eq 3).
    _C.D2NORM.BGN.MOMENTUM = 0.1

    # ---- MABN: mabn §4, eqs 12-20; Appendix B -----------------------------------------------------------
    _C.D2NORM.MABN = CN()
    # m (integer >= 1): number of recent batches in the simple moving averages chi_bar^2 and Psi_bar
    # (mabn eqs 13, 19-20); 16 in mabn Tables 2-4 and 8, 32 in Tables 5-6.
    _C.D2NORM.MABN.BUFFER_SIZE = 16
    # alpha in [0, 1), the paper's convention (weight of the OLD value, opposite to torch's BN momentum):
    # chi_hat_t = alpha * chi_hat_{t-1} + (1 - alpha) * chi_B_t (mabn §4.2 below eq 20); 0.98 in Appendix B.2-B.4.
    _C.D2NORM.MABN.MOMENTUM = 0.98
    # lambda >= 1 in r = clip(chi_bar_t / chi_hat_t, 1/lambda, lambda) (mabn eq 19; BRN-style clipping, §4.2).
    # The paper gives no value; 5 is what the authors' released code (linked from the abstract) uses.
    _C.D2NORM.MABN.CLIP = 5.0
    # Training steps (counted by the layer's num_batches_tracked buffer) that use the batch statistics
    # chi_B, Psi_B and r = 1 (mabn Appendix B.3: "batch statistics ... during first 10,000 iterations");
    # the moving-average buffers are filled during warm-up. Integer >= 0.
    _C.D2NORM.MABN.WARMUP_ITERS = 100
    # eps >= 0 added to E[x^2] (chi_B^2 = E[x^2] + eps); eq 15 has none, it only guards all-zero channels.
    _C.D2NORM.MABN.EPS = 1e-5
    # "paper" (eq 19 after WARMUP_ITERS steps) or "released": the schedule of the authors' released code
    # (batch statistics while step <= BUFFER_SIZE or < WARMUP_ITERS, r = 1 until step max(1000, WARMUP_ITERS),
    # lambda hard-coded to 5 there = CLIP's default), for comparing against the official numbers.
    _C.D2NORM.MABN.SCHEDULE = "paper"

    # ---- per-domain statistics: rethinking §5.2, Table 5 -----------------------------------------------
    # Layer "DomainBN" (d2norm/layers/domain_bn.py). Table 5 rows as (TRAIN_STATS, POP_STATS, AFFINE_PER_DOMAIN):
    #   1 (shared, shared, False)  2 (shared, per_domain, False)  3 (per_domain, shared, False)
    #   4 (per_domain, per_domain, False)  5 (per_domain, shared, True)  6 (per_domain, per_domain, True)
    # Defaults = row 4 (consistent SGD / population statistics, 39.1 AP).
    _C.D2NORM.DOMAIN_BN = CN()
    _C.D2NORM.DOMAIN_BN.NUM_DOMAINS = 5  # K, e.g. FPN levels P3-P7 of a RetinaNet head
    # Table 5 "Affine Parameters": True = one (gamma, beta) per domain, False = one shared (gamma, beta).
    _C.D2NORM.DOMAIN_BN.AFFINE_PER_DOMAIN = False
    # Table 5 "SGD Training" (Fig. 7): "per_domain": each domain normalized by its own mini-batch statistics;
    # "shared": by statistics over all domains concatenated (needs DomainBatchNorm2d.forward_domains).
    _C.D2NORM.DOMAIN_BN.TRAIN_STATS = "per_domain"
    # Table 5 "Population Stats": "per_domain": one EMA set per domain, each updated from its own domain's
    # statistics; "shared": one EMA set (BatchNorm2d's buffers) updated from all domains (once per domain call
    # with per_domain TRAIN_STATS, once per forward_domains with the concatenated statistics when shared).
    _C.D2NORM.DOMAIN_BN.POP_STATS = "per_domain"

    # ---- sync BN for any device: rethinking A.6, A.10 -------------------------------------------------
    _C.D2NORM.SYNC_BN = CN()
    # "AnySyncBN" (CPU/gloo and CUDA/NCCL; exact for uneven and empty per-rank batches, A.6/A.10). Number of
    # consecutive ranks whose batches are normalized together; 0 = all ranks (normalization batch = SGD
    # batch, A.5). Must divide the world size (ValueError otherwise); 1 = plain per-rank BN. EMA momentum and
    # eps come from D2NORM.BN.
    _C.D2NORM.SYNC_BN.GROUP_SIZE = 0

    # ---- XBNBlock ResNet backbones: estimation-shift §5.1-5.3 ----------------------------------------
    _C.D2NORM.XBNBLOCK = CN()
    # Used by MODEL.BACKBONE.NAME "build_xbn_resnet_backbone" / "build_xbn_resnet_fpn_backbone" /
    # "build_xbn_retinanet_resnet_fpn_backbone" (d2norm/modeling/backbone/xbn_resnet.py); the BN part of every
    # block keeps MODEL.RESNETS.NORM.
    # Which norm of an XBNBlock's residual branch becomes batch-free (§5.2.1, Table 1): 1/2/3 = the norm after
    # conv1/conv2/conv3 (P1/P2/P3); 2 = Fig. 6b, the paper's default. BasicBlocks (R18/R34) have positions 1-2.
    _C.D2NORM.XBNBLOCK.POSITION = 2
    # Every DENSITY-th residual block is an XBNBlock (§5.2.1, Fig. 7): blocks numbered 1..N in forward order
    # across res2-res5 (R50: N = 16), block k iff k % DENSITY == 0. 1 = all (the paper's "XBNBlock"), 2/4/8 =
    # XBNBlock-D2/D4/D8.
    _C.D2NORM.XBNBLOCK.DENSITY = 1
    # The batch-free norm (§5.1): "GN" (GroupNorm with NUM_GROUPS groups) or "IN" (InstanceNorm = GroupNorm
    # with one channel per group).
    _C.D2NORM.XBNBLOCK.NORM_TYPE = "GN"
    # GN group count g (§5.2.1 uses g = 64); must divide the channels of every replaced norm (ValueError
    # listing the layers otherwise). Ignored for "IN".
    _C.D2NORM.XBNBLOCK.NUM_GROUPS = 64
    # eps of the batch-free norm (GroupNorm's default).
    _C.D2NORM.XBNBLOCK.EPS = 1e-5
    # The stem's norm: "BFN" = the batch-free norm above (NORM_TYPE, NUM_GROUPS), as the official code does (its
    # ImageNet models: GN with 64 groups on the 64-channel stem = IN; detection: a GN stem), so the authors'
    # checkpoints load completely; "RESNETS" = MODEL.RESNETS.NORM like the other BN slots.
    _C.D2NORM.XBNBLOCK.STEM_NORM = "BFN"

    # ---- MABN backbones and heads: mabn §4.2 eq 18, §5.2, Appendix B.3 ------------------------------
    # Used by MODEL.BACKBONE.NAME "build_mabn_resnet_backbone" / "build_mabn_resnet_fpn_backbone" /
    # "build_mabn_retinanet_resnet_fpn_backbone" and the heads "MABNConvFCHead" (ROI_BOX_HEAD.NAME),
    # "MABNMaskRCNNConvUpsampleHead" (ROI_MASK_HEAD.NAME) in d2norm/modeling/roi_heads/mabn_heads.py: every
    # MABN layer is preceded by a weight-centralized conv (eq 18). MABN's own options are in D2NORM.MABN.
    _C.D2NORM.MABN_MODEL = CN()
    # Warm-up iterations (batch statistics, D2NORM.MABN.WARMUP_ITERS semantics: counted per layer as training
    # forwards) of the MABN layers in the backbone (ResNet and FPN); -1 = D2NORM.MABN.WARMUP_ITERS.
    _C.D2NORM.MABN_MODEL.BACKBONE_WARMUP_ITERS = -1
    # The same for the MABN box/mask heads; Appendix B.3: "batch statistics in normalization layers on head
    # during first 10,000 iterations". -1 = D2NORM.MABN.WARMUP_ITERS.
    _C.D2NORM.MABN_MODEL.HEAD_WARMUP_ITERS = 10000

    # ---- RetinaNet head with per-level BN: rethinking §5.2, Table 5, Alg. 1, A.9 ----------------------
    # Used by MODEL.META_ARCHITECTURE "DomainBNRetinaNet" (d2norm/modeling/meta_arch/retinanet_domain.py);
    # the other head options stay in MODEL.RETINANET.* (whose NORM must be ""). Every norm of the shared head
    # (NUM_CONVS per subnet) sees the K = len(MODEL.RETINANET.IN_FEATURES) FPN levels as K domains.
    # Table 5 rows as (TRAIN_STATS, POP_STATS, AFFINE):
    #   1 (shared, shared, shared) 39.1 AP        2 (shared, per_level, shared) 2.1
    #   3 (per_level, shared, shared) 34.1        4 (per_level, per_level, shared) 39.1 (= detectron2's "BN" head)
    #   5 (per_level, shared, per_level) 35.5     6 (per_level, per_level, per_level) 39.2
    # Every Table 5 row uses SyncBN (SYNC True). Defaults = row 4. EPS / MOMENTUM come from D2NORM.BN.
    _C.D2NORM.RETINANET_HEAD = CN()
    # Table 5 "SGD Training" (Fig. 7): "per_level": each level normalized by its own mini-batch statistics;
    # "shared": every level normalized by statistics of all levels concatenated (Alg. 1 RetinaNetHead_Row1).
    _C.D2NORM.RETINANET_HEAD.TRAIN_STATS = "per_level"
    # Table 5 "Population Stats": "per_level": one EMA set (K, C) per level, used at test time for that
    # level; "shared": one set (C,) for all levels (updated once per level call with per_level TRAIN_STATS,
    # once per forward with the pooled statistics with shared TRAIN_STATS).
    _C.D2NORM.RETINANET_HEAD.POP_STATS = "per_level"
    # Table 5 "Affine Parameters": "shared": one (gamma, beta) of shape (C,); "per_level": (K, C).
    _C.D2NORM.RETINANET_HEAD.AFFINE = "shared"
    # Table 5 "SyncBN": True = batch statistics all-reduced over ranks (weighted by element count, A.6);
    # False = per-GPU BN. No effect in a single process.
    _C.D2NORM.RETINANET_HEAD.SYNC = True
    # With SYNC: number of consecutive ranks normalized together (0 = all ranks, as the paper's 16 images).
    _C.D2NORM.RETINANET_HEAD.SYNC_GROUP_SIZE = 0

    # ---- PreciseBN hook: rethinking §3.2, A.2, A.3, A.10; Tables 1-2 ------------------------------------
    # d2norm.engine.hooks.PreciseBNHook over d2norm.stats.recompute_population_stats. Replaces detectron2's
    # TEST.PRECISE_BN (enabling both is a ValueError).
    _C.D2NORM.PRECISE_BN = CN()
    _C.D2NORM.PRECISE_BN.ENABLED = False
    # Run every PERIOD iterations and always after the last one. -1 = TEST.EVAL_PERIOD (statistics are fresh
    # for every evaluation, §3.2 Fig. 3), 0 = only after the last iteration.
    _C.D2NORM.PRECISE_BN.PERIOD = -1
    # N: images over all ranks per run (§3.2 Table 1: 10^3-10^4 suffice). Each rank forwards its share.
    _C.D2NORM.PRECISE_BN.NUM_SAMPLES = 1000
    # B: images per forward on each rank = the normalization batch of the pass, independent of
    # SOLVER.IMS_PER_BATCH (§3.2 Table 2: B >= 10^2 where memory allows; no backward is run).
    _C.D2NORM.PRECISE_BN.BATCH_SIZE = 16
    # "population": eq 2 with per-batch sizes (variance of all samples); "mean_of_batch_var": eq 3 (A.2).
    _C.D2NORM.PRECISE_BN.ESTIMATOR = "population"
    # A.3: estimate layer k with layers < k already using their exact population statistics (= the whole
    # population forwarded as one batch). One pass per layer and this rank's N/W images kept in memory.
    _C.D2NORM.PRECISE_BN.EXACT_LAYERWISE = False
    # A batch whose statistics are non-finite (NaN/Inf) in some layer: "error" stops with the layer and the
    # batch named (statistics unchanged); "skip" leaves those layer calls out of the estimate, with a warning.
    _C.D2NORM.PRECISE_BN.NONFINITE = "error"

    # ---- shuffled-RoI BN heads: rethinking §6.1, Fig. 9, Table 6 ------------------------------------
    # Used by ROI_BOX_HEAD.NAME "ShuffledConvFCHead" and ROI_MASK_HEAD.NAME "ShuffledMaskRCNNConvUpsampleHead"
    # (d2norm/modeling/roi_heads/shuffle_heads.py); the head's norm is the stock NORM key (paper: per-GPU "BN").
    # In training, all workers' RoI features are gathered, permuted by one shared permutation, each worker runs
    # the head on an equal share (remainder to the first ranks) and the predictions are shuffled back.
    # Inference never shuffles. One worker: the plain stock head.
    _C.D2NORM.SHUFFLE_HEAD = CN()
    # True: shuffle in training (Table 6 "per-GPU BN w/ shuffle"); False: the stock per-GPU head (rows 1-2),
    # same parameters and checkpoint keys.
    _C.D2NORM.SHUFFLE_HEAD.ENABLED = True
    # Permutation source (drawn on rank 0 and broadcast, so ranks always agree): -1 = torch's global RNG of
    # rank 0 (seeded by detectron2's SEED); >= 0 = a dedicated generator per head (box: SEED, mask: SEED + 1).
    _C.D2NORM.SHUFFLE_HEAD.SEED = -1

    # ---- EvalNorm-aware models: evalnorm §3.4 (online estimation), §4.3 Table 2 -----------------------
    # Used by MODEL.META_ARCHITECTURE "EvalNormGeneralizedRCNN" / "EvalNormRetinaNet" / "EvalNormMetaArch"
    # (d2norm/modeling/meta_arch/evalnorm_arch.py). In training they add ONE loss term `loss_evalnorm` =
    # D2NORM.EVALNORM.AUX_LOSS_WEIGHT x (sum of every EvalNorm layer's eq-9 aux loss) when a layer is in
    # MODE "online", and write alpha-hat/beta-hat to the event storage. Table 2 rows (N images per GPU):
    #   (a) random init:  MODEL.WEIGHTS "",        STATS_INIT "fresh",  AFFINE_INIT "fresh",  FREEZE_STATS False
    #   (b) ImageNet, BN from [11]: WEIGHTS R-50,  STATS_INIT "fresh",  AFFINE_INIT "fresh",  FREEZE_STATS False
    #   (c) ImageNet, stats frozen: WEIGHTS R-50,  STATS_INIT "loaded", AFFINE_INIT "loaded", FREEZE_STATS True
    #   (d) ImageNet, fine-tuned:   WEIGHTS R-50,  STATS_INIT "loaded", AFFINE_INIT "loaded", FREEZE_STATS False
    _C.D2NORM.EVALNORM_MODEL = CN()
    # "EvalNormMetaArch" only: the registered meta-architecture made EvalNorm-aware (parameter names unchanged).
    _C.D2NORM.EVALNORM_MODEL.BASE_META_ARCHITECTURE = "GeneralizedRCNN"
    # Table 2 "BN EMA Stats / Init": "loaded" = running statistics as loaded from MODEL.WEIGHTS (rows a, c, d);
    # "fresh" = reset to BN's initial values (mean 0, var 1; "Random" in row b) at the start of training
    # (first training forward of a run that is not resumed). Applies to every BN-derived layer.
    _C.D2NORM.EVALNORM_MODEL.STATS_INIT = "loaded"
    # §4.3 row (b): "initial values of BN parameters from [11]": "fresh" also resets gamma = 1, beta = 0 at
    # that moment; "loaded" keeps them (rows c, d). Table 2's column is the statistics; the text says "BN
    # parameters" for (b), hence a separate key.
    _C.D2NORM.EVALNORM_MODEL.AFFINE_INIT = "loaded"
    # Table 2 "BN EMA Stats / Train?": True (row c) = the EMA is never updated in training (momentum 0 in every
    # BN-derived layer); the training forward still normalizes with mini-batch statistics and alpha/beta
    # still learn (EvalNorm mixes the stale EMA with each sample's statistics). False = rows a, b, d.
    _C.D2NORM.EVALNORM_MODEL.FREEZE_STATS = False
    # Write alpha-hat / beta-hat (values the layers use at eval) to the event storage every LOG_PERIOD
    # iterations: "evalnorm/{alpha,beta}_{mean,min,max}", and with LOG_PER_LAYER "evalnorm/alpha/<layer>",
    # "evalnorm/beta/<layer>" (evalnorm Fig. 3 plots them per layer). 0 = never.
    _C.D2NORM.EVALNORM_MODEL.LOG_PERIOD = 20
    _C.D2NORM.EVALNORM_MODEL.LOG_PER_LAYER = True

    # ---- FrozenBN switch: rethinking §4.3, Fig. 6 (d2norm.engine.hooks.FrozenBNSwitchHook) ------------------
    # At iteration ITER every BN-family layer becomes a constant affine map (d2norm/layers/frozen.py: BN,
    # GhostBN, AnySyncBN, EvalNorm/BatchStatsBN/ExampleWeightedBN with their EMA, MABN exactly; BGN and
    # per-domain DomainBN are left unchanged). Fig. 6: the last 20 of 100 epochs with FrozenBN.
    _C.D2NORM.FROZEN_BN_SWITCH = CN()
    _C.D2NORM.FROZEN_BN_SWITCH.ENABLED = False
    # The first iteration trained with FrozenBN (integer >= 0; >= SOLVER.MAX_ITER: no switch in this run, warned).
    _C.D2NORM.FROZEN_BN_SWITCH.ITER = 0
    # Recompute population statistics right before the switch (PreciseBN, §3.2) with D2NORM.PRECISE_BN's
    # NUM_SAMPLES / BATCH_SIZE / ESTIMATOR / EXACT_LAYERWISE; False freezes the EMA.
    _C.D2NORM.FROZEN_BN_SWITCH.PRECISE_BN = True
    # §4.3 keeps the affine gamma/beta after FrozenBN trainable (True); False freezes them as well
    # (detectron2's FrozenBatchNorm2d, the fine-tuning variant of §4.4 / footnote 4).
    _C.D2NORM.FROZEN_BN_SWITCH.TRAINABLE_AFFINE = True
    # LR re-warm-up after the switch (Fig. 6: "a linear warmup of one epoch"): WARMUP_ITERS iterations, factor
    # from WARMUP_FACTOR to 1 (detectron2's linear warm-up rule) applied on top of the LR schedule. 0 = none.
    _C.D2NORM.FROZEN_BN_SWITCH.WARMUP_ITERS = 0
    _C.D2NORM.FROZEN_BN_SWITCH.WARMUP_FACTOR = 0.001
    # Regular expressions (re.search) on module names; only matching layers are switched. [] = all.
    _C.D2NORM.FROZEN_BN_SWITCH.LAYERS = []

    # ---- EvalNorm offline fitting hook: evalnorm §3.4 "Offline estimation" (EvalNormFitHook) ------------------
    # Fits alpha-hat/beta-hat with D2NORM.EVALNORM.OFFLINE_ITERS Adam steps at OFFLINE_LR on training batches;
    # nothing else in the model changes.
    _C.D2NORM.EVALNORM_FIT = CN()
    _C.D2NORM.EVALNORM_FIT.ENABLED = False
    # -1 = after the last iteration (before the final checkpoint / evaluation); k >= 1 = after iteration k.
    _C.D2NORM.EVALNORM_FIT.ITER = -1
    # Images per rank per fitting step (N = OFFLINE_ITERS x BATCH_SIZE x ranks); 0 = the training batch per rank.
    _C.D2NORM.EVALNORM_FIT.BATCH_SIZE = 0
    # After the final fit, set every EvalNorm layer's mode to "offline" so evaluation uses the fitted values.
    _C.D2NORM.EVALNORM_FIT.SET_OFFLINE_MODE = True

    # ---- BN-statistics monitor: rethinking §3.1 Fig. 2; estimation-shift Def. 2 (BNMonitorHook) ------------
    # Writes bn_monitor/<layer>/{mean_gap, std_gap, batch_mean_gap, batch_std_gap, batch_mean_spread,
    # batch_std_spread} (d2norm/stats/monitor.py) to the event storage.
    _C.D2NORM.BN_MONITOR = CN()
    _C.D2NORM.BN_MONITOR.ENABLED = False
    # Every PERIOD iterations (>= 1).
    _C.D2NORM.BN_MONITOR.PERIOD = 100
    # Training batches forwarded per measurement (Fig. 2 uses 100; keep small, it costs NUM_BATCHES forwards).
    _C.D2NORM.BN_MONITOR.NUM_BATCHES = 4
    # Images per rank per batch; 0 = the training batch per rank (the batch the EMA is updated with, Fig. 2).
    _C.D2NORM.BN_MONITOR.BATCH_SIZE = 0
    # Regular expressions (re.search) on layer names; [] = every layer with population statistics.
    _C.D2NORM.BN_MONITOR.LAYERS = []

    # ---- data --------------------------------------------------------------------------------------
    _C.D2NORM.DATA = CN()
    # Root of the bundled synthetic COCO-format set (generated on first use; see d2norm/data/synthetic.py).
    # "" = $DETECTRON2_DATASETS/d2norm_synthetic ($DETECTRON2_DATASETS defaults to ./datasets, as detectron2's
    # builtin datasets).
    _C.D2NORM.DATA.SYNTHETIC_ROOT = ""
    _C.D2NORM.DATA.SYNTHETIC_IMAGE_SIZE = 128
    _C.D2NORM.DATA.SYNTHETIC_NUM_TRAIN = 400
    _C.D2NORM.DATA.SYNTHETIC_NUM_VAL = 100
    _C.D2NORM.DATA.SYNTHETIC_SEED = 0

    if was_frozen:
        cfg.freeze()
    return cfg
