#!/usr/bin/env python
"""Sweep the inference example weight α on a validation set (four-things §3.1, eq 3, Fig. 1: α is tuned on
validation data, no retraining) and report the AP per α.

The checkpoint's trainable BN-derived layers whose inference is BN (BN, SyncBN, GhostBN, AnySyncBN, one-set
DomainBN) are converted to ExampleWeightedBN (same statistics and affine); existing ExampleWeightedBN layers are
used as they are; detectron2's FrozenBN (no batch statistics in training), EvalNorm and BatchStatsBN (their
inference is not BN's), MABN (no mean centering), BGN (its own D2NORM.BGN.ALPHA) and per-domain DomainBN are
kept, each with the reason printed. Checked before any evaluation; for each α
every such layer is set to it and the model is evaluated with COCO AP. α = 0 is plain BN inference: its AP must
equal the unconverted model's AP (checked; a mismatch is an error). Writes ``<output-dir>/example_weight_sweep.json``
and prints a table.

Example:
    python tools/tune_example_weight.py --config-file configs/cpu/faster_rcnn_R18_FPN_ghostbn.yaml \\
        --weights output/.../model_final.pth --alphas 0 0.05 0.1 0.2 0.5
"""
import os
import sys

import d2norm  # noqa: F401  (compat + registrations)
from d2norm.engine import cli as tc

DEFAULT_ALPHAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def build_parser():
    p = tc.base_parser(__doc__)
    p.add_argument("--alphas", nargs="+", action=tc.NumbersThenOverrides, default=list(DEFAULT_ALPHAS),
                   help=f"alpha values in [0, 1] (0 is always added; default {' '.join(map(str, DEFAULT_ALPHAS))}); "
                        f"KEY VALUE overrides may follow directly or after --")
    p.add_argument("--dataset", help="validation dataset (default: the cfg's first DATASETS.TEST)")
    p.add_argument("--output-name", default="example_weight_sweep", help="JSON name without .json")
    return p


def run(args):
    from d2norm.layers.example_weighted_bn import ExampleWeightedBatchNorm2d

    cfg = tc.load_cfg(args.config_file, args.opts)
    alphas = sorted({ExampleWeightedBatchNorm2d.check_alpha(a) for a in list(args.alphas) + [0.0]})
    dataset = tc.prepare_dataset(cfg, args.dataset or tc.first(cfg.DATASETS.TEST))
    out_dir = tc.output_dir(args, cfg, "tune_example_weight")
    tc.claim_outputs([os.path.join(out_dir, f"{args.output_name}.json")], args.overwrite)
    model = tc.load_model(cfg, args.weights)

    # decided before any evaluation: BN-derived layers whose inference is BN (BN, GhostBN, AnySyncBN, one-set
    # DomainBN) become ExampleWeightedBN; ExampleWeightedBN layers are used as they are
    to_convert, kept = tc.conversion_plan(model, "ExampleWeightedBN", bn_inference_only=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ExampleWeightedBatchNorm2d)}
    if not to_convert and not layers:
        raise tc.ToolError("the model has no layer example weighing (eq 3) applies to (BN-derived layers with BN "
                           "inference, e.g. BN, GhostBN, AnySyncBN, or ExampleWeightedBN); its norm layers: "
                           + ("; ".join(f"{n}: {r}" for n, r in kept.items()) or "none"))
    tc.report_kept(kept, "ExampleWeightedBN")
    base_alpha = {n: m.alpha for n, m in layers.items()}
    for m in layers.values():
        m.alpha = 0.0  # the reference: plain BN inference
    base = tc.evaluate(cfg, model, dataset, os.path.join(out_dir, "inference", "base"))
    print(f"base model (plain BN inference): AP = {tc.main_metric(base):.4f}", flush=True)
    converted = tc.convert_bn_layers(model, "ExampleWeightedBN", cfg, names=to_convert) if to_convert else []
    if converted:
        print(f"converted {len(converted)} layer(s) to ExampleWeightedBN", flush=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ExampleWeightedBatchNorm2d)}

    results = {}
    for a in alphas:
        for m in layers.values():
            m.alpha = a
        res = tc.evaluate(cfg, model, dataset, os.path.join(out_dir, "inference", f"alpha_{a:g}"))
        results[a] = res
        print(f"alpha = {a:g}: AP = {tc.main_metric(res):.4f}", flush=True)
    for n, m in layers.items():
        m.alpha = base_alpha.get(n, 0.0)

    matches = tc.same_results(results[0.0], base)
    best = max(alphas, key=lambda a: (tc.main_metric(results[a]), -a))
    table = tc.format_table(
        ["alpha", "AP", "AP50", "AP75", "note"],
        [[f"{a:g}", *(results[a].get("bbox", {}).get(k, float("nan")) for k in ("AP", "AP50", "AP75")),
          "" if results[a].get("bbox") else "no predictions (the model detected nothing)"] for a in alphas],
    )
    print(table)
    print(f"alpha = 0 reproduces the plain-BN AP: {'yes' if matches else 'NO'}; best alpha: {best:g} "
          f"(set D2NORM.EXAMPLE_WEIGHING.ALPHA {best:g} with NORM ExampleWeightedBN)", flush=True)
    report = {"dataset": dataset, "alphas": alphas, "base": base, "alpha0_matches_base": matches,
              "results": {f"{a:g}": results[a] for a in alphas}, "best_alpha": best,
              "ap": {f"{a:g}": tc.main_metric(results[a]) for a in alphas},
              "layers": sorted(layers), "converted": converted}
    path = tc.write_json(os.path.join(out_dir, f"{args.output_name}.json"), report)
    print(f"wrote {path}", flush=True)
    if not matches:
        raise tc.ToolError(f"alpha = 0 did not reproduce the plain-BN results: {results[0.0]} vs {base}")
    return report


def main(argv=None) -> int:
    return tc.run_tool(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
