#!/usr/bin/env python
"""End-to-end speed of the detectors with each registered norm in the backbone, as ratios vs the same model
with BN; folded models (d2norm.deploy.fold_norms) vs BN; and PreciseBN's cost as a share of a schedule.

Models: the main job (Faster R-CNN R18-FPN, ``configs/cpu/faster_rcnn_R18_FPN_ghostbn.yaml``) and RetinaNet
R18-FPN (``configs/cpu/retinanet_R18_ghostbn.yaml``) with ``MODEL.RESNETS.NORM`` = each name (MABN with its
weight-centralized backbone), plus ``none`` (no norm: the bound a folded model can reach). Synthetic 128 px
images with random boxes. Training = forward + losses (EvalNorm's aux loss included) + backward + SGD step at
``SOLVER.IMS_PER_BATCH``; inference = ``model.eval()`` on one image at a time. A folded model is compared with
the norm-free one on the backbone alone (where the norms were): the rest of a detector's inference depends on
its scores — how many boxes pass the RPN and box-head thresholds —, which differ between two such models.
All variants of a model are timed interleaved in the same rounds (in a shuffled order per round), one call each
per round; a ratio is the median over the rounds of the per-round ratio (the pair was measured seconds apart, in
the same machine state), reported with its interquartile range, and the best-of-rounds ratio is kept in the JSON
too. The clock is this process's CPU time (``time.process_time``), which other load on a shared machine does not
inflate.
``--image-size`` changes the (square) image size: the per-layer and weight-side costs of a norm are fixed while
the convolutions grow with the image, so the ratios depend on it (the CPU configs train at 128 px, COCO at ~800).

PreciseBN (rethinking §3.2) cost, with f = train-mode forward time per image at batch B (no backward) and
g = training time per image:

    cost = passes · N · f / (MAX_ITER · IMS_PER_BATCH · g),   passes = ⌊MAX_ITER / PERIOD⌋ + 1 (PERIOD > 0), else 1

(both sides scale the same way with the number of workers: N and IMS_PER_BATCH count images over all ranks).

    python tools/benchmark_models.py --json out/bench_models.json [--fold] [--norms BN GhostBN ...]
"""
import argparse
import copy
import datetime
import json
import os
import sys
import time

import d2norm
import torch
from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from d2norm.deploy import fold_norms
from d2norm.layers import NORM_REGISTRY, build_model
from d2norm.layers.evalnorm import evalnorm_aux_loss

from benchmark_norms import paired_ratio, quantiles, round_order  # noqa: E402  (tools/ is on sys.path when run)

MODELS = {
    "faster_rcnn_R18_FPN": ("configs/cpu/faster_rcnn_R18_FPN_ghostbn.yaml", "build_mabn_resnet_fpn_backbone"),
    "retinanet_R18_FPN": ("configs/cpu/retinanet_R18_ghostbn.yaml", "build_mabn_retinanet_resnet_fpn_backbone"),
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: backbone calls per timed sample of the folded-vs-norm-free comparison (one call is ~10-25 ms at 128 px: several
#: per sample average the per-call jitter that a 2% comparison cannot afford)
BACKBONE_CALLS = 5


def model_cfg(config: str, norm: str, mabn_backbone: str, image_size=None):
    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.merge_from_file(os.path.join(ROOT, config))
    if image_size is not None:  # square synthetic images of this size, train and test
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (image_size,), image_size
        cfg.INPUT.MIN_SIZE_TEST = cfg.INPUT.MAX_SIZE_TEST = image_size
    cfg.MODEL.RESNETS.NORM = "" if norm == "none" else norm
    cfg.D2NORM.DOMAIN_BN.NUM_DOMAINS = 1  # one domain in a backbone
    if norm == "MABN":
        cfg.MODEL.BACKBONE.NAME = mabn_backbone
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _batch(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        inst = Instances((size, size))
        xy = torch.rand(3, 2, generator=g) * size * 0.6
        wh = torch.rand(3, 2, generator=g) * size * 0.3 + 8
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, 3, (3,), generator=g)
        out.append({"image": torch.rand(3, size, size, generator=g) * 255, "height": size, "width": size,
                    "instances": inst})
    return out


def _steps(model, cfg):
    size = cfg.INPUT.MIN_SIZE_TEST
    train_batch = _batch(cfg.SOLVER.IMS_PER_BATCH, size, 0)
    fwd_batch = _batch(cfg.D2NORM.PRECISE_BN.BATCH_SIZE, size, 1)
    test_image = [{k: v for k, v in _batch(1, size, 2)[0].items() if k != "instances"}]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)

    def train_step():
        model.train()
        losses = model(train_batch)
        loss = sum(losses.values()) + evalnorm_aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def infer_step():
        model.eval()
        with torch.no_grad():
            model(test_image)

    def stats_forward():  # one PreciseBN batch: train-mode forward, no backward
        model.train()
        with torch.no_grad():
            model(fwd_batch)
        evalnorm_aux_loss(model)

    def backbone_step():  # inference of the backbone alone (where the norms are), on the preprocessed test image
        model.eval()
        with torch.no_grad():
            images = model.preprocess_image(test_image).tensor
            for _ in range(BACKBONE_CALLS):
                model.backbone(images)

    return {"train": train_step, "infer": infer_step, "stats_fwd": stats_forward, "backbone": backbone_step}


def bench_model(name, norms, rounds, fold, image_size=None):
    config, mabn_backbone = MODELS[name]
    variants = {}
    for norm in ["BN", "none"] + [n for n in norms if n != "BN"]:
        cfg = model_cfg(config, norm, mabn_backbone, image_size)
        torch.manual_seed(0)
        model = build_model(cfg)
        variants[norm] = (model, cfg)
        if fold and norm != "none":
            folded = copy.deepcopy(model).eval()
            report = fold_norms(folded)
            if report.converted:
                variants[norm + "+fold"] = (folded, cfg, report)
    steps = {}
    for key, v in variants.items():
        model, cfg = v[0], v[1]
        s = _steps(model, cfg)
        if key.endswith("+fold"):
            s = {"infer": s["infer"], "backbone": s["backbone"]}  # folding is an inference transform
        elif key != "BN":
            s.pop("stats_fwd")
        if key != "none" and not key.endswith("+fold"):
            s.pop("backbone")  # only the fold comparison needs it
        steps[key] = s
        for fn in s.values():
            fn()  # warm-up
    times = {key: {k: [] for k in s} for key, s in steps.items()}
    for rnd in range(rounds):
        for key in round_order(steps, rnd):
            for k, fn in steps[key].items():
                start = time.process_time()
                fn()
                times[key][k].append(time.process_time() - start)
    bn = times["BN"]
    best = {key: {k: min(t) for k, t in kinds.items()} for key, kinds in times.items()}
    cfg = variants["BN"][1]
    out = {"config": config, "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH, "image_size": cfg.INPUT.MIN_SIZE_TEST,
           "rounds": rounds,
           "BN": {"train_it_s": 1 / best["BN"]["train"], "infer_img_s": 1 / best["BN"]["infer"],
                  "train_s_median": quantiles(bn["train"])[0], "infer_s_median": quantiles(bn["infer"])[0]},
           "norms": {}}
    for key, t in times.items():
        if key == "BN":
            continue
        r = paired_ratio(bn["infer"], t["infer"])
        row = {"infer_ratio": r["median"], "infer_ratio_iqr": r["iqr"], "infer_ratio_best": r["best"],
               "infer_img_s": 1 / best[key]["infer"]}
        if "train" in t:
            r = paired_ratio(bn["train"], t["train"])
            row.update(train_ratio=r["median"], train_ratio_iqr=r["iqr"], train_ratio_best=r["best"],
                       train_it_s=1 / best[key]["train"])
        if key.endswith("+fold"):
            report = variants[key][2]
            row.update(folded=len(report.converted), not_folded=len(report.skipped))
            if "none" in times:
                # backbone alone: the rest of the detector's inference depends on its scores (how many boxes
                # pass the RPN / box-head thresholds), which differ between a folded and a norm-free model
                r = paired_ratio(times["none"]["backbone"], t["backbone"])
                row.update(infer_vs_no_norm=r["median"], infer_vs_no_norm_iqr=r["iqr"],
                           infer_vs_no_norm_best=r["best"])
        out["norms"][key] = row
    # PreciseBN cost (module docstring): f per image at batch B, g per image at IMS_PER_BATCH
    f = best["BN"]["stats_fwd"] / cfg.D2NORM.PRECISE_BN.BATCH_SIZE
    g = best["BN"]["train"] / cfg.SOLVER.IMS_PER_BATCH
    out["precise_bn"] = {"forward_s_per_image": f, "train_s_per_image": g,
                         "num_samples": cfg.D2NORM.PRECISE_BN.NUM_SAMPLES,
                         "batch_size": cfg.D2NORM.PRECISE_BN.BATCH_SIZE, "schedules": {}}
    return out


def precise_bn_cost(f, g, num_samples, max_iter, ims_per_batch, period):
    passes = (max_iter // period + 1) if period > 0 else 1
    return {"max_iter": max_iter, "ims_per_batch": ims_per_batch, "period": period, "passes": passes,
            "cost_percent": 100.0 * passes * num_samples * f / (max_iter * ims_per_batch * g)}


def fmt_ratio(row, key, digits=2):
    """``median [q25–q75]`` of a ratio row entry."""
    lo, hi = row[key + "_iqr"]
    return f"{row[key]:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--norms", nargs="*", default=None, help="registered names (default: all) besides BN")
    p.add_argument("--rounds", type=int, default=15,
                   help="interleaved rounds; ratios are the median of the per-round ratios (with their IQR)")
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="square image size for training and inference (default: the config's, 128)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--fold", action="store_true", help="also time each model with its norms folded")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    registered = sorted(k for k, _ in NORM_REGISTRY)
    norms = registered if args.norms is None else args.norms
    bad = sorted(set(norms) - set(registered) - {"BN", "FrozenBN", "GN"})
    if bad or args.rounds < 1 or args.threads < 1 or (args.image_size is not None and args.image_size < 32):
        p.error(f"unknown norm(s) {bad} (registered: {registered}, or BN/FrozenBN/GN)" if bad
                else f"--rounds and --threads must be >= 1 and --image-size >= 32, got {args.rounds}, "
                     f"{args.threads}, {args.image_size}")
    torch.set_num_threads(args.threads)
    load = [os.getloadavg()[0]]
    results = {}
    for name in args.models:
        with EventStorage(0):  # detectron2's losses log into an event storage
            r = bench_model(name, norms, args.rounds, args.fold, args.image_size)
        pb = r["precise_bn"]
        f, g = pb["forward_s_per_image"], pb["train_s_per_image"]
        # detectron2's COCO 1x: 90k iterations of 16 images; D2NORM.PRECISE_BN.PERIOD -1 = TEST.EVAL_PERIOD
        # (detectron2 default 0: after the last iteration only), and the common EVAL_PERIOD 5000
        for tag, max_iter, ims, period in (("coco_90k_default_period", 90000, 16, 0),
                                           ("coco_90k_eval_period_5000", 90000, 16, 5000),
                                           ("cpu_demo_1000_period_250", 1000, 4, 250)):
            pb["schedules"][tag] = precise_bn_cost(f, g, pb["num_samples"], max_iter, ims, period)
        results[name] = r
        print(f"{name}: BN train {r['BN']['train_it_s']:.2f} it/s, inference {r['BN']['infer_img_s']:.1f} img/s "
              f"(threads={args.threads}, load {os.getloadavg()[0]:.1f})")
        print(f"  {'norm':<22}{'train vs BN [IQR]':>22}{'infer vs BN [IQR]':>22}   (median of {args.rounds} "
              f"per-round ratios)")
        for key, row in r["norms"].items():
            t = fmt_ratio(row, "train_ratio") if "train_ratio" in row else "-"
            extra = f"  (vs no-norm model {fmt_ratio(row, 'infer_vs_no_norm', 3)})" if "infer_vs_no_norm" in row else ""
            print(f"  {key:<22}{t:>22}{fmt_ratio(row, 'infer_ratio'):>22}{extra}")
        for tag, c in pb["schedules"].items():
            print(f"  PreciseBN N={pb['num_samples']} B={pb['batch_size']} on {tag}: {c['passes']} pass(es), "
                  f"{c['cost_percent']:.4f}% of training")
    load.append(os.getloadavg()[0])
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        doc = {"tool": "benchmark_models",
               "command": "python tools/benchmark_models.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "torch": torch.__version__, "threads": args.threads, "rounds": args.rounds, "clock": "process",
               "image_size": args.image_size,
               "loadavg_1min": load, "models": results}
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
