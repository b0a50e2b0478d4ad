"""Any import order of detectron2 and d2norm works, and d2norm's registrations apply when it comes last.

Each order runs in a fresh interpreter (tests/_import_order_probe.py). Expected outcomes follow from the gaps
d2norm.compat detected in this detectron2 (not from its version): on the v0.6 distribution built by
scripts/install.sh and on a compiled upstream every order works, except that ``detectron2.model_zoo`` imported
before d2norm needs ``pkg_resources`` when detectron2's own code imports it unconditionally (upstream main on
setuptools >= 81, compat ``pkg_resources``); a Python-only v0.6 installed some other way (compat
``compiled_ops``) cannot import ``detectron2.layers`` before d2norm.
"""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from d2norm import compat

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ORDERS = [
    [],
    ["detectron2"],
    ["detectron2.layers"],
    ["detectron2.modeling"],
    ["detectron2.data"],
    ["detectron2.engine"],
    ["detectron2.evaluation"],
    ["detectron2.model_zoo"],
    ["detectron2.checkpoint", "detectron2.config", "detectron2.data", "detectron2.engine", "detectron2.evaluation",
     "detectron2.layers", "detectron2.modeling", "detectron2.utils.collect_env"],
]


def _run(modules):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    return subprocess.run([sys.executable, os.path.join(HERE, "_import_order_probe.py"), *modules],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def _expected_error(modules):
    """The error a gap detected by compat makes detectron2 raise in this order (None: the order must work)."""
    if compat.APPLIED["compiled_ops"] and any(m != "detectron2" for m in modules):
        return ("cannot import name '_C'", "has no attribute 'LINEAR'", "No module named 'pkg_resources'")
    if compat.APPLIED["pkg_resources"] and "detectron2.model_zoo" in modules:
        return ("No module named 'pkg_resources'",)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("modules", ORDERS, ids=lambda m: "+".join(m) or "d2norm_first")
def test_import_order(modules):
    proc = _run(modules)
    expected = _expected_error(modules)
    if expected is not None:
        assert proc.returncode != 0 and any(e in proc.stderr for e in expected), proc.stderr[-2000:]
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ghost_sizes"] == [3] and out["num_ghost"] > 10
    assert out["get_norm_is_d2norm"] and out["model_zoo"]
    assert out["extent_interp"] == int(Image.BILINEAR)
    # The same gaps are detected whatever was imported first (jit_script_warning records whether the warning it
    # filters was raised during d2norm's import, i.e. whether those modules were imported before).
    skip = {"jit_script_warning"}
    assert {k: v for k, v in out["applied"].items() if k not in skip} == {
        k: v for k, v in compat.APPLIED.items() if k not in skip}


def test_installer_v06_has_no_import_time_gaps():
    """On the installer's v0.6 the distribution itself closes the import-time gaps (compat applies none of them);
    on upstream the compiled ops are real."""
    try:
        import detectron2._C as C
    except ImportError:  # a Python-only v0.6 not built by scripts/install.sh: compat imported against a stand-in
        assert compat.APPLIED["compiled_ops"] and not compat.HAS_COMPILED_OPS
        return
    assert not compat.APPLIED["compiled_ops"]
    if compat.HAS_COMPILED_OPS:
        assert not hasattr(C, "D2NORM_STAND_IN") and C.__file__.endswith((".so", ".pyd"))
    else:
        assert C.D2NORM_STAND_IN >= 1
        assert not compat.APPLIED["pil_linear"] and not compat.APPLIED["pkg_resources"]
