"""The catalogue of paper rows with a COCO-scale config (``configs/paper_rows.yaml``): loading it, checking a row's
built cfg and model against what the paper states for it, and the README / markdown table.

A row's norms are read from the *built model* (not from the yaml): :func:`part_norms` names the norm of each part
(ResNet ``backbone``, ``fpn``, ``box_head`` — ``res5`` for C4 models —, ``mask_head``, ``retinanet_head``) with
the names a user writes in a config (d2norm's registry names; detectron2's "BN", "SyncBN", "FrozenBN", "GN").
"""
import os
from typing import Any, Dict, List, Optional, Union

from torch import nn

__all__ = ["CATALOGUE", "load_rows", "norm_name", "part_norms", "check_row", "markdown_table", "row_cfg", "row_slug",
           "launch_commands", "collect", "results_table"]

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


# ---- launching a table and collecting its results ---------------------------------------------------------------
def row_slug(row: Dict[str, Any]) -> str:
    """The row's output folder name: its config's name (+ a short digest of its overrides, if any)."""
    import hashlib

    name = os.path.splitext(os.path.basename(row["config"]))[0]
    if row.get("overrides"):
        name += "-" + hashlib.sha1(" ".join(map(str, row["overrides"])).encode()).hexdigest()[:8]
    return name


def launch_commands(rows: List[Dict[str, Any]], gpus_per_machine: int, output_root: str,
                    python: str = "python", dist_url: str = "tcp://MASTER_HOST:PORT") -> List[Dict[str, Any]]:
    """For each row: ``{"row", "machines", "commands"}``: the ``tools/train_net.py`` command(s) that give the row
    its workers (``gpus``) and images per worker. A row needing more workers than one machine has runs on
    ``machines`` machines (one command per machine rank, ``dist_url`` the first machine's); ValueError when the
    row's workers are not a multiple of ``gpus_per_machine`` (the normalization batch per GPU would change)."""
    if gpus_per_machine < 1:
        raise ValueError(f"--gpus-per-machine must be >= 1, got {gpus_per_machine}")
    out = []
    for r in rows:
        workers = int(r["gpus"])
        per = min(workers, gpus_per_machine)
        if workers % per:
            raise ValueError(f"{r['paper']} Table {r['table']} {r['row']}: needs {workers} workers of "
                             f"{r['images_per_gpu']} image(s); {gpus_per_machine} GPUs per machine do not divide it")
        machines = workers // per
        base = [python, "tools/train_net.py", "--num-gpus", str(per)]
        tail = ["--config-file", r["config"], *map(str, r.get("overrides", [])), "OUTPUT_DIR",
                os.path.join(output_root, row_slug(r))]
        if machines == 1:
            cmds = [base + tail]
        else:
            cmds = [base + ["--num-machines", str(machines), "--machine-rank", str(k), "--dist-url", dist_url] + tail
                    for k in range(machines)]
        out.append({"row": r, "machines": machines, "commands": cmds})
    return out


def _last_metrics(path: str) -> Dict[str, float]:
    """The last value of every ``bbox/AP`` / ``segm/AP`` in a detectron2 ``metrics.json``."""
    import json

    found: Dict[str, float] = {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            for task in ("bbox", "segm"):
                if f"{task}/AP" in rec:
                    found[task] = float(rec[f"{task}/AP"])
    return found


def collect(rows: List[Dict[str, Any]], root: str) -> List[Dict[str, Any]]:
    """``[{"paper", "table", "row", "config", "paper_ap", "ours", "delta", "dir"}]``: each row's final COCO AP from
    ``root/<row_slug>/metrics.json`` (detectron2's evaluation during / after training) next to the paper's; rows
    without results have ``ours`` None."""
    out = []
    for r in rows:
        d = os.path.join(root, row_slug(r))
        m = os.path.join(d, "metrics.json")
        ours = _last_metrics(m) if os.path.isfile(m) else {}
        ours = {k: v for k, v in ours.items() if k in r["ap"]} or None
        delta = {k: ours[k] - r["ap"][k] for k in ours} if ours else None
        out.append({"paper": r["paper"], "table": r["table"], "row": r["row"], "config": r["config"],
                    "paper_ap": r["ap"], "ours": ours, "delta": delta, "dir": d})
    return out


def results_table(collected: List[Dict[str, Any]]) -> str:
    """Markdown: paper vs ours (box / mask AP) and the difference, per row."""
    def fmt(d):
        return " / ".join(f"{d[k]:.2f}" if d[k] == d[k] else "nan" for k in ("bbox", "segm") if k in d) if d else "-"

    lines = ["| paper | table | row | paper AP | ours | Δ |", "|---|---|---|---|---|---|"]
    for c in collected:
        delta = " / ".join(f"{c['delta'][k]:+.2f}" for k in ("bbox", "segm") if k in c["delta"]) if c["delta"] else "-"
        lines.append(f"| {c['paper']} | {c['table']} | {c['row']} | {fmt(c['paper_ap'])} | {fmt(c['ours'])} | {delta} |")
    return "\n".join(lines)
