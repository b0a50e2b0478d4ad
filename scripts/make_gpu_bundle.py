#!/usr/bin/env python
"""Prepare ``.gpu_bundle/`` (ignored by git): what a bare GPU machine needs to run d2norm's GPU check.

The GPU machines lent for checks have Python 3.12 with torch + triton + numpy / matplotlib / opencv / pytest but no
package registry and none of detectron2, fvcore, iopath, yacs, omegaconf, antlr4, termcolor, portalocker, tabulate,
tqdm, cloudpickle, pycocotools (nor, possibly, torchvision). This writes, within ``--max-mib`` (64 MiB, the size a
device run may carry):

* ``site/``: the pure-Python packages, copied from this environment (detectron2 is the v0.6 Python package
  ``scripts/install.sh`` installed, with its ``_C`` stand-in; PyYAML without its optional C extension);
* ``site-cp312/``: binary wheels for the GPU machine's Python, downloaded here and unpacked (a wheel is a zip of
  its site-packages content): pycocotools, and with ``--torchvision VERSION`` the torchvision build matching the
  machine's torch (e.g. 0.26.0 for torch 2.11) — ``--no-download`` skips them (offline; the check then needs
  them on the machine).

On the GPU machine (``run`` tool, carry ``.gpu_bundle``):

    PYTHONPATH=.gpu_bundle/site:.gpu_bundle/site-cp312:. D2NORM_NATIVE=0 python tools/gpu_selfcheck.py --out "$OUT"

Usage: ``python scripts/make_gpu_bundle.py [--out .gpu_bundle] [--torchvision 0.26.0] [--no-download]``
(``make gpu-bundle``).
"""
import argparse
import importlib
import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: import name -> what to copy (a package folder or a module file), all pure Python
PURE = ("detectron2", "fvcore", "iopath", "yacs", "omegaconf", "antlr4", "termcolor", "portalocker", "tabulate",
        "tqdm", "cloudpickle", "yaml")
#: the GPU machine's Python
TARGET = {"python_version": "3.12", "platforms": ("manylinux2014_x86_64", "manylinux_2_28_x86_64"), "abi": "cp312"}


def _source(name: str) -> str:
    mod = importlib.import_module(name)
    path = os.path.dirname(mod.__file__) if os.path.basename(mod.__file__) == "__init__.py" else mod.__file__
    return path


def _copy(src: str, dest_dir: str) -> None:
    dest = os.path.join(dest_dir, os.path.basename(src))
    if os.path.isdir(src):
        # compiled extensions of this Python (e.g. yaml's _yaml) would not load on 3.12: pure Python only
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "*.pyc"))
    else:
        shutil.copy2(src, dest)


def _size_mib(folder: str) -> float:
    total = 0
    for root, _, files in os.walk(folder):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 2 ** 20


def _download(specs, folder: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", folder,
           "--python-version", TARGET["python_version"], "--abi", TARGET["abi"],
           *[a for p in TARGET["platforms"] for a in ("--platform", p)], *specs]
    subprocess.run(cmd, check=True)


def build(out: str, torchvision: str = "", download: bool = True, max_mib: float = 64.0) -> dict:
    """Write the bundle into ``out`` (replaced); returns ``{"site": [...], "wheels": [...], "mib": size}``."""
    from d2norm import compat

    if compat.HAS_COMPILED_OPS:
        # a compiled detectron2 (e.g. CI's upstream leg) is bound to this machine's Python, torch and CUDA: the
        # bundle carries the registry's v0.6 Python package with its _C stand-in, as `make install` installs it
        raise SystemExit("error: this environment's detectron2 has compiled ops; build the bundle from the "
                         "environment `make install` creates (the registry's detectron2 v0.6 Python package)")
    if os.path.isdir(out):
        shutil.rmtree(out)
    site = os.path.join(out, "site")
    os.makedirs(site)
    for name in PURE:
        _copy(_source(name), site)
    wheels = []
    if download:
        wdir = os.path.join(out, "wheels")
        os.makedirs(wdir)
        _download(["pycocotools"] + ([f"torchvision=={torchvision}"] if torchvision else []), wdir)
        unpacked = os.path.join(out, "site-cp312")
        os.makedirs(unpacked)
        for w in sorted(os.listdir(wdir)):
            with zipfile.ZipFile(os.path.join(wdir, w)) as z:
                z.extractall(unpacked)
            wheels.append(w)
        shutil.rmtree(wdir)  # the unpacked copy is what runs; the wheel would count twice against the size
    mib = _size_mib(out)
    if mib > max_mib:
        raise SystemExit(f"error: the bundle is {mib:.1f} MiB, more than --max-mib {max_mib}")
    with open(os.path.join(out, "README"), "w") as f:
        f.write(__doc__ + "\nsite/: " + ", ".join(PURE) + "\nsite-cp312/: " + (", ".join(wheels) or "-") + "\n")
    return {"site": list(PURE), "wheels": wheels, "mib": mib}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, ".gpu_bundle"))
    p.add_argument("--torchvision", default="", help="also a cp312 torchvision wheel of this version")
    p.add_argument("--no-download", action="store_true", help="pure-Python packages only (no cp312 wheels)")
    p.add_argument("--max-mib", type=float, default=64.0)
    args = p.parse_args(argv)
    info = build(args.out, args.torchvision, not args.no_download, args.max_mib)
    print(f"wrote {args.out}: {info['mib']:.1f} MiB; pure Python: {', '.join(info['site'])}; cp312 wheels: "
          f"{', '.join(info['wheels']) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
