#!/usr/bin/env python
"""Print (or ``--write``) the reference of every ``cfg.D2NORM`` key, generated from the option declarations.

    python tools/config_reference.py --write docs/config.md
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import d2norm  # noqa: E402,F401  (declares every node)
from d2norm.options import markdown_reference  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", metavar="PATH", help="write the markdown to PATH instead of printing it")
    args = p.parse_args(argv)
    text = markdown_reference() + "\n"
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
        print(f"wrote {args.write}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
