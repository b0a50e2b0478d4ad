"""BN doctor, measured part: a trained model's batch-statistics problems, measured on training batches
(``tools/bn_doctor.py --weights``). Each measurement is a number per layer; findings come from thresholds stated
here, each with the paper section and the calibrate_bn candidates expected to help.

Per layer with population statistics (training batches of the training batch size, the model in training mode,
nothing in it changed; :func:`d2norm.stats.monitor.bn_statistics_gaps`):

* ``mean_gap`` / ``std_gap``: ||μ_EMA − μ_pop||₂, ||σ_EMA − σ_pop||₂ — the estimation shift of estimation-shift
  Def. 2 (reported by depth, i.e. in module order), the EMA's distance from the current model's population
  statistics (rethinking §3.1, Fig. 2);
* ``batch_mean_spread`` / ``batch_std_spread``: mean over batches of ||μ_B − μ_pop||₂, ||σ_B − σ_pop||₂ — how far
  the statistics a layer trains with are from those it is evaluated with: the train/test inconsistency of small
  normalization batches (rethinking §4, Fig. 5);
* ``moving_std_gap`` (MABN): ||χ̄ − χ_pop||₂ with χ̄ the moving average its training forward normalizes with
  (mabn eq 19) -- the lag of its training statistics behind the current model (mabn §4.2);
* ``rel_*``: the same divided by ||σ_pop||₂ (scale-free; thresholds apply to these).

Per layer called several times per forward (a head shared over FPN levels; rethinking §5.2), per call j (for a
DomainBN fed through ``forward_domains``, per domain):
``level_divergence`` = max_j ||μ_j − μ||₂ / ||σ||₂ and ``level_std_divergence`` = max_j ||σ_j − σ||₂ / ||σ||₂ with
μ, σ the layer's statistics pooled over all calls (float64, over every batch): per-level statistics matter when
the levels' statistics are far apart (Table 5 row 2, per-level population statistics for a head trained with
shared ones, normalizes level j with (μ_j, σ_j) instead of (μ, σ): 2.1 AP).

Per norm of the R-CNN heads (``roi_heads.``), the within-image correlation of its input (rethinking §6, "the RoIs
of one image are correlated"): ``roi_within_image`` = Var_images(per-image mean) / total variance, averaged over
channels (0 for independent RoIs of many images, up to 1 when each image's RoIs are alike); measured when the
RoIs of one forward split evenly over its images (detectron2 orders them by image).

Per norm of the R-CNN heads, the train/test inconsistency of R-CNN's RoI sampling (rethinking §4.2, below
Table 3: "the sampling strategies inside R-CNN create additional train-test inconsistency, which may let
mini-batches in inference follow a different distribution from those in training"): the model in eval mode on the
same images one at a time (inference's per-GPU batch of one image: its R_0 proposals, no sampling) with the head
norms normalizing each image's RoIs by their own statistics (batch-statistics inference, Table 3's "batch" column;
the head's deeper norms then see what they would see there), in units of ||σ_train||₂, μ_train / σ_train the
layer's input statistics pooled over the training forwards:
``inference_mean_shift`` = ||μ_inf − μ_train||₂ and ``inference_std_shift`` = ||σ_inf − σ_train||₂ (μ_inf, σ_inf
pooled over the inference forwards); ``inference_batch_mean_spread`` / ``inference_batch_std_spread`` = mean over
images of ||μ_img − μ_train||₂, ||σ_img − σ_train||₂ (the statistics batch-statistics inference normalizes one image
with), next to ``training_batch_mean_spread`` / ``training_batch_std_spread``, the same over training forwards (the
statistics the layer trained with); ``inference_rois`` / ``training_rois``: RoIs per forward.

Buffers: non-finite statistics (error), and statistics whose E[x²] = var + mean² exceeds what float16 holds
(65504: x² of a typical input overflows in fp16 arithmetic; pytorch #96798) (warning with AMP).
"""
import math
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from .doctor import Finding

__all__ = ["measure", "diagnose_measured", "THRESHOLDS", "INFERENCE_OVER_TRAINING", "FP16_MAX"]

FP16_MAX = 65504.0
#: finding thresholds (scale-free quantities, see the module docstring)
THRESHOLDS = {
    "ema_outside_batches": 1.0,     # mean_gap above the batch spread: the EMA left the cloud of batch statistics
    "train_test": 0.2,              # rel_batch_std_spread or rel_batch_mean_spread
    "level_divergence": 0.5,        # per-level statistics matter
    "roi_within_image": 0.2,        # RoIs of one image share their statistics
    "inference_batch": 0.2,         # inference RoI batches this far from the training RoIs' statistics ...
}
#: ... and farther than the training batches are (inference_batch_* > this x training_batch_*)
INFERENCE_OVER_TRAINING = 1.0


@torch.no_grad()
def _per_call_moments(model: nn.Module, batches: List[Any], layers: Dict[str, nn.Module],
                      forward_fn: Callable, roi_images: Callable[[Any], int],
                      inference_fn: Optional[Callable] = None) -> Dict[str, dict]:
    """Float64 (count, Σx, Σx²) per channel for each call index of each layer over ``batches``, and the RoI
    within-image ratio of the R-CNN head norms; with ``inference_fn``, the R-CNN head norms' inference RoI batches
    against their training ones (module docstring). The calls each layer's protocol routes (``routed_calls``) are
    observed, the model restored afterwards."""
    from .stats.passes import discarded_event_storage, isolated_rng
    from .stats.state import capture_state, restore_state

    calls: Dict[str, int] = {}
    sums: Dict[str, Dict[int, list]] = {n: {} for n in layers}
    roi: Dict[str, list] = {n: [] for n in layers if n.startswith("roi_heads.")}
    # per call of an R-CNN head norm, (RoIs, elements, Σx, Σx²) in float64, per phase ("train" / "inference")
    roi_calls: Dict[str, Dict[str, list]] = {"train": {n: [] for n in roi}, "inference": {n: [] for n in roi}}
    current = {"images": 0, "phase": "train"}

    active = set()  # a layer inside one of its own routed calls (forward_domains calling forward): count once

    def record(name, x, j=None):
        if not torch.is_tensor(x) or x.dim() < 2 or x.numel() == 0:
            return
        if j is None:
            j = calls[name] = calls.get(name, -1) + 1
        xd = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
        if name in roi:
            roi_calls[current["phase"]][name].append((x.shape[0], xd.shape[1], xd.sum(1).cpu(),
                                                      (xd * xd).sum(1).cpu()))
        if current["phase"] != "train":
            return
        s = sums[name].setdefault(j, [0.0, torch.zeros(x.shape[1], dtype=torch.float64),
                                      torch.zeros(x.shape[1], dtype=torch.float64)])
        s[0] += xd.shape[1]
        s[1] += xd.sum(1).cpu()
        s[2] += (xd * xd).sum(1).cpu()
        k = current["images"]
        if name in roi and k > 1 and x.shape[0] % k == 0 and x.shape[0] // k > 1:
            per = x.detach().double().reshape(k, x.shape[0] // k, x.shape[1], -1)
            total = per.transpose(1, 2).reshape(k, x.shape[1], -1)
            img_mean = total.mean(2)                                 # (k, C)
            var_total = total.transpose(0, 1).reshape(x.shape[1], -1).var(1, unbiased=False)
            var_between = img_mean.var(0, unbiased=False)
            ok = var_total > 0
            if ok.any():
                roi[name].append(float((var_between[ok] / var_total[ok]).mean()))

    def wrap(name, module, fn, convention):
        def call(*args, **kwargs):
            if id(module) not in active:
                if convention == "inputs_by_domain":  # forward_domains(xs, domains): call j = the domain
                    xs = list(args[0])
                    domains = args[1] if len(args) > 1 else kwargs.get("domains")
                    for x, k in zip(xs, domains if domains is not None else range(len(xs))):
                        record(name, x, int(k))
                else:
                    record(name, args[0])
            active.add(id(module))
            try:
                return fn(*args, **kwargs)
            finally:
                active.discard(id(module))

        return call

    from .layers.protocol import norm_protocol
    from .stats.state import patched_instance_attrs

    patches = [(m, attr, wrap(n, m, getattr(m, attr), conv)) for n, m in layers.items()
               for attr, conv in norm_protocol(m).routed_calls if hasattr(m, attr)]
    snap = capture_state(model)
    try:
        with isolated_rng(), discarded_event_storage(), patched_instance_attrs(patches):
            for b in batches:
                calls.clear()
                current["images"] = roi_images(b)
                forward_fn(model, b)
            if inference_fn is not None and roi:
                current.update(phase="inference", images=0)
                model.eval()  # restore_state puts every module's `training` back (and the statistics buffers)
                for n in roi:  # batch-statistics inference of the head norms: each image's RoIs normalized by their own
                    layers[n].train()
                for b in batches:
                    inference_fn(model, b)
    finally:
        restore_state(model, snap)
    out = {}
    for n in layers:
        per = sums[n]
        if not per:
            continue
        n_all = sum(v[0] for v in per.values())
        mean = sum(v[1] for v in per.values()) / n_all
        var = sum(v[2] for v in per.values()) / n_all - mean * mean
        res = {"calls": len(per)}
        if len(per) > 1:
            sigma = float(var.clamp(min=0).sqrt().norm())
            sd, scale = var.clamp(min=0).sqrt(), max(sigma, 1e-12)
            # per call (level / domain) in call order, and each call's share of the layer's elements (a far-off
            # level that holds few elements weighs little in the loss); the maxima are the reported divergences
            order = sorted(per)
            means = [per[j][1] / per[j][0] for j in order]
            stds = [(per[j][2] / per[j][0] - m * m).clamp(min=0).sqrt() for j, m in zip(order, means)]
            res["per_call"] = {
                "mean_shift": [float((m - mean).norm()) / scale for m in means],
                "std_shift": [float((s - sd).norm()) / scale for s in stds],
                "element_share": [per[j][0] / n_all for j in order],
            }
            res["level_divergence"] = max(res["per_call"]["mean_shift"])
            res["level_std_divergence"] = max(res["per_call"]["std_shift"])
        if roi.get(n):
            res["roi_within_image"] = sum(roi[n]) / len(roi[n])
        if roi_calls["inference"].get(n):
            res.update(_inference_shift(roi_calls["train"][n], roi_calls["inference"][n]))
        out[n] = res
    return out


def _pooled(calls: List[tuple]):
    n = sum(c[1] for c in calls)
    mean = sum(c[2] for c in calls) / n
    return mean, (sum(c[3] for c in calls) / n - mean * mean).clamp(min=0).sqrt()


def _inference_shift(train: List[tuple], inference: List[tuple]) -> Dict[str, float]:
    """The module docstring's ``inference_*`` / ``training_*`` quantities from per-call (RoIs, elements, Σx, Σx²)
    of the training and the inference forwards."""
    mu, sigma = _pooled(train)
    scale = max(float(sigma.norm()), 1e-12)
    mu_inf, sigma_inf = _pooled(inference)

    def spread(calls):
        per = [_pooled([c]) for c in calls]
        return (sum(float((m - mu).norm()) for m, _ in per) / len(per) / scale,
                sum(float((s - sigma).norm()) for _, s in per) / len(per) / scale)

    (tm, ts), (im, is_) = spread(train), spread(inference)
    return {"inference_mean_shift": float((mu_inf - mu).norm()) / scale,
            "inference_std_shift": float((sigma_inf - sigma).norm()) / scale,
            "inference_batch_mean_spread": im, "inference_batch_std_spread": is_,
            "training_batch_mean_spread": tm, "training_batch_std_spread": ts,
            "inference_rois": sum(c[0] for c in inference) / len(inference),
            "training_rois": sum(c[0] for c in train) / len(train)}


def _buffer_checks(model: nn.Module) -> Dict[str, dict]:
    out = {}
    for n, m in model.named_modules():
        stats = _ema_stats(m)
        if not stats:
            continue
        nonfinite = any(not torch.isfinite(t).all() for pair in stats for t in pair)
        second = max(float((var.clamp(min=0) + mean * mean).max()) for mean, var in stats) if not nonfinite else math.inf
        out[n] = {"nonfinite": nonfinite, "second_moment_max": second}
    return out


def _ema_stats(module: nn.Module):
    """The layer's inference statistics as ``[(mean, var)]`` per slot: its protocol's ``estimated_stats``, or,
    for a layer that keeps no mean/variance pair (MABN: χ̂ = sqrt(E[x²] + ε), no centering), its stats adapter's
    EMA with mean 0 and var = σ² (so ||σ|| is ||χ̂||, MABN's normalizer); None when it has neither."""
    from .layers.protocol import norm_protocol

    view = norm_protocol(module)
    if view is None:
        return None
    stats = view.estimated_stats()
    if stats:
        return stats
    adapter = view.stats_adapter()
    if adapter is None:
        return None
    out = []
    for slot in range(adapter.num_slots):
        mean, sigma = adapter.ema_stats(slot)
        out.append((torch.zeros_like(sigma) if mean is None else mean, sigma * sigma))
    return out


def _one_image_at_a_time(model: nn.Module, batch: Any) -> None:
    """Inference as detectron2's test loop runs it: one image per forward (rethinking Table 3: "all models take
    one image at a time")."""
    for x in batch if isinstance(batch, (list, tuple)) else [batch]:
        model([x])


def measure(model: nn.Module, data: Iterable, num_batches: int,
            forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
            roi_images: Callable[[Any], int] = lambda b: len(b) if isinstance(b, (list, tuple)) else 0,
            inference_fn: Optional[Callable[[nn.Module, Any], Any]] = _one_image_at_a_time
            ) -> Dict[str, Dict[str, float]]:
    """``{layer: {quantity: value}}`` (module docstring) of ``model`` (training mode for its norm layers) on
    ``num_batches`` batches of ``data``; ``inference_fn(model, batch)`` runs a batch's images as inference does
    (the model in eval mode; None: no inference measurement). The model is left unchanged."""
    from .stats.monitor import bn_statistics_gaps
    from .stats.passes import unwrap_model
    from .stats.probe import probed_layers

    net = unwrap_model(model)
    forward_fn = forward_fn or (lambda m, b: m(b))
    batches = []
    it = iter(data)
    for _ in range(num_batches):
        try:
            batches.append(next(it))
        except StopIteration:
            break
    out: Dict[str, Dict[str, float]] = {}
    for n, res in _buffer_checks(net).items():
        out.setdefault(n, {}).update(res)
    buffers_ok = all(not r["nonfinite"] for r in out.values())
    if buffers_ok:  # the statistics passes compare against the EMA: meaningless with NaN in it
        gaps = bn_statistics_gaps(net, batches, len(batches), forward_fn=forward_fn)
        for n, g in gaps.items():
            r = out.setdefault(n, {})
            r.update(g)
            pop_sigma = None
            stats = _ema_stats(dict(net.named_modules())[n])
            if stats:
                pop_sigma = float(torch.cat([v.clamp(min=0).sqrt() for _, v in stats]).norm())
            if pop_sigma:
                for k in ("batch_mean_spread", "batch_std_spread", "mean_gap", "std_gap", "moving_std_gap"):
                    if k in g:
                        r["rel_" + k] = g[k] / pop_sigma
    layers = probed_layers(net)
    for n, res in _per_call_moments(net, batches, layers, forward_fn, roi_images, inference_fn).items():
        out.setdefault(n, {}).update(res)
    return out


def diagnose_measured(measured: Dict[str, Dict[str, float]], amp: bool = False) -> List[Finding]:
    """Findings from :func:`measure`'s numbers (thresholds :data:`THRESHOLDS`), each naming the layers, the
    paper section and the calibrate_bn candidates expected to help."""
    t = THRESHOLDS
    out: List[Finding] = []
    bad = [n for n, r in measured.items() if r.get("nonfinite")]
    if bad:
        out.append(Finding("nonfinite_buffers", "error", "rethinking A.10",
                           f"{len(bad)} layer(s) hold non-finite population statistics, e.g. {bad[:3]}",
                           "recompute them (tools/recompute_bn_stats.py) or retrain from an earlier checkpoint",
                           bad))
    big = [n for n, r in measured.items() if r.get("second_moment_max", 0) > FP16_MAX and not r.get("nonfinite")]
    if big:
        out.append(Finding("fp16_overflow", "warning" if amp else "info", "pytorch #96798",
                           f"{len(big)} layer(s) whose inputs have E[x^2] > {FP16_MAX:g} (x^2 overflows float16), "
                           f"e.g. {big[:3]}", "keep their statistics in float32 (d2norm layers do, stat_dtype); do "
                           "not cast BN buffers to half", big))
    lag = [n for n, r in measured.items()
           if "mean_gap" in r and r.get("batch_mean_spread", 0) > 0
           and r["mean_gap"] > t["ema_outside_batches"] * r["batch_mean_spread"]]
    if lag:
        out.append(Finding("ema_outside_batches", "warning", "rethinking §3.1, Fig. 2",
                           f"{len(lag)} layer(s) whose EMA mean is farther from the current model's population "
                           f"mean than its mini-batch means are (e.g. {lag[:3]}): the EMA averages old models",
                           "calibrate_bn candidates: precise_bn (PreciseBN, rethinking §3.2)", lag))
    tt = [n for n, r in measured.items()
          if max(r.get("rel_batch_std_spread", 0), r.get("rel_batch_mean_spread", 0)) > t["train_test"]]
    if tt:
        out.append(Finding("train_test_inconsistency", "warning", "rethinking §4, Fig. 5; evalnorm §3.2",
                           f"{len(tt)} layer(s) train with batch statistics more than {t['train_test']:g} "
                           f"||sigma|| away from the population statistics they are evaluated with (e.g. {tt[:3]})",
                           "calibrate_bn candidates: example_weighing (four-things §3.1), evalnorm_rule / "
                           "evalnorm_offline (evalnorm §3.4), batch_stats_heads (rethinking §4.2)", tt))
    lv = [n for n, r in measured.items() if r.get("level_divergence", 0) > t["level_divergence"]]
    if lv:
        out.append(Finding("level_divergence", "warning", "rethinking §5.2, Table 5",
                           f"{len(lv)} layer(s) called once per FPN level whose per-level means differ by more than "
                           f"{t['level_divergence']:g} ||sigma|| from the pooled mean (e.g. {lv[:3]}): one set of "
                           f"statistics for all levels misfits each", "train the head with per-level statistics "
                           "(DomainBNRetinaNet, D2NORM.RETINANET_HEAD rows 4/6); calibrate_bn: per_level_heads", lv))
    roi = [n for n, r in measured.items() if r.get("roi_within_image", 0) > t["roi_within_image"]]
    if roi:
        out.append(Finding("roi_within_image", "warning", "rethinking §6.1, Fig. 9, Table 6",
                           f"{len(roi)} R-CNN head norm(s) whose input varies mostly between images, not between "
                           f"the RoIs of one image (e.g. {roi[:3]}): few images per batch leak information",
                           "train with ShuffledConvFCHead or SyncBN in the heads; calibrate_bn: batch_stats_heads",
                           roi))
    inf = [n for n, r in measured.items() if "inference_batch_mean_spread" in r and any(
        r[f"inference_batch_{k}_spread"] > max(t["inference_batch"],
                                               INFERENCE_OVER_TRAINING * r[f"training_batch_{k}_spread"])
        for k in ("mean", "std"))]
    if inf:
        out.append(Finding("inference_roi_shift", "info", "rethinking §4.2, below Table 3",
                           f"{len(inf)} R-CNN head norm(s) whose inference RoI batches (one image's proposals, no "
                           f"sampling) are farther from the training RoIs' statistics than the training batches are "
                           f"(e.g. {inf[:3]}): batch statistics at inference normalize a distribution the head did "
                           f"not train on", "do not assume Table 3's gain: compare batch_stats_heads with the EMA "
                           "on a calibration split (calibrate_bn)", inf))
    return out
