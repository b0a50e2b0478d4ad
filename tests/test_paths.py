"""A user's working directory does not matter: a folder named ``d2norm`` there (an output folder, say) does not
shadow the installed package, and the README's Python snippet runs from any directory."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_snippet():
    text = open(os.path.join(ROOT, "docs", "training.md")).read()
    block = text.split("In Python:", 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def _shadowing_cwd(tmp_path):
    d = tmp_path / "d2norm"  # e.g. `OUTPUT_DIR d2norm/run1`: a folder without __init__.py
    (d / "run1").mkdir(parents=True)
    (d / "run1" / "log.txt").write_text("x")
    return tmp_path


def test_installed_package_is_not_shadowed_by_a_d2norm_folder(tmp_path):
    """Without PYTHONPATH, as after ``make install``: the editable install is a path entry (setuptools'
    ``compat`` mode), so a namespace folder in the cwd does not win over the real package."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import d2norm, sys; print(d2norm.__file__); d2norm.add_d2norm_config; print('OK')"
    res = subprocess.run([sys.executable, "-c", code], cwd=str(_shadowing_cwd(tmp_path)), env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-2000:]
    assert res.stdout.splitlines()[0].endswith(os.path.join("d2norm", "__init__.py"))


def test_readme_snippet_runs_from_any_directory(tmp_path):
    code = _readme_snippet() + "\nprint('BUILT', type(model).__name__)\n"
    res = subprocess.run([sys.executable, "-c", code], cwd=str(_shadowing_cwd(tmp_path)),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "BUILT RetinaNet" in res.stdout, res.stderr[-2000:]


def test_config_path_names_what_exists(tmp_path):
    import pytest

    import d2norm

    p = d2norm.config_path("cpu/retinanet_R18_ghostbn.yaml")
    assert os.path.isabs(p) and os.path.samefile(p, os.path.join(ROOT, "configs", "cpu", "retinanet_R18_ghostbn.yaml"))
    with pytest.raises(FileNotFoundError, match="cpu/nope.yaml.*configs"):
        d2norm.config_path("cpu/nope.yaml")


def test_documented_relative_config_paths_work_from_any_directory(tmp_path, capsys, monkeypatch):
    """``--config-file configs/cpu/...`` as in the README and the tools' help, run from another directory:
    the tool finds d2norm's config (and fails on the next missing input, the checkpoint)."""
    import importlib.util

    monkeypatch.chdir(_shadowing_cwd(tmp_path))
    spec = importlib.util.spec_from_file_location("_fit", os.path.join(ROOT, "tools", "fit_evalnorm.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rc = tool.main(["--config-file", "configs/cpu/faster_rcnn_R18_FPN_ghostbn.yaml", "--weights", "missing.pth",
                    "--rule"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: checkpoint not found: 'missing.pth'"), err

    from detectron2.engine import default_argument_parser

    from d2norm.engine import setup_cfg

    args = default_argument_parser().parse_args(
        ["--config-file", "configs/cpu/faster_rcnn_R18_FPN_ghostbn.yaml", "OUTPUT_DIR", str(tmp_path / "o"),
         "D2NORM.DATA.SYNTHETIC_ROOT", str(tmp_path / "data"), "D2NORM.DATA.SYNTHETIC_NUM_TRAIN", "2",
         "D2NORM.DATA.SYNTHETIC_NUM_VAL", "1"])
    cfg = setup_cfg(args)
    assert cfg.MODEL.RESNETS.NORM == "GhostBN"  # the demo config was read


def test_train_net_bad_config_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  RESNETS: [unclosed\n")
    for argv, msg in (([str(bad)], "is not valid YAML"), ([str(tmp_path / "nope.yaml")], "config file not found"),
                      ([os.path.join(ROOT, "configs", "cpu", "faster_rcnn_R18_FPN_ghostbn.yaml"), "MODEL.NO_SUCH",
                        "1"], "Non-existent key: MODEL.NO_SUCH")):
        res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", *argv],
                             cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and lines and lines[-1].startswith("error: ") and msg in lines[-1], res.stderr
        assert "Traceback" not in res.stderr
