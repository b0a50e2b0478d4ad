#!/usr/bin/env python
"""Offline EvalNorm α̂, β̂ for a trained checkpoint (evalnorm §3.4 "Offline estimation"), or the 1/B² rule of
thumb (evalnorm §3.3/§4.1), and write a new checkpoint.

A checkpoint is first converted: its trainable BN-derived layers (BN, SyncBN, GhostBN, AnySyncBN, BatchStatsBN,
ExampleWeightedBN, one-set DomainBN: all BN with population statistics at inference) become EvalNorm layers with
the same affine and statistics (``convert_norm``); detectron2's FrozenBN layers stay frozen; MABN (no mean
centering), BGN (channel-group statistics, its own D2NORM.BGN.ALPHA) and per-domain DomainBN cannot be converted
and are kept (the tool says why). This is checked before any evaluation. α̂, β̂ are then fitted by the
stop-gradient aux loss of eq 9 on training batches (the model's training forward; batch size = the training
normalization batch: a GhostBN layer's SIZE, else SOLVER.IMS_PER_BATCH) with every other parameter and
statistic unchanged. ``--rule [B]`` instead sets α̂ = β̂ = 1/B², B >= 1 (omitted: each layer's training
normalization batch, GhostBN's SIZE or the batch size an EvalNorm layer recorded).
The new checkpoint stores α̂, β̂; a config ``<name>.yaml`` next to it evaluates it (EvalNorm, MODE "offline";
its OUTPUT_DIR is that folder, so ``train_net.py --eval-only`` with it never writes into the training run).
Outputs go to ``<OUTPUT_DIR>/fit_evalnorm/<source>_evalnorm_<method>.*`` unless ``--output-dir`` /
``--output-name``; an existing output is an error unless ``--overwrite``; no ``last_checkpoint`` is written. The
checkpoint keeps the source's iteration; its trainer state too when no layer was converted (α̂, β̂ only
changed), else it is marked ``inference_only`` (the converted layers' new parameters have no optimizer state).

Example:
    python tools/fit_evalnorm.py --config-file configs/cpu/faster_rcnn_R18_FPN_ghostbn.yaml \\
        --weights output/.../model_final.pth --iters 200 --eval
"""
import os
import sys

import d2norm  # noqa: F401  (compat + registrations)
from d2norm.engine import cli as tc


RECORDED = 0  # --rule without B (a user-given 0 is rejected by positive_int; argparse converts str consts)


def build_parser():
    p = tc.base_parser(__doc__)
    p.add_argument("--dataset", help="training dataset for the fit (default: the cfg's first DATASETS.TRAIN)")
    p.add_argument("--iters", type=tc.positive_int, help="optimizer steps (default D2NORM.EVALNORM.OFFLINE_ITERS)")
    p.add_argument("--lr", type=float, help="Adam learning rate on the logits (default D2NORM.EVALNORM.OFFLINE_LR)")
    p.add_argument("--batch-size", type=tc.positive_int,
                   help="images per fitting batch (default: the training normalization batch, i.e. "
                        "D2NORM.GHOST_BN.SIZE for GhostBN layers, else SOLVER.IMS_PER_BATCH)")
    p.add_argument("--rule", nargs="?", type=tc.positive_int, const=RECORDED, default=None, metavar="B",
                   help="no fit: alpha = beta = 1/B^2, B >= 1 (B omitted: each layer's training normalization "
                        "batch: GhostBN's SIZE, or the batch size an EvalNorm layer recorded)")
    tc.add_eval_args(p)
    p.add_argument("--output-name", help="checkpoint name without .pth (default <source checkpoint's name>_"
                   "evalnorm_offline|rule)")
    return p


@tc.distributed_tool
def run(args):
    from d2norm.layers.protocol import norm_protocol
    from d2norm.layers.evalnorm import evalnorm_alpha_beta, evalnorm_modules
    from d2norm.stats.evalnorm_fit import fit_evalnorm_offline, set_evalnorm_rule

    cfg = tc.load_cfg(args.config_file, args.opts)
    ec = cfg.D2NORM.EVALNORM
    iters = args.iters if args.iters is not None else ec.OFFLINE_ITERS
    lr = args.lr if args.lr is not None else ec.OFFLINE_LR
    dataset = None if args.rule is not None else tc.prepare_dataset(cfg, args.dataset or tc.first(cfg.DATASETS.TRAIN))
    eval_ds = tc.eval_dataset(args, cfg)
    out_dir = tc.output_dir(args, cfg, "fit_evalnorm")
    method = "rule" if args.rule is not None else "offline"
    name = args.output_name or f"{tc.source_stem(args.weights or cfg.MODEL.WEIGHTS)}_evalnorm_{method}"
    tc.claim_outputs([os.path.join(out_dir, f"{name}{ext}") for ext in (".pth", ".yaml", ".json")], args.overwrite)

    model, source = tc.load_model(cfg, args.weights, return_checkpoint=True)
    # decided before any evaluation: which layers become EvalNorm (BN-derived, incl. GhostBN: BN at inference)
    to_convert, kept = tc.conversion_plan(model, "EvalNorm")
    existing = [n for n, r in kept.items() if r == "already EvalNorm"]
    if not to_convert and not existing:
        raise tc.ToolError("the model has no layer EvalNorm applies to (BN-derived layers, e.g. BN, GhostBN, "
                           "AnySyncBN, or EvalNorm itself); its norm layers: "
                           + ("; ".join(f"{n}: {r}" for n, r in kept.items()) or "none"))
    tc.report_kept(kept, "EvalNorm")
    # the training normalization batch B of each converted layer that fixes it (GhostBN: its ghost size)
    fixed = {n: norm_protocol(m).training_normalization_batch() for n, m in model.named_modules() if n in to_convert}
    ghost = {n: b for n, b in fixed.items() if b is not None}
    sources = tc.registered_norm_names(model, to_convert)
    batch_size = args.batch_size or (min(ghost.values()) if ghost else cfg.SOLVER.IMS_PER_BATCH)
    before = tc.maybe_evaluate(args.eval, cfg, model, eval_ds, out_dir, "before")
    en_cfg = cfg.clone()
    en_cfg.defrost()
    en_cfg.D2NORM.EVALNORM.MODE = "offline"
    converted = tc.convert_bn_layers(model, "EvalNorm", en_cfg, names=to_convert)
    if converted:
        print(f"converted {len(converted)} layer(s) to EvalNorm", flush=True)
    layers = evalnorm_modules(model)

    if args.rule is not None:
        info = {"method": "rule", "rule_batch_size": "recorded" if args.rule == RECORDED else args.rule}
        sizes = {n: (ghost.get(n, 0) if args.rule == RECORDED else args.rule) for n in layers}
        try:
            set_evalnorm_rule(layers, sizes)  # the checkpoint carries α̂ = β̂ = 1/B² (evaluated in "offline" mode)
        except RuntimeError as e:
            raise tc.ToolError(f"{e} (pass --rule B)") from None
    else:
        loader = tc.train_style_loader(cfg, dataset, batch_size, seed=args.seed)
        print(f"fitting alpha/beta of {len(layers)} EvalNorm layers: {iters} iterations of {batch_size} images "
              f"from {dataset!r}, lr={lr}", flush=True)
        res = fit_evalnorm_offline(model, loader, iters, lr=lr)
        losses = res["losses"]
        if losses:
            print(f"aux loss (eq 9): first {losses[0]:.5f}, last {losses[-1]:.5f}", flush=True)
        info = {"method": "offline", "dataset": dataset, "iters": iters, "lr": lr, "batch_size": batch_size,
                "losses": losses}
    for m in layers.values():
        m.mode = "offline"  # eval with the fitted (or rule) α̂, β̂

    alpha_beta = evalnorm_alpha_beta(model)
    # converted layers have new parameters (α̂, β̂): the source's optimizer state does not fit this model
    inference_only = (f"{len(converted)} BN layer(s) were converted to EvalNorm; evaluate with {name}.yaml"
                      if converted else None)
    path = tc.save_checkpoint(model, out_dir, name, source=source, inference_only=inference_only,
                              evalnorm_fit={k: v for k, v in info.items() if k != "losses"})
    yaml_cfg, kept = tc.cfg_with_norm(cfg, "EvalNorm", path, sources=sources, **{"D2NORM.EVALNORM.MODE": "offline"})
    if kept:
        print(f"note: {', '.join(kept)} keep their BN name in {name}.yaml (detectron2's per-level head BN has no "
              f"registered-name equivalent); this tool converts them again when given that config", flush=True)
    yaml_path = os.path.join(out_dir, f"{name}.yaml")
    if tc.is_main_process():
        with open(yaml_path, "w") as f:
            f.write(yaml_cfg.dump())
    after = tc.maybe_evaluate(args.eval, cfg, model, eval_ds, out_dir, "after")
    report = {**info, "checkpoint": path, "config": yaml_path, "converted": converted, "alpha_beta": alpha_beta}
    tc.record_before_after(report, eval_ds, before, after)
    vals = [v["alpha"] for v in alpha_beta.values()]
    print(f"alpha-hat over {len(vals)} layers: min {min(vals):.4g}, max {max(vals):.4g}", flush=True)
    tc.write_json(os.path.join(out_dir, f"{name}.json"), report)
    print(f"wrote {path} and {yaml_path}", flush=True)
    return report


def main(argv=None) -> int:
    return tc.run_tool(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
