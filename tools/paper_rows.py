#!/usr/bin/env python
"""The paper rows d2norm has a COCO-scale config for (configs/paper_rows.yaml).

    python tools/paper_rows.py                       # the table (markdown)
    python tools/paper_rows.py --paper mabn --table 5
    python tools/paper_rows.py --check               # every row's built cfg and model against what the paper states
    python tools/paper_rows.py --readme docs/paper_rows.md    # regenerate docs/paper_rows.md's table (between its paper-rows markers)

    # a table's training commands for the GPUs you have (rows needing more workers span several machines)
    python tools/paper_rows.py --paper mabn --table 5 --commands --gpus-per-machine 8 --output-root output/mabn_t5
    python tools/paper_rows.py --paper mabn --table 5 --launch --gpus-per-machine 8 --output-root output/mabn_t5
    # the table with our results (the rows' metrics.json under --output-root) next to the paper's: markdown + JSON
    python tools/paper_rows.py --paper mabn --table 5 --collect output/mabn_t5
"""
import argparse
import os
import sys

import d2norm  # noqa: F401  (compat + registrations)
import json
import shlex
import subprocess

from d2norm.paper_rows import check_row, collect, launch_commands, load_rows, markdown_table, results_table

START, END = "<!-- paper-rows:start -->", "<!-- paper-rows:end -->"


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between the paper-rows markers replaced by ``block``."""
    if START not in text or END not in text:
        raise ValueError(f"no {START} ... {END} block to replace")
    head, rest = text.split(START, 1)
    return head + START + "\n" + block + "\n" + END + rest.split(END, 1)[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", help="only this paper's rows (mabn, rethinking, evalnorm, estimation-shift)")
    p.add_argument("--table", help="only this table's rows")
    p.add_argument("--check", action="store_true", help="build every row and compare it with what the paper states")
    p.add_argument("--readme", metavar="FILE", help="write the table into FILE between its paper-rows markers")
    p.add_argument("--commands", action="store_true", help="print the rows' training commands")
    p.add_argument("--launch", action="store_true", help="run the rows' training commands here, one after the other "
                   "(rows needing one machine only)")
    p.add_argument("--gpus-per-machine", type=int, default=8, help="GPUs per machine for --commands / --launch")
    p.add_argument("--output-root", default="output/paper_rows", help="OUTPUT_DIR root: <root>/<config name>")
    p.add_argument("--dist-url", default="tcp://MASTER_HOST:PORT", help="multi-machine rows: the first machine's URL")
    p.add_argument("--collect", metavar="ROOT", help="read <ROOT>/<config name>/metrics.json of every row into the "
                   "paper table (ours vs paper, difference); writes ROOT/paper_rows.md and .json")
    args = p.parse_args(argv)
    rows = [r for r in load_rows() if (args.paper is None or r["paper"] == args.paper)
            and (args.table is None or r["table"] == str(args.table))]
    if not rows:
        print(f"error: no row for --paper {args.paper} --table {args.table}", file=sys.stderr)
        return 2
    if args.readme:
        with open(args.readme) as f:
            text = f.read()
        with open(args.readme, "w") as f:
            f.write(replace_block(text, markdown_table(load_rows())))
        print(f"wrote the table of {len(load_rows())} rows into {args.readme}")
        return 0
    if args.commands or args.launch:
        try:
            plans = launch_commands(rows, args.gpus_per_machine, args.output_root, python=sys.executable if
                                    args.launch else "python", dist_url=args.dist_url)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        multi = [pl for pl in plans if pl["machines"] > 1]
        if args.launch and multi:
            print(f"error: {len(multi)} row(s) need {multi[0]['machines']}+ machines of {args.gpus_per_machine} GPUs "
                  f"(e.g. {multi[0]['row']['row']}); run the commands of --commands on each machine", file=sys.stderr)
            return 2
        for pl in plans:
            r = pl["row"]
            print(f"# {r['paper']} Table {r['table']} {r['row']}: {r['gpus']} workers x {r['images_per_gpu']} image(s)"
                  + (f", {pl['machines']} machines (one command per machine rank)" if pl["machines"] > 1 else ""))
            for cmd in pl["commands"]:
                print(" ".join(shlex.quote(c) for c in cmd), flush=True)
                if args.launch:
                    rc = subprocess.call(cmd)
                    if rc:
                        print(f"error: the row's training exited with {rc}", file=sys.stderr)
                        return rc
        return 0
    if args.collect:
        got = collect(rows, args.collect)
        table = results_table(got)
        print(table)
        with open(os.path.join(args.collect, "paper_rows.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(args.collect, "paper_rows.json"), "w") as f:
            json.dump(got, f, indent=1)
        done = sum(c["ours"] is not None for c in got)
        print(f"{done} of {len(got)} rows have results under {args.collect}")
        return 0
    if args.check:
        bad = 0
        for r in rows:
            problems = check_row(r)
            bad += bool(problems)
            print(f"[{'ok' if not problems else 'DIFFERS'}] {r['paper']} Table {r['table']} {r['row']}: "
                  f"{r['config']}" + "".join(f"\n    {x}" for x in problems))
        print(f"{len(rows) - bad} of {len(rows)} rows conform")
        return 1 if bad else 0
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
