#!/usr/bin/env python
"""The paper rows d2norm has a COCO-scale config for (configs/paper_rows.yaml).

    python tools/paper_rows.py                       # the table (markdown)
    python tools/paper_rows.py --paper mabn --table 5
    python tools/paper_rows.py --check               # every row's built cfg and model against what the paper states
    python tools/paper_rows.py --readme README.md    # regenerate README's table (between its paper-rows markers)
"""
import argparse
import sys

import d2norm  # noqa: F401  (compat + registrations)
from d2norm.paper_rows import check_row, load_rows, markdown_table

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
