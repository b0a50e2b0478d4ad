#!/usr/bin/env python
"""BN doctor: the batch-statistics pitfalls of a config, found before training (d2norm.doctor: each finding with
its severity, the paper section it comes from and the cfg change that fixes it). Exit code 1 when a finding is an
"error" (usable in CI), 2 for a bad input, else 0.

    python tools/bn_doctor.py --config-file configs/cpu/retinanet_R18_ghostbn.yaml --num-gpus 8 [KEY VALUE ...]

With --weights, also the measured diagnosis of the trained model on --num-batches training batches of the training
batch per process (d2norm.doctor_measured: EMA vs population vs batch statistics by depth, per-level divergence of
shared heads, within-image correlation of RoI-head inputs, non-finite / fp16-overflowing buffers), each finding
naming the calibrate_bn candidates expected to help.

Writes report.md and report.json (and measured.png with --weights) into <OUTPUT_DIR>/bn_doctor/ (or --output-dir).
"""
import os
import sys

import d2norm  # noqa: F401  (compat + registrations)
from d2norm.doctor import diagnose_cfg, report_markdown, write_report
from d2norm.engine import cli as tc


def build_parser():
    p = tc.base_parser(__doc__)
    p.add_argument("--num-batches", type=tc.positive_int, default=8,
                   help="with --weights: training batches measured (default 8)")
    p.add_argument("--batch-size", type=tc.positive_int,
                   help="with --weights: images per batch (default: the training batch per process, "
                        "SOLVER.IMS_PER_BATCH over the processes)")
    p.add_argument("--dataset", help="with --weights: training dataset (default: the cfg's first DATASETS.TRAIN)")
    return p


def run(args):
    cfg = tc.read_cfg(args.config_file, args.opts)
    world = args.num_gpus * args.num_machines
    findings = diagnose_cfg(cfg, world_size=world)
    measured = None
    if args.weights:
        from d2norm.doctor_measured import diagnose_measured, measure

        cfg = tc.load_cfg(args.config_file, args.opts)
        dataset = tc.prepare_dataset(cfg, args.dataset or tc.first(cfg.DATASETS.TRAIN))
        batch = args.batch_size or max(1, cfg.SOLVER.IMS_PER_BATCH // world)
        model = tc.load_model(cfg, args.weights)
        measured = measure(model, tc.train_style_loader(cfg, dataset, batch, seed=args.seed), args.num_batches)
        findings += diagnose_measured(measured, amp=bool(cfg.SOLVER.AMP.ENABLED))
    title = f"{args.config_file} on {world} process(es)" + (f", {args.weights}" if args.weights else "")
    print(report_markdown(findings, title, measured), flush=True)
    paths = write_report(findings, args.output_dir or os.path.join(cfg.OUTPUT_DIR, "bn_doctor"), title, measured)
    print(f"wrote {', '.join(paths.values())}", flush=True)
    return findings


def main(argv=None) -> int:
    args = tc.parse_tool_args(build_parser(), argv)
    try:
        findings = run(args)
    except tc.ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if any(f.severity == "error" for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
