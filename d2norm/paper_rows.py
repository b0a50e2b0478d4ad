"""The catalogue of paper rows with a COCO-scale config (``configs/paper_rows.yaml``): loading it, checking a row's
built cfg and model against what the paper states for it, and the README / markdown table.

A row's norms are read from the *built model* (not from the yaml): :func:`part_norms` names the norm of each part
(ResNet ``backbone``, ``fpn``, ``box_head`` — ``res5`` for C4 models —, ``mask_head``, ``retinanet_head``) with
the names a user writes in a config (d2norm's registry names; detectron2's "BN", "SyncBN", "FrozenBN", "GN").
"""
import os
from typing import Any, Dict, List, Optional, Union

from torch import nn

__all__ = ["CATALOGUE", "load_rows", "norm_name", "part_norms", "check_row", "markdown_table", "row_cfg"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the catalogue's path in a checkout
CATALOGUE = os.path.join(ROOT, "configs", "paper_rows.yaml")
PARTS = ("backbone", "fpn", "box_head", "mask_head", "retinanet_head")
STATED_KEYS = ("norms", "ims_per_batch", "max_iter", "base_lr", "min_size_train", "options")


def load_rows(path: str = CATALOGUE) -> List[Dict[str, Any]]:
    """The rows of the catalogue (each a dict: paper, table, row, config, overrides, ap, gpus, images_per_gpu,
    stated, deviations)."""
    import yaml

    with open(path) as f:
        rows = yaml.safe_load(f)["rows"]
    for r in rows:
        unknown = set(r["stated"]) - set(STATED_KEYS)
        if unknown:
            raise ValueError(f"{path}: row {r['paper']} {r['table']} {r['row']!r}: unknown stated keys {sorted(unknown)}")
    return rows


def norm_name(module: nn.Module) -> Optional[str]:
    """The config name of a norm module (``None`` for a module that is not a norm)."""
    from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm

    from .layers.frozen import FrozenBatchNorm
    from .layers.registry import NORM_REGISTRY

    by_class = {cls: name for name, cls in NORM_REGISTRY}
    for cls in type(module).__mro__:  # subclasses (e.g. SyncDomainBatchNorm2d) take their registered base's name
        if cls in by_class:
            return by_class[cls]
    if isinstance(module, (FrozenBatchNorm2d, FrozenBatchNorm)):
        return "FrozenBN"
    if isinstance(module, (nn.SyncBatchNorm, NaiveSyncBatchNorm)):
        return "SyncBN"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "BN"
    if isinstance(module, nn.GroupNorm):
        return "GN"
    return None


def _names(module: Optional[nn.Module], skip: Optional[nn.Module] = None) -> Union[None, str, List[str]]:
    if module is None:
        return None
    skipped = {id(m) for m in skip.modules()} if skip is not None else set()
    found = sorted({n for m in module.modules() if id(m) not in skipped for n in [norm_name(m)] if n})
    return None if not found else (found[0] if len(found) == 1 else found)


def part_norms(model: nn.Module) -> Dict[str, Union[None, str, List[str]]]:
    """``{part: norm name, list of names (a mix) or None}`` for the parts the model has."""
    model = getattr(model, "module", model)
    out: Dict[str, Union[None, str, List[str]]] = {}
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        bottom = getattr(backbone, "bottom_up", None)
        if bottom is not None:
            out["backbone"], out["fpn"] = _names(bottom), _names(backbone, skip=bottom)
        else:
            out["backbone"] = _names(backbone)
    roi = getattr(model, "roi_heads", None)
    if roi is not None:
        box = getattr(roi, "box_head", None)
        out["box_head"] = _names(box if box is not None else getattr(roi, "res5", None))
        if getattr(roi, "mask_on", False) or getattr(roi, "mask_head", None) is not None:
            out["mask_head"] = _names(getattr(roi, "mask_head", None))
    if getattr(model, "head", None) is not None:
        out["retinanet_head"] = _names(model.head)
    return out


def row_cfg(row: Dict[str, Any], extra=()):
    """The row's cfg (config + overrides + ``extra``), on the CPU, without loading weights."""
    from .engine.cli import read_cfg

    return read_cfg(os.path.join(ROOT, row["config"]),
                    [*row.get("overrides", []), "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *extra])


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_row(row: Dict[str, Any], model: Optional[nn.Module] = None) -> List[str]:
    """What differs between the row's built cfg / model and ``stated`` (empty when it conforms). A difference in
    a setting the row lists under ``deviations`` (by cfg key) is not reported."""
    from .layers import build_model

    cfg = row_cfg(row)
    stated, allowed = row["stated"], set(row.get("deviations", {}) or {})
    problems = []

    def differ(key, want, got):
        if key not in allowed:
            problems.append(f"{key}: paper {want!r}, config {got!r}")

    if stated["ims_per_batch"] != row["gpus"] * row["images_per_gpu"]:
        problems.append(f"catalogue: ims_per_batch {stated['ims_per_batch']} != gpus x images_per_gpu")
    if cfg.SOLVER.IMS_PER_BATCH != stated["ims_per_batch"]:
        differ("SOLVER.IMS_PER_BATCH", stated["ims_per_batch"], cfg.SOLVER.IMS_PER_BATCH)
    if cfg.SOLVER.MAX_ITER != stated["max_iter"]:
        differ("SOLVER.MAX_ITER", stated["max_iter"], cfg.SOLVER.MAX_ITER)
    if abs(cfg.SOLVER.BASE_LR - stated["base_lr"]) > 1e-9 * max(1.0, stated["base_lr"]):
        differ("SOLVER.BASE_LR", stated["base_lr"], cfg.SOLVER.BASE_LR)
    if list(cfg.INPUT.MIN_SIZE_TRAIN) != list(stated["min_size_train"]):
        differ("INPUT.MIN_SIZE_TRAIN", stated["min_size_train"], list(cfg.INPUT.MIN_SIZE_TRAIN))
    for key, want in (stated.get("options") or {}).items():
        got = _get(cfg, key)
        if got != want and not (isinstance(want, float) and abs(got - want) < 1e-12):
            differ(key, want, got)
    got_norms = part_norms(model if model is not None else build_model(cfg))
    for part, want in stated["norms"].items():
        if part not in got_norms:
            problems.append(f"norms.{part}: the model has no such part (parts: {sorted(got_norms)})")
        elif got_norms[part] != want:
            differ(f"norms.{part}", want, got_norms[part])
    return problems


def _fmt_ap(ap: Dict[str, float]) -> str:
    return " / ".join(f"{ap[k]:.2f}" for k in ("bbox", "segm") if k in ap)


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    """One table of every row: paper, table, row, AP (box / mask), GPUs x images, norms, config."""
    lines = ["| paper | table | row | paper AP (box / mask) | GPUs x img | norms (backbone, FPN, heads) | config |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        norms = ", ".join(f"{p}: {'/'.join(v) if isinstance(v, list) else (v or '-')}"
                          for p, v in r["stated"]["norms"].items())
        dev = " ¹" if r.get("deviations") else ""
        lines.append(f"| {r['paper']} | {r['table']} | {r['row']}{dev} | {_fmt_ap(r['ap'])} | {r['gpus']} x "
                     f"{r['images_per_gpu']} | {norms} | `{r['config']}` |")
    lines.append("")
    lines.append("¹ a setting differs from the paper; the reason is in `configs/paper_rows.yaml` (`deviations`).")
    return "\n".join(lines)
