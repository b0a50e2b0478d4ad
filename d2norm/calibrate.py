"""calibrate_bn: choose a trained model's inference statistics on held-out *training* data, never the test set
(``tools/calibrate_bn.py``).

The papers agree that the statistics a BN-family model normalizes with at inference are a choice of its own, made
after training and worth AP: the EMA or population statistics recomputed with some B and N (rethinking §3.2,
Tables 1-2), the example's own statistics mixed in with weight α (four-things §3.1, eq 3, tuned on validation
data), EvalNorm's α̂, β̂ by the 1/B² rule or fitted offline (evalnorm §3.4, §4.1), batch statistics in the R-CNN
heads (rethinking §4.2, Table 3). Each is a *candidate*; every candidate is evaluated (COCO AP) on a calibration
split drawn from the training set with a recorded size and seed, the best one is chosen there, and only the chosen
one is evaluated on the test set, once. Statistics a candidate estimates (PreciseBN, EvalNorm's fit) come from the
rest of the training set, so the calibration images are never seen by the estimate that is scored on them.

A candidate a model cannot take is listed with the reason (the layer protocol says which layers convert, e.g.
MABN has no BN statistics to mix, FrozenBN has no batch statistics).
"""
import copy
import dataclasses
import os
import random
from typing import Callable, Dict, List, Sequence, Tuple

from torch import nn

__all__ = ["Candidate", "calibration_split", "candidates", "apply_candidate", "choose", "head_norm_layers",
           "candidate_cfg"]

#: the order candidates are listed and tried in; on equal AP the earlier (simpler) one is chosen
KINDS = ("ema", "precise_bn", "example_weighing", "evalnorm_rule", "evalnorm_offline", "batch_stats_heads",
         "per_level_heads")
#: module-name prefixes of detection heads (detectron2's R-CNN heads, RetinaNet's head)
HEAD_PREFIXES = ("roi_heads.", "head.")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One choice of inference statistics: ``kind`` (:data:`KINDS`) with its ``params``."""

    kind: str
    params: Tuple[Tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        return self.kind + "".join(f"_{k}{v:g}" if isinstance(v, float) else f"_{k}{v}" for k, v in self.params)

    def param(self, key: str):
        return dict(self.params)[key]


# ---- the split ------------------------------------------------------------------------------------------------
def calibration_split(train: str, size: int, seed: int) -> Tuple[str, str, List]:
    """Register ``<train>__calib_s<seed>_n<size>`` (``size`` images drawn with ``seed``) and
    ``<train>__rest_s<seed>_n<size>`` (the others) as datasets; returns their names and the calibration images'
    ids. Their metadata is the training set's without its ``json_file``, so COCO evaluation builds the ground truth
    of exactly those images. ValueError when ``size`` is not below the number of training images."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    dicts = DatasetCatalog.get(train)
    if not 1 <= size < len(dicts):
        raise ValueError(f"calibration split size {size} must be in [1, {len(dicts) - 1}] ({train!r} has "
                         f"{len(dicts)} images; the rest estimates statistics)")
    picked = set(random.Random(seed).sample(range(len(dicts)), size))
    calib = [d for i, d in enumerate(dicts) if i in picked]
    rest = [d for i, d in enumerate(dicts) if i not in picked]
    meta = {k: v for k, v in MetadataCatalog.get(train).as_dict().items() if k not in ("name", "json_file")}
    names = []
    for part, items in (("calib", calib), ("rest", rest)):
        name = f"{train}__{part}_s{seed}_n{size}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda items=items: copy.deepcopy(items))
        MetadataCatalog.get(name).set(**meta)
        names.append(name)
    return names[0], names[1], [d.get("image_id", d.get("file_name")) for d in calib]


# ---- the candidates ----------------------------------------------------------------------------------------------
def head_norm_layers(model: nn.Module) -> List[str]:
    """Norm layers of the detection heads whose inference is BN's (converted by ``batch_stats_heads``)."""
    from .layers.convert import conversion_plan

    convert, _ = conversion_plan(model, "BatchStatsBN", bn_inference_only=True)
    return [n for n in convert if n.startswith(HEAD_PREFIXES)]


def candidates(model: nn.Module, alphas: Sequence[float], precise: Sequence[Tuple[int, int]],
               evalnorm_offline: bool = True) -> Tuple[List[Candidate], Dict[str, str]]:
    """``(candidates the model can take, {kind: reason} of those it cannot)``, in :data:`KINDS` order.
    ``precise``: the (B, N) pairs of PreciseBN to try."""
    from .layers.convert import conversion_plan
    from .layers.domain_bn import DomainBatchNorm2d
    from .layers.evalnorm import EvalNorm2d
    from .layers.example_weighted_bn import ExampleWeightedBatchNorm2d
    from .stats import population_stat_layers

    out, skipped = [Candidate("ema")], {}
    if population_stat_layers(model):
        out += [Candidate("precise_bn", (("B", b), ("N", n))) for b, n in precise]
    else:
        skipped["precise_bn"] = "no layer holds population statistics to recompute"
    ew, kept = conversion_plan(model, "ExampleWeightedBN", bn_inference_only=True)
    if ew or any(isinstance(m, ExampleWeightedBatchNorm2d) for m in model.modules()):
        out += [Candidate("example_weighing", (("alpha", float(a)),)) for a in alphas if a > 0]
    else:
        skipped["example_weighing"] = _why(kept)
    en, kept = conversion_plan(model, "EvalNorm")
    if en or any(isinstance(m, EvalNorm2d) for m in model.modules()):
        out.append(Candidate("evalnorm_rule"))
        if evalnorm_offline:
            out.append(Candidate("evalnorm_offline"))
    else:
        skipped["evalnorm_rule"] = skipped["evalnorm_offline"] = _why(kept)
    if head_norm_layers(model):
        out.append(Candidate("batch_stats_heads"))
    else:
        skipped["batch_stats_heads"] = "no norm with BN inference in the detection heads (roi_heads / head)"
    per_level = [n for n, m in model.named_modules() if isinstance(m, DomainBatchNorm2d) and m.num_domains > 1]
    skipped["per_level_heads"] = (
        f"the shared head already has per-level statistics ({len(per_level)} DomainBN layers), the EMA candidate "
        f"uses them" if per_level else
        "no head norm holds per-level statistics (train with DomainBNRetinaNet, rethinking §5.2, to have them)")
    return out, skipped


def _why(kept: Dict[str, str]) -> str:
    reasons = sorted(set(kept.values()))
    return "no layer converts: " + ("; ".join(reasons[:3]) if reasons else "the model has no norm layer")


def apply_candidate(model: nn.Module, cand: Candidate, cfg, statistics_loader: Callable[[int], object],
                    train_batch: int, offline_iters: int, offline_lr: float) -> Tuple[nn.Module, dict]:
    """A copy of ``model`` with ``cand``'s inference statistics, and what was done (``converted`` layer names
    and the registered names they came from). ``statistics_loader(B)``: a training-style loader of B images per
    forward on the rest of the training set (never the calibration split). ``train_batch``: the training
    normalization batch B of EvalNorm's rule where a layer does not fix it (GhostBN does)."""
    from .engine.hooks import PreciseBNSpec
    from .layers.convert import conversion_plan, convert_bn_layers, registered_norm_names
    from .layers.evalnorm import evalnorm_modules
    from .layers.example_weighted_bn import ExampleWeightedBatchNorm2d
    from .layers.protocol import norm_protocol
    from .stats.evalnorm_fit import fit_evalnorm_offline, set_evalnorm_rule

    m = copy.deepcopy(model)
    info = {"converted": [], "sources": []}
    if cand.kind == "precise_bn":
        b, n = cand.param("B"), cand.param("N")
        PreciseBNSpec(num_samples=n, batch_size=b).run(m, iter(statistics_loader(b)))
    elif cand.kind == "example_weighing":
        names, _ = conversion_plan(m, "ExampleWeightedBN", bn_inference_only=True)
        info["sources"] = registered_norm_names(m, names)
        info["converted"] = convert_bn_layers(m, "ExampleWeightedBN", cfg, names=names) if names else []
        for layer in m.modules():
            if isinstance(layer, ExampleWeightedBatchNorm2d):
                layer.alpha = cand.param("alpha")
    elif cand.kind in ("evalnorm_rule", "evalnorm_offline"):
        names, _ = conversion_plan(m, "EvalNorm")
        fixed = {n: norm_protocol(layer).training_normalization_batch() for n, layer in m.named_modules()
                 if n in names}
        info["sources"] = registered_norm_names(m, names)
        info["converted"] = convert_bn_layers(m, "EvalNorm", cfg, names=names) if names else []
        layers = evalnorm_modules(m)
        sizes = {n: (fixed.get(n) or train_batch) for n in layers}
        set_evalnorm_rule(layers, sizes)  # the rule; also the offline fit's starting point
        if cand.kind == "evalnorm_offline":
            fit_evalnorm_offline(m, statistics_loader(min(sizes.values())), offline_iters, lr=offline_lr)
            for layer in layers.values():
                layer.mode = "offline"
    elif cand.kind == "batch_stats_heads":
        from .layers.convert import convert_norm

        names = head_norm_layers(m)
        info["sources"] = registered_norm_names(m, names)
        _, report = convert_norm(m, "BatchStatsBN", cfg, names=set(names))
        info["converted"] = sorted(report.converted)
    elif cand.kind != "ema":
        raise ValueError(f"unknown candidate kind {cand.kind!r}; known: {', '.join(KINDS)}")
    return m, info


def choose(results: Dict[str, float], order: Sequence[str]) -> str:
    """The candidate with the highest calibration AP; on equal AP the earlier one in ``order`` (simplest first).
    A NaN AP (no predictions) never wins over a number."""
    def key(name):
        ap = results[name]
        return (ap == ap, ap if ap == ap else float("-inf"), -order.index(name))

    return max(order, key=key)


def candidate_cfg(cfg, cand: Candidate, weights: str, info: dict):
    """The config that evaluates the calibrated checkpoint ``weights``: the source cfg with the NORM keys of the
    converted layers naming their new type and the candidate's options, MODEL.WEIGHTS and OUTPUT_DIR set (never
    the training run's folder). Returns ``(cfg, keys kept)``."""
    from .layers.cfg_checks import norm_keys
    from .layers.convert import BN_NORM_NAMES, cfg_with_norm

    if cand.kind == "example_weighing" and info["converted"]:
        return cfg_with_norm(cfg, "ExampleWeightedBN", weights, sources=info["sources"],
                             **{"D2NORM.EXAMPLE_WEIGHING.ALPHA": cand.param("alpha")})
    if cand.kind in ("evalnorm_rule", "evalnorm_offline") and info["converted"]:
        return cfg_with_norm(cfg, "EvalNorm", weights, sources=info["sources"],
                             **{"D2NORM.EVALNORM.MODE": "offline"})
    c = cfg.clone()
    c.defrost()
    opts = ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", os.path.dirname(os.path.abspath(weights))]
    kept = []
    if cand.kind == "batch_stats_heads":
        for key, value in norm_keys(c):
            if key in ("MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM") and value in (
                    tuple(BN_NORM_NAMES) + tuple(info["sources"])):
                opts += [key, "BatchStatsBN"]
        if any(n.startswith("head.") for n in info["converted"]):
            kept.append("MODEL.RETINANET.NORM")  # detectron2's per-level head BN: no registered-name layout
    c.merge_from_list(opts)
    return c, kept
