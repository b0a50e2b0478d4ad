#!/usr/bin/env python
"""Turn the registry's ``pb1-detectron2-0.6`` sdist into a Python-only detectron2 v0.6 distribution that imports
on its own on today's stack (used by ``scripts/install.sh``; the installer owns this distribution).

    python scripts/make_detectron2_v06.py <extracted sdist dir> <output dir>

What the output holds, besides detectron2's own Python package (``layers/csrc`` dropped, it is incomplete):

* ``detectron2/_C.py`` -- ``d2norm/compiled_ops_stand_in.py``, a stand-in for the compiled extension: ``from detectron2 import _C`` works, so every
  detectron2 module imports in any order; using a compiled op (deformable conv, rotated boxes, RoIAlignRotated,
  fast COCO eval) raises ``NotImplementedError`` naming the op. ``collect_env`` reports it as not compiled.
* ``data/transforms/transform.py``: ``Image.LINEAR`` (removed in Pillow 10) -> ``Image.BILINEAR``, the value it
  always had.
* ``model_zoo/model_zoo.py``: ``import pkg_resources`` (removed in setuptools 81) falls back to an equivalent
  ``resource_filename`` for its own package.
* ``setup.py`` for a normal, uninstallable distribution named ``detectron2`` without v0.6's old pins.

Every edit checks that the text it replaces is there and fails loudly otherwise.
"""
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the stand-in for the compiled extension, installed as detectron2/_C.py (its D2NORM_STAND_IN versions it)
C_STAND_IN = os.path.join(ROOT, "d2norm", "compiled_ops_stand_in.py")

PKG_RESOURCES_OLD = "import pkg_resources\n"
PKG_RESOURCES_NEW = '''try:
    import pkg_resources
except ImportError:  # setuptools >= 81 has no pkg_resources (fallback added by d2norm's installer)
    import types as _types

    pkg_resources = _types.SimpleNamespace(
        resource_filename=lambda package, resource: os.path.join(os.path.dirname(__file__), resource)
    )
'''

SETUP_PY = '''# Pure-Python distribution of detectron2 v0.6 (no compiled _C; made by d2norm's scripts/make_detectron2_v06.py).
from setuptools import find_packages, setup

setup(
    name="detectron2",
    version="0.6",
    description="detectron2 v0.6 Python package (no C++ extension), installed by d2norm",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},
    include_package_data=False,
    python_requires=">=3.7",
    install_requires=[],
)
'''


def _edit(path: str, old: str, new: str) -> None:
    with open(path) as f:
        text = f.read()
    if text.count(old) != 1:
        sys.exit(f"make_detectron2_v06: expected exactly one {old.strip()!r} in {path}; is this detectron2 v0.6?")
    with open(path, "w") as f:
        f.write(text.replace(old, new))


def main(src: str, out: str) -> None:
    pkg = os.path.join(out, "detectron2")
    if os.path.exists(out):
        shutil.rmtree(out)
    shutil.copytree(os.path.join(src, "detectron2"), pkg)
    shutil.rmtree(os.path.join(pkg, "layers", "csrc"), ignore_errors=True)
    if os.path.exists(os.path.join(pkg, "_C.py")) or any(n.startswith("_C.") for n in os.listdir(pkg)):
        sys.exit(f"make_detectron2_v06: {pkg} already has a _C module")
    shutil.copyfile(C_STAND_IN, os.path.join(pkg, "_C.py"))
    _edit(os.path.join(pkg, "data", "transforms", "transform.py"), "interp=Image.LINEAR,", "interp=Image.BILINEAR,")
    # model_zoo.py imports os before pkg_resources, which the fallback uses.
    _edit(os.path.join(pkg, "model_zoo", "model_zoo.py"), "\n" + PKG_RESOURCES_OLD, "\n" + PKG_RESOURCES_NEW)
    with open(os.path.join(out, "setup.py"), "w") as f:
        f.write(SETUP_PY)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
