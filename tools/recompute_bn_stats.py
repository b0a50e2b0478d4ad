#!/usr/bin/env python
"""Recompute the population statistics of a checkpoint (PreciseBN, rethinking §3.2, A.2, A.3) on any registered
dataset and write a new checkpoint.

* a different domain: ``--dataset <target>`` recomputes the statistics on the target domain ("Adaptive BN",
  rethinking §5.1, Table 4); ``--forward inference`` runs the model's inference path (no annotations needed)
  with only the norm layers collecting statistics;
* every layer with population statistics is handled, including the per-level / shared layouts of d2norm's
  RetinaNet head (rethinking Table 5 rows 2 and 4: one set per FPN level or one shared set, whatever the
  checkpoint's DomainBN layers define), computed on the inference path (each level normalized with its own
  statistics unless the layout shares both; row 2 needs this recomputation); frozen layers are untouched;
* ``--eval``: COCO AP before and after (on ``--eval-dataset``, default the cfg's first test set);
* output: ``<OUTPUT_DIR>/recompute_bn_stats/<source>_precise_bn_<dataset>.pth`` (+ ``.json``) unless
  ``--output-dir`` / ``--output-name``; an existing output is an error unless ``--overwrite``; the new checkpoint keeps the source's
  iteration and trainer state (optimizer, scheduler), and no ``last_checkpoint`` is ever written, so
  ``train_net.py --resume`` of the training run continues from its own last checkpoint;
* a batch with NaN/Inf statistics stops the tool naming the layer and the batch (``--nonfinite skip`` leaves
  it out instead); a checkpoint that does not fit the cfg's model (missing or mismatched parameters, e.g.
  another architecture) is an error.

Example:
    python tools/recompute_bn_stats.py --config-file configs/cpu/retinanet_R18_ghostbn.yaml \\
        --weights output/cpu/retinanet_R18_ghostbn/model_final.pth --num-samples 400 --batch-size 32 --eval
"""
import os
import sys

import d2norm  # noqa: F401  (compat + registrations)
from d2norm.engine import cli as tc
from d2norm.engine.hooks import PreciseBNSpec
from d2norm.stats import ESTIMATORS, NONFINITE_POLICIES, population_stat_layers


def build_parser():
    p = tc.base_parser(__doc__)
    p.add_argument("--dataset", help="registered dataset the statistics are computed on (default: the cfg's "
                   "first DATASETS.TRAIN); a target-domain dataset gives Adaptive BN (rethinking §5.1)")
    p.add_argument("--num-samples", type=tc.positive_int, help="N images (default D2NORM.PRECISE_BN.NUM_SAMPLES)")
    p.add_argument("--batch-size", type=tc.positive_int, help="B images per forward (default D2NORM.PRECISE_BN.BATCH_SIZE)")
    p.add_argument("--estimator", choices=ESTIMATORS, help="eq 2 'population' or eq 3 (default: the cfg's)")
    p.add_argument("--exact-layerwise", action="store_true", help="rethinking A.3 exact layer-wise estimation")
    p.add_argument("--nonfinite", choices=NONFINITE_POLICIES,
                   help="a batch with NaN/Inf statistics in some layer: 'error' (stop, naming the layer and the "
                   "batch; nothing written) or 'skip' (leave it out of that layer's estimate, listed in the report); "
                   "default D2NORM.PRECISE_BN.NONFINITE ('error')")
    p.add_argument("--forward", choices=tc.FORWARD_MODES, default="train",
                   help="'train': the model's training forward on a training-style loader (needs annotations; "
                   "what the PreciseBN hook does); 'inference': inference path with only the norm layers in "
                   "training mode (unlabeled data; RoI heads then see test-time proposals)")
    tc.add_eval_args(p)
    p.add_argument("--output-name", help="checkpoint name without .pth (default <source checkpoint's name>_"
                   "precise_bn_<dataset>, e.g. model_final_precise_bn_coco_2017_train)")
    return p


@tc.distributed_tool
def run(args):
    cfg = tc.load_cfg(args.config_file, args.opts)
    dataset = tc.prepare_dataset(cfg, args.dataset or tc.first(cfg.DATASETS.TRAIN))
    eval_ds = tc.eval_dataset(args, cfg)
    spec = PreciseBNSpec.from_cfg(cfg, num_samples=args.num_samples, batch_size=args.batch_size,
                                  estimator=args.estimator, exact_layerwise=args.exact_layerwise or None,
                                  nonfinite=args.nonfinite)
    out_dir = tc.output_dir(args, cfg, "recompute_bn_stats")
    name = args.output_name or f"{tc.source_stem(args.weights or cfg.MODEL.WEIGHTS)}_precise_bn_{dataset}"
    tc.claim_outputs([os.path.join(out_dir, f"{name}{ext}") for ext in (".pth", ".json")], args.overwrite)

    model, source = tc.load_model(cfg, args.weights, return_checkpoint=True)
    before = tc.maybe_evaluate(args.eval, cfg, model, eval_ds, out_dir, "before")
    layers = population_stat_layers(model)
    if not layers:
        raise tc.ToolError("the model has no layer with population statistics (nothing to recompute)")
    kinds = {}
    for a in layers.values():
        kinds[type(a.module).__name__] = kinds.get(type(a.module).__name__, 0) + 1
    print(f"PreciseBN on {dataset!r}: {len(layers)} layers ({', '.join(f'{k} x{v}' for k, v in kinds.items())}), "
          f"{spec.describe()}, forward={args.forward}", flush=True)

    if args.forward == "train":
        results = spec.run(model, tc.train_style_loader(cfg, dataset, spec.batch_size, seed=args.seed), progress=True)
    else:
        with tc.norm_layers_training(model):
            results = spec.run(model, tc.test_loader(cfg, dataset), progress=True)
    unseen = [n for n, ests in results.items() if all(e is None for e in ests)]
    if unseen:
        print(f"warning: {len(unseen)} layer(s) saw no data and keep their statistics: {unseen[:5]}", flush=True)
    if results.nonfinite:
        print(f"WARNING: non-finite batch statistics were left out of {len(results.nonfinite)} layer(s) "
              f"(--nonfinite skip): {dict(list(results.nonfinite.items())[:3])}", flush=True)

    info = {"dataset": dataset, "num_samples": spec.num_samples, "batch_size": spec.batch_size,
            "estimator": spec.estimator, "exact_layerwise": spec.exact_layerwise, "forward": args.forward,
            "source": args.weights or cfg.MODEL.WEIGHTS}
    path = tc.save_checkpoint(model, out_dir, name, source=source, precise_bn=info)
    after = tc.maybe_evaluate(args.eval, cfg, model, eval_ds, out_dir, "after")
    report = {**info, "checkpoint": path, "layers": len(results), "nonfinite_skipped": results.nonfinite,
              "samples_seen": {n: [None if e is None else e.count for e in ests] for n, ests in results.items()}}
    tc.record_before_after(report, eval_ds, before, after)
    tc.write_json(os.path.join(out_dir, f"{name}.json"), report)
    print(f"wrote {path}", flush=True)
    return report


def main(argv=None) -> int:
    return tc.run_tool(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
