#!/usr/bin/env python
"""Choose a trained model's inference statistics on a calibration split of the *training* set (never the test
set): every candidate the model can take — the EMA, PreciseBN with several B and N (rethinking §3.2), example
weighing α (four-things §3.1, eq 3), EvalNorm's 1/B² rule and offline fit (evalnorm §3.4, §4.1), batch statistics
in the R-CNN heads (rethinking §4.2) — is evaluated (COCO AP) on the calibration split, the best is written as its
own checkpoint + config (never over the training run's files), and evaluated once on the test set. Candidates the
model cannot take are listed with the reason. Logic: d2norm.calibrate.

    python tools/calibrate_bn.py --config-file configs/cpu/faster_rcnn_R18_FPN_ghostbn.yaml \\
        --weights output/.../model_final.pth --calib-size 50 --calib-seed 0

Writes <name>.pth, <name>.yaml (evaluate with train_net.py --eval-only --config-file <name>.yaml), <name>.json
(every candidate's AP, the split, the choice, the test AP) and <name>.png into --output-dir (default
<OUTPUT_DIR>/calibrate_bn); <name> defaults to <source checkpoint's name>_calibrated.
"""
import os
import sys

import d2norm  # noqa: F401  (compat + registrations)
from d2norm.engine import cli as tc

DEFAULT_ALPHAS = (0.05, 0.1, 0.2, 0.5)
DEFAULT_PRECISE_B = (2, 8, 32)


def build_parser():
    p = tc.base_parser(__doc__)
    p.add_argument("--dataset", help="training dataset the split is drawn from (default: the cfg's first "
                                     "DATASETS.TRAIN)")
    p.add_argument("--calib-size", type=tc.positive_int, default=50, help="images in the calibration split")
    p.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration split")
    p.add_argument("--alphas", nargs="+", type=float, default=list(DEFAULT_ALPHAS),
                   help=f"example weights alpha in (0, 1] (default {' '.join(map(str, DEFAULT_ALPHAS))})")
    p.add_argument("--precise-batch-sizes", nargs="+", type=tc.positive_int, default=list(DEFAULT_PRECISE_B),
                   help="PreciseBN's B values (default 2 8 32; rethinking Table 2)")
    p.add_argument("--precise-num-samples", type=tc.positive_int,
                   help="PreciseBN's N (default D2NORM.PRECISE_BN.NUM_SAMPLES, at most the rest of the training set)")
    p.add_argument("--offline-iters", type=tc.positive_int,
                   help="EvalNorm offline fit iterations (default D2NORM.EVALNORM.OFFLINE_ITERS)")
    p.add_argument("--train-batch", type=tc.positive_int,
                   help="images per process in training, the B of EvalNorm's 1/B^2 rule where a layer does not fix "
                        "it (default SOLVER.IMS_PER_BATCH)")
    p.add_argument("--candidates", nargs="+", help="only these candidate kinds (default: all the model can take)")
    p.add_argument("--test-dataset", help="test set for the chosen candidate (default: the cfg's first DATASETS.TEST)")
    p.add_argument("--no-test", action="store_true", help="do not evaluate the choice on the test set")
    p.add_argument("--oracle", action="store_true",
                   help="after the choice, also evaluate every candidate on the test set (reported as 'oracle', for "
                        "studying the calibration itself; never used for the choice)")
    p.add_argument("--output-name", help="output name without extension (default <source>_calibrated)")
    return p


def run(args):
    from detectron2.data import DatasetCatalog

    from d2norm import calibrate as cal
    from d2norm.options import Number

    cfg = tc.load_cfg(args.config_file, args.opts)
    for a in args.alphas:
        Number(0, 1, low_open=True)("--alphas", a)
    train = tc.prepare_dataset(cfg, args.dataset or tc.first(cfg.DATASETS.TRAIN))
    test = None if args.no_test else tc.first(cfg.DATASETS.TEST) if not args.test_dataset else args.test_dataset
    if not args.no_test and not test:
        raise tc.ToolError("no test dataset (DATASETS.TEST is empty): pass --test-dataset or --no-test")
    out_dir = tc.output_dir(args, cfg, "calibrate_bn")
    name = args.output_name or f"{tc.source_stem(args.weights or cfg.MODEL.WEIGHTS)}_calibrated"
    tc.claim_outputs([os.path.join(out_dir, f"{name}{ext}") for ext in (".pth", ".yaml", ".json", ".png")],
                     args.overwrite)
    try:
        calib, rest, calib_ids = cal.calibration_split(train, args.calib_size, args.calib_seed)
    except ValueError as e:
        raise tc.ToolError(str(e)) from None
    rest_size = len(DatasetCatalog.get(rest))
    n = min(args.precise_num_samples or cfg.D2NORM.PRECISE_BN.NUM_SAMPLES, rest_size)
    precise = [(b, n) for b in sorted(set(args.precise_batch_sizes)) if b <= n]

    model, source = tc.load_model(cfg, args.weights, return_checkpoint=True)
    cands, skipped = cal.candidates(model, args.alphas, precise)
    if args.candidates:
        unknown = sorted(set(args.candidates) - set(cal.KINDS))
        if unknown:
            raise tc.ToolError(f"--candidates: unknown kind(s) {', '.join(unknown)}; known: {', '.join(cal.KINDS)}")
        cands = [c for c in cands if c.kind in args.candidates]
        if not cands:
            raise tc.ToolError(f"--candidates {' '.join(args.candidates)}: none applies to this model "
                               f"({'; '.join(f'{k}: {r}' for k, r in skipped.items())})")
    for kind, reason in skipped.items():
        print(f"not a candidate: {kind}: {reason}", flush=True)
    print(f"calibration split: {len(calib_ids)} images of {train!r} (seed {args.calib_seed}); statistics from the "
          f"other {rest_size}; {len(cands)} candidates", flush=True)

    train_batch = args.train_batch or cfg.SOLVER.IMS_PER_BATCH
    iters = args.offline_iters or cfg.D2NORM.EVALNORM.OFFLINE_ITERS
    loader = lambda b: tc.train_style_loader(cfg, rest, b, seed=args.calib_seed)  # noqa: E731
    results, infos, models = {}, {}, {}
    for c in cands:  # selection: the calibration split only
        m, info = cal.apply_candidate(model, c, cfg, loader, train_batch, iters, cfg.D2NORM.EVALNORM.OFFLINE_LR)
        res = tc.evaluate(cfg, m, calib, os.path.join(out_dir, "inference", c.name))
        results[c.name], infos[c.name], models[c.name] = res, info, m
        print(f"{c.name}: calibration AP = {tc.main_metric(res):.4f}", flush=True)
    order = [c.name for c in cands]
    best_name = cal.choose({k: tc.main_metric(v) for k, v in results.items()}, order)
    best = next(c for c in cands if c.name == best_name)
    chosen, info = models[best_name], infos[best_name]
    print(tc.format_table(["candidate", "AP", "AP50", "AP75"], [
        [c.name + (" (chosen)" if c.name == best_name else ""),
         *(results[c.name].get("bbox", {}).get(k, float("nan")) for k in ("AP", "AP50", "AP75"))] for c in cands]))

    inference_only = (f"{len(info['converted'])} layer(s) converted for {best_name}; evaluate with {name}.yaml"
                      if info["converted"] else None)
    split = {"dataset": train, "size": len(calib_ids), "seed": args.calib_seed, "image_ids": calib_ids,
             "statistics_from": rest, "statistics_images": rest_size}
    path = tc.save_checkpoint(chosen, out_dir, name, source=source, inference_only=inference_only,
                              calibrate_bn={"chosen": best_name, "split": {k: v for k, v in split.items()
                                                                            if k != "image_ids"}})
    yaml_cfg, kept = cal.candidate_cfg(cfg, best, path, info)
    yaml_path = os.path.join(out_dir, f"{name}.yaml")
    if tc.is_main_process():
        with open(yaml_path, "w") as f:
            f.write(yaml_cfg.dump())
    if kept:
        print(f"note: {', '.join(kept)} keep their name in {name}.yaml (no registered-name equivalent)", flush=True)

    test_res = None
    if test:  # the test set, once, for the chosen candidate only
        test = tc.prepare_dataset(cfg, test)
        test_res = tc.evaluate(cfg, chosen, test, os.path.join(out_dir, "inference", f"test_{best_name}"))
        print(f"chosen {best_name}: test AP ({test}) = {tc.main_metric(test_res):.4f}", flush=True)
    oracle = None
    if test and args.oracle:  # after the choice is fixed and written: for studying calibrate_bn, not for choosing
        oracle = {c.name: (test_res if c.name == best_name else
                           tc.evaluate(cfg, models[c.name], test, os.path.join(out_dir, "inference", f"oracle_{c.name}")))
                  for c in cands}
    report = {"oracle": oracle, "split": split, "candidates": order, "not_candidates": skipped, "chosen": best_name,
              "calibration": results, "calibration_ap": {k: tc.main_metric(v) for k, v in results.items()},
              "converted": info["converted"], "checkpoint": path, "config": yaml_path,
              "test_dataset": test, "test": test_res, "train_batch": train_batch}
    _plot(report, os.path.join(out_dir, f"{name}.png"))
    tc.write_json(os.path.join(out_dir, f"{name}.json"), report)
    print(f"wrote {path}, {yaml_path} and {name}.json / .png", flush=True)
    return report


def _plot(report: dict, path: str) -> None:
    if not tc.is_main_process():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["candidates"]
    aps = [report["calibration_ap"][n] for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 1), 3.2))
    colours = ["tab:orange" if n == report["chosen"] else "tab:blue" for n in names]
    ax.bar(range(len(names)), [a if a == a else 0.0 for a in aps], color=colours)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("calibration AP")
    ax.set_title(f"calibrate_bn: {report['split']['size']} calibration images (seed {report['split']['seed']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    return tc.run_tool(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
