"""scripts/install.sh argument checks and scripts/make_detectron2_v06.py (the installer's v0.6 distribution)."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKE = os.path.join(ROOT, "scripts", "make_detectron2_v06.py")


@pytest.mark.parametrize("spec, message", [
    ("/no/such/dir", "is not a detectron2 source tree (no setup.py), an archive"),
    ("/no/such/detectron2.tar.gz", "archive not found"),
])
def test_bad_detectron2_source_fails_before_installing(tmp_path, spec, message):
    venv = tmp_path / "venv"
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "install.sh")], capture_output=True, text=True,
                          env=dict(os.environ, D2NORM_VENV=str(venv), D2NORM_DETECTRON2=spec), timeout=60)
    assert proc.returncode == 2
    assert f"D2NORM_DETECTRON2={spec}" in proc.stderr and message in proc.stderr
    assert not venv.exists()  # nothing was installed


MODEL_ZOO = '''import os
from typing import Optional
import pkg_resources


def get_config_file(config_path):
    return pkg_resources.resource_filename("detectron2.model_zoo", os.path.join("configs", config_path))
'''
TRANSFORM = "class ExtentTransform:\n    def __init__(self, src_rect, output_size, interp=Image.LINEAR, fill=0):\n"


def _fake_sdist(root):
    pkg = root / "detectron2"
    for d in ("layers/csrc", "data/transforms", "model_zoo"):
        (pkg / d).mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "layers" / "csrc" / "x.cpp").write_text("")
    (pkg / "data" / "transforms" / "transform.py").write_text(TRANSFORM)
    (pkg / "model_zoo" / "model_zoo.py").write_text(MODEL_ZOO)
    return root


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_detectron2_v06_closes_the_import_time_gaps(tmp_path, monkeypatch):
    src, out = _fake_sdist(tmp_path / "src"), tmp_path / "out"
    subprocess.run([sys.executable, MAKE, str(src), str(out)], check=True, timeout=60)
    pkg = out / "detectron2"
    assert not (pkg / "layers" / "csrc").exists() and (out / "setup.py").is_file()
    assert "interp=Image.BILINEAR," in (pkg / "data" / "transforms" / "transform.py").read_text()

    c = _load(pkg / "_C.py", "fake_d2_C")
    assert c.D2NORM_STAND_IN >= 1 and c.has_cuda() is False and "without its C++ extension" in c.get_compiler_version()
    with pytest.raises(NotImplementedError, match=r"detectron2\._C\.deform_conv_forward is a compiled detectron2 op"):
        c.deform_conv_forward
    with pytest.raises(AttributeError):
        c.__wrapped__

    # setuptools >= 81: no pkg_resources -> the fallback resolves files next to model_zoo.py
    monkeypatch.setitem(sys.modules, "pkg_resources", None)
    mz = _load(pkg / "model_zoo" / "model_zoo.py", "fake_model_zoo")
    assert mz.get_config_file("a/b.yaml") == os.path.join(str(pkg / "model_zoo"), "configs", "a/b.yaml")


def test_make_detectron2_v06_refuses_an_unexpected_tree(tmp_path):
    src = _fake_sdist(tmp_path / "src")
    (src / "detectron2" / "model_zoo" / "model_zoo.py").write_text("import os\n")
    proc = subprocess.run([sys.executable, MAKE, str(src), str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode != 0 and "expected exactly one 'import pkg_resources'" in proc.stderr
