#!/usr/bin/env python
"""d2norm: batch-normalization research as detectron2 layers, heads, backbones and hooks.

Install with ``bash scripts/install.sh`` (see README): detectron2 is not on the package registry under its own
name, so it is not listed in ``install_requires``; the installer provides it.
"""
from setuptools import find_packages, setup

setup(
    name="d2norm",
    version="0.1.0",
    description="Batch-normalization research (PreciseBN, GhostBN, EvalNorm, MABN, XBNBlock, ...) for detectron2",
    packages=find_packages(include=["d2norm", "d2norm.*"]),
    package_data={"d2norm": ["layers/csrc/*.cpp"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.11",  # the versions the test suite has run on (docs/install.md, "Supported versions")
        "fvcore>=0.1.5",
        "pycocotools>=2.0.2",
        "pillow>=10",
        "numpy",
        "matplotlib",
    ],
    extras_require={"test": ["pytest"]},
)
