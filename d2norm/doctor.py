"""BN doctor, static part: a config's batch-statistics pitfalls, found before any training, each with its severity,
the paper section it comes from and the cfg change that fixes it (``tools/bn_doctor.py``).

Checked (``world_size``: the processes the run will have; images per process = SOLVER.IMS_PER_BATCH / world):

* ``small_norm_batch`` — a backbone / FPN norm normalizing over ≤ 2 images per normalization group trains with
  noisy statistics and is evaluated with population statistics it never saw (rethinking §4, Fig. 5: the
  train-test inconsistency of small normalization batches; evalnorm §3.2; mabn §3.1);
* ``shared_head_bn`` — a RetinaNet head norm with batch statistics shared over the FPN levels (a registered name
  builds one layer for all levels): rethinking §5.2, Table 5 row 3, 34.1 vs 39.1 AP with per-level statistics;
* ``rcnn_head_bn`` — per-process batch statistics in the R-CNN box / mask head with ≤ 2 images per process and no
  shuffle: the RoIs of one image leak information (rethinking §6.1, Table 6 rows 1–2: 30.7 / 40.1 AP vs 41.6–41.7
  with shuffle or SyncBN);
* ``precise_bn_small`` — PreciseBN with a small forward batch B (rethinking §3.2, Table 2: B ≥ 10²) or few
  samples N (Table 1: 10³–10⁴);
* ``ema_window`` — an EMA whose window 1/momentum is a large part of the schedule without PreciseBN: its
  statistics average models of long ago (rethinking §3.1);
* ``norm_weight_decay`` — no weight decay on γ/β (detectron2's default ``WEIGHT_DECAY_NORM`` 0): four-things §3.3
  found it a useful regularizer for ResNets;
* ``setup_error`` — what the launch itself would refuse (unknown norm names, EvalNorm online in a stock
  meta-architecture, DomainBN in a stock model, P7 with one value per channel, ...), with the launch's message.

A finding of severity "error" means the run cannot work as configured (the tool exits 1).
"""
import dataclasses
import json
import os
from typing import Dict, List, Optional

__all__ = ["Finding", "diagnose_cfg", "report_markdown", "write_report", "SEVERITIES"]

SEVERITIES = ("error", "warning", "info")


@dataclasses.dataclass
class Finding:
    code: str
    severity: str
    paper: str
    message: str
    fix: str
    keys: List[str]

    def as_dict(self) -> Dict:
        return dataclasses.asdict(self)


def diagnose_cfg(cfg, world_size: int = 1) -> List[Finding]:
    """Every pitfall of the module docstring found in ``cfg`` for a run on ``world_size`` processes."""
    from .config import add_d2norm_config

    cfg = add_d2norm_config(cfg.clone())
    world = max(1, int(world_size))
    ipp = max(1, int(cfg.SOLVER.IMS_PER_BATCH) // world)
    out: List[Finding] = []
    arch = cfg.MODEL.META_ARCHITECTURE
    rcnn = "RCNN" in arch or arch == "PanopticFPN"

    # what the launch itself refuses
    from .layers.cfg_checks import check_norm_cfg
    from .modeling.meta_arch.evalnorm_arch import check_evalnorm_training_cfg

    for check in (lambda: check_norm_cfg(cfg, world), lambda: check_evalnorm_training_cfg(cfg)):
        try:
            check()
        except ValueError as e:
            out.append(Finding("setup_error", "error", "-", str(e), "the change the message names", []))

    from .layers.cfg_checks import norm_keys
    from .layers.protocol import batch_statistics_of, cfg_normalization_images
    from .layers.registry import NORM_REGISTRY

    mitigated = bool(cfg.D2NORM.FROZEN_BN_SWITCH.ENABLED)
    for key in ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM"):
        name = cfg.MODEL.RESNETS.NORM if key.endswith("RESNETS.NORM") else cfg.MODEL.FPN.NORM
        nb = cfg_normalization_images(name, cfg, world)  # None: no batch statistics, or built for small batches
        if nb is None or nb > 2 or mitigated or name in ("EvalNorm", "BatchStatsBN"):
            continue
        scratch = not cfg.MODEL.WEIGHTS
        fix = ("MABN / BRN (small-batch norms), SyncBN over the GPUs, or D2NORM.FROZEN_BN_SWITCH.ENABLED True"
               if scratch else f"{key} FrozenBN (fine-tuning from ImageNet statistics), SyncBN, or "
               f"D2NORM.FROZEN_BN_SWITCH.ENABLED True")
        out.append(Finding(
            "small_norm_batch", "warning", "rethinking §4 (Fig. 5), evalnorm §3.2, mabn §3.1",
            f"{key} {name!r} normalizes over {nb} image(s) per group ({ipp} per process, {world} process(es)): "
            f"noisy training statistics and a train-test inconsistency at inference", fix, [key]))

    head = cfg.MODEL.RETINANET.NORM
    # a registered name builds one layer for every level (detectron2's own "BN" / "SyncBN" build one per level)
    if "RetinaNet" in arch and arch != "DomainBNRetinaNet" and head in NORM_REGISTRY and batch_statistics_of(head):
        out.append(Finding(
            "shared_head_bn", "warning", "rethinking §5.2, Table 5 (row 3: 34.1 vs 39.1 AP)",
            f"MODEL.RETINANET.NORM {head!r} is one layer shared by every FPN level: its batch statistics mix the "
            f"levels in training and its population statistics are one set for all of them",
            "MODEL.RETINANET.NORM 'BN' or 'SyncBN' (detectron2's per-level head), or MODEL.META_ARCHITECTURE "
            "'DomainBNRetinaNet' with D2NORM.RETINANET_HEAD.TRAIN_STATS / POP_STATS 'per_level'",
            ["MODEL.RETINANET.NORM"]))

    if rcnn and ipp <= 2:
        shuffled = cfg.D2NORM.SHUFFLE_HEAD.ENABLED
        for key, node in (("MODEL.ROI_BOX_HEAD.NORM", cfg.MODEL.ROI_BOX_HEAD),
                          ("MODEL.ROI_MASK_HEAD.NORM", cfg.MODEL.ROI_MASK_HEAD)):
            if key.startswith("MODEL.ROI_MASK") and not cfg.MODEL.MASK_ON:
                continue
            conv_head = node.NUM_CONV > 0
            if batch_statistics_of(node.NORM) == "process" and node.NORM != "BatchStatsBN" and conv_head and not (
                    shuffled and node.NAME.startswith("Shuffled")):
                out.append(Finding(
                    "rcnn_head_bn", "warning", "rethinking §6.1, Table 6 (rows 1-2: 30.7 / 40.1 AP)",
                    f"{key} {node.NORM!r} with {ipp} image(s) per process: the head's batch statistics come from "
                    f"the RoIs of {ipp} image(s), which leak information between them",
                    f"{key.rsplit('.', 1)[0]}.NAME 'ShuffledConvFCHead' / 'ShuffledMaskRCNNConvUpsampleHead' "
                    f"(shuffled RoIs), or {key} 'AnySyncBN', or 'BatchStatsBN' (mini-batch statistics at inference)",
                    [key]))

    p = cfg.D2NORM.PRECISE_BN
    if p.ENABLED:
        if p.BATCH_SIZE < 100:
            out.append(Finding(
                "precise_bn_small", "info", "rethinking §3.2, Table 2 (B >= 10^2)",
                f"D2NORM.PRECISE_BN.BATCH_SIZE {p.BATCH_SIZE}: population statistics estimated with small forward "
                f"batches are biased by the per-batch normalization of earlier layers (exact with "
                f"EXACT_LAYERWISE)", "D2NORM.PRECISE_BN.BATCH_SIZE >= 100 where memory allows, or "
                "D2NORM.PRECISE_BN.EXACT_LAYERWISE True", ["D2NORM.PRECISE_BN.BATCH_SIZE"]))
        if p.NUM_SAMPLES < 1000:
            out.append(Finding(
                "precise_bn_small", "warning", "rethinking §3.2, Table 1 (N = 10^3-10^4)",
                f"D2NORM.PRECISE_BN.NUM_SAMPLES {p.NUM_SAMPLES}: too few images for stable population statistics",
                "D2NORM.PRECISE_BN.NUM_SAMPLES 1000 or more", ["D2NORM.PRECISE_BN.NUM_SAMPLES"]))

    from .options import class_options

    # d2norm layers whose EMA momentum is D2NORM.BN.MOMENTUM (BRN, MABN, BGN declare their own)
    used = sorted({v for _, v in norm_keys(cfg) if v in NORM_REGISTRY
                   and class_options(NORM_REGISTRY.get(v)).get("momentum", (None,))[0] == "BN"})
    m = cfg.D2NORM.BN.MOMENTUM
    if used and not p.ENABLED and m and m > 0 and (1.0 / m) > 0.05 * cfg.SOLVER.MAX_ITER:
        out.append(Finding(
            "ema_window", "warning", "rethinking §3.1",
            f"D2NORM.BN.MOMENTUM {m} ({', '.join(used)}): the EMA averages over the last ~{1 / m:.0f} iterations, "
            f"{100 / m / cfg.SOLVER.MAX_ITER:.0f}% of SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER}; its statistics mix "
            f"models from far back in training", "D2NORM.PRECISE_BN.ENABLED True (or a larger momentum)",
            ["D2NORM.BN.MOMENTUM"]))

    trainable = [v for _, v in norm_keys(cfg) if v and v not in ("FrozenBN",)]
    if trainable and cfg.SOLVER.WEIGHT_DECAY_NORM == 0 and cfg.SOLVER.WEIGHT_DECAY > 0:
        out.append(Finding(
            "norm_weight_decay", "info", "four-things §3.3",
            f"SOLVER.WEIGHT_DECAY_NORM 0 (detectron2's default): the gamma / beta of {', '.join(sorted(set(trainable)))} "
            f"get no weight decay; four-things found it a regularizer (+0.3% CIFAR-100, +0.91% ResNet-50 on "
            f"Caltech-256; -0.13% for Inception-v3)", f"SOLVER.WEIGHT_DECAY_NORM {cfg.SOLVER.WEIGHT_DECAY}",
            ["SOLVER.WEIGHT_DECAY_NORM"]))
    return out


#: the measured quantities shown per layer in the report (d2norm.doctor_measured)
MEASURED_COLUMNS = ("rel_mean_gap", "rel_std_gap", "rel_batch_mean_spread", "rel_batch_std_spread",
                    "normalization_batch", "rel_moving_std_gap", "calls", "level_divergence",
                    "level_std_divergence", "roi_within_image", "training_batch_mean_spread",
                    "inference_batch_mean_spread", "training_batch_std_spread", "inference_batch_std_spread",
                    "second_moment_max")


def report_markdown(findings: List[Finding], title: str, measured: Optional[Dict[str, Dict]] = None) -> str:
    lines = [f"# BN doctor: {title}", ""]
    if not findings:
        lines.append("No batch-statistics pitfall found.")
    else:
        lines += ["| severity | finding | paper | what | fix |", "|---|---|---|---|---|"]
        for f in sorted(findings, key=lambda f: SEVERITIES.index(f.severity)):
            lines.append(f"| {f.severity} | {f.code} | {f.paper} | {f.message} | {f.fix} |")
    if measured:
        lines += ["", "## Measured, per layer in module order (d2norm.doctor_measured; rel_* in units of the "
                  "layer's population ||sigma||)", "", "| layer | " + " | ".join(MEASURED_COLUMNS) + " |",
                  "|---|" + "---|" * len(MEASURED_COLUMNS)]
        for name, r in measured.items():
            cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in MEASURED_COLUMNS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(findings: List[Finding], out_dir: str, title: str,
                 measured: Optional[Dict[str, Dict]] = None) -> Dict[str, str]:
    """``report.md`` and ``report.json`` in ``out_dir`` (with ``measured``: also ``measured.png``, the estimation
    shift and the train/test spread of every layer by depth)."""
    os.makedirs(out_dir, exist_ok=True)
    md, js = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.json")
    with open(md, "w") as f:
        f.write(report_markdown(findings, title, measured) + "\n")
    with open(js, "w") as f:
        json.dump({"title": title, "findings": [x.as_dict() for x in findings], "measured": measured or {}}, f,
                  indent=1)
    out = {"markdown": md, "json": js}
    if measured:
        out["png"] = _plot_measured(measured, os.path.join(out_dir, "measured.png"))
    return out


def _plot_measured(measured: Dict[str, Dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in measured.items() if "rel_std_gap" in r]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.12 * len(names) + 2), 3.4))
    for key, label in (("rel_mean_gap", "EMA vs population mean (Def. 2)"),
                       ("rel_std_gap", "EMA vs population sigma"),
                       ("rel_batch_std_spread", "batch vs population sigma (train/test, §4)")):
        ax.plot(range(len(names)), [measured[n].get(key, float("nan")) for n in names], marker=".", label=label)
    ax.set_xlabel("layer (module order = depth)")
    ax.set_ylabel("/ ||sigma_pop||")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
