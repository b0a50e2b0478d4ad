#!/usr/bin/env python
"""BN doctor: the batch-statistics pitfalls of a config, found before training (d2norm.doctor: each finding with
its severity, the paper section it comes from and the cfg change that fixes it). Exit code 1 when a finding is an
"error" (usable in CI), 2 for a bad input, else 0.

    python tools/bn_doctor.py --config-file configs/cpu/retinanet_R18_ghostbn.yaml --num-gpus 8 [KEY VALUE ...]

Writes report.md and report.json into <OUTPUT_DIR>/bn_doctor/ (or --output-dir). Measured diagnosis of a trained
model (--weights) is not built yet.
"""
import os
import sys

import d2norm  # noqa: F401  (compat + registrations)
from d2norm.doctor import diagnose_cfg, report_markdown, write_report
from d2norm.engine import cli as tc


def build_parser():
    p = tc.base_parser(__doc__)
    return p


def run(args):
    if args.weights:
        raise tc.ToolError("--weights: the measured diagnosis of a trained model is not built yet; the static check "
                           "of the config runs without it")
    cfg = tc.read_cfg(args.config_file, args.opts)
    world = args.num_gpus * args.num_machines
    findings = diagnose_cfg(cfg, world_size=world)
    title = f"{args.config_file} on {world} process(es)"
    print(report_markdown(findings, title), flush=True)
    paths = write_report(findings, args.output_dir or os.path.join(cfg.OUTPUT_DIR, "bn_doctor"), title)
    print(f"wrote {paths['markdown']} and {paths['json']}", flush=True)
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
