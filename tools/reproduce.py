#!/usr/bin/env python
"""Paper effects at CPU scale: train and evaluate each experiment of ``d2norm.experiments`` with the ordinary
tools (``tools/train_net.py`` and the statistics tools, as subprocesses), write ``<output-dir>/<name>.json`` and
``<name>.png`` and print one verdict line per experiment.

    python tools/reproduce.py --list
    python tools/reproduce.py --only precise_bn_batch_size,example_weighing --seeds 2
    python tools/reproduce.py                        # every experiment (make reproduce)

Trainings go to ``--work-dir/runs/<tag>_s<seed>_d<data seed>_<hash>`` and are reused by every experiment that
needs the same run (and by a rerun). ``--data-seed`` regenerates the synthetic set with another seed.
"""
import argparse
import shlex
import sys
import time

from d2norm.experiments import Context, ExperimentError, get_experiments, run_experiment
from d2norm.experiments.suite import markdown_table


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the experiments and their expectations, run nothing")
    p.add_argument("--table", action="store_true",
                   help="print the docs/paper_effects.md table from the JSON records in --output-dir, run nothing")
    p.add_argument("--only", help="comma-separated experiment names (default: all)")
    p.add_argument("--seeds", type=int, help="training seeds 0..K-1 (default: each experiment's default, 2)")
    p.add_argument("--first-seed", type=int, default=0, help="first training seed (default 0)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data set (default 0)")
    p.add_argument("--output-dir", default="results/paper_effects", help="JSON + PNG per experiment")
    p.add_argument("--work-dir", default="output/paper_effects", help="training runs and measurements")
    p.add_argument("--nice", type=int, default=0, help="niceness of the training/evaluation subprocesses")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads per subprocess (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="seeds of an experiment measured concurrently (default 1)")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                   help="cfg overrides appended to every command (e.g. a short smoke schedule); recorded in the "
                   "JSON command and part of the run directories' keys")
    p.add_argument("--dry-run", action="store_true", help="print the commands an experiment would run")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    try:
        exps = get_experiments(names)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(args.opts) % 2:
        print(f"error: --opts must be KEY VALUE pairs, got {args.opts}", file=sys.stderr)
        return 2
    if args.seeds is not None and args.seeds < 1:
        print(f"error: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    if args.list:
        for e in exps:
            print(f"{e.name:24s} {e.paper} {e.section}\n    expected: {e.expected}")
        return 0
    if args.table:
        print(markdown_table(exps, args.output_dir))
        return 0
    ctx = Context(work_dir=args.work_dir, data_seed=args.data_seed, nice=args.nice, threads=args.threads,
                  dry_run=args.dry_run, extra_opts=tuple(args.opts))
    start, records, failed = time.time(), [], []
    for e in exps:
        k = args.seeds or e.default_seeds
        seeds = list(range(args.first_seed, args.first_seed + k))
        cmd = ["python", "tools/reproduce.py", "--only", e.name, "--seeds", str(k)]
        if args.first_seed:
            cmd += ["--first-seed", str(args.first_seed)]
        cmd += ["--data-seed", str(args.data_seed)]
        if args.opts:
            cmd += ["--opts", *args.opts]
        try:
            records.append(run_experiment(e, ctx, seeds, args.output_dir, " ".join(shlex.quote(c) for c in cmd),
                                          jobs=args.jobs))
        except ExperimentError as err:  # a failed subprocess: report it, go on with the next experiment
            failed.append(e.name)
            print(f"[{e.name}] FAILED: {err}", flush=True)
    print(f"{len(records)} experiment(s) in {time.time() - start:.0f} s: "
          + ", ".join(f"{r['name']}={r['verdict']}" for r in records)
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
