"""BN doctor (static part, d2norm.doctor): each pitfall is flagged on a config built to have it, with its severity,
paper section and fix, and the fixed twin is silent about it; a setup error makes tools/bn_doctor.py exit 1."""
import json
import os

import pytest

import d2norm  # noqa: F401
from d2norm.doctor import diagnose_cfg
from d2norm.engine.cli import read_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "cpu", "faster_rcnn_R18_FPN_ghostbn.yaml")
RETINA = os.path.join(ROOT, "configs", "cpu", "retinanet_R18_ghostbn.yaml")
HEADBN = os.path.join(ROOT, "configs", "cpu", "faster_rcnn_R18_FPN_headbn_frozenbn.yaml")

# (finding code, config, opts with the pitfall, opts of the fixed twin, world size)
CASES = {
    "small_norm_batch": (DEMO, ["SOLVER.IMS_PER_BATCH", 4, "D2NORM.GHOST_BN.SIZE", 2],
                         ["SOLVER.IMS_PER_BATCH", 8, "D2NORM.GHOST_BN.SIZE", 4], 1),
    "shared_head_bn": (RETINA, ["MODEL.RETINANET.NORM", "GhostBN"], ["MODEL.RETINANET.NORM", "BN"], 1),
    "rcnn_head_bn": (HEADBN, ["SOLVER.IMS_PER_BATCH", 2, "MODEL.ROI_BOX_HEAD.NORM", "BN"],
                     ["SOLVER.IMS_PER_BATCH", 2, "MODEL.ROI_BOX_HEAD.NORM", "BN", "MODEL.ROI_BOX_HEAD.NAME",
                      "ShuffledConvFCHead"], 1),
    "precise_bn_small": (DEMO, ["D2NORM.PRECISE_BN.ENABLED", True, "D2NORM.PRECISE_BN.BATCH_SIZE", 16,
                                "D2NORM.PRECISE_BN.NUM_SAMPLES", 500],
                         ["D2NORM.PRECISE_BN.ENABLED", True, "D2NORM.PRECISE_BN.BATCH_SIZE", 128,
                          "D2NORM.PRECISE_BN.NUM_SAMPLES", 2000], 1),
    "ema_window": (DEMO, ["D2NORM.BN.MOMENTUM", 0.001, "SOLVER.MAX_ITER", 1000],
                   ["D2NORM.BN.MOMENTUM", 0.1, "SOLVER.MAX_ITER", 1000], 1),
    "norm_weight_decay": (DEMO, [], ["SOLVER.WEIGHT_DECAY_NORM", 0.0001], 1),
    "setup_error": (DEMO, ["MODEL.RESNETS.NORM", "EvalNorm"],
                    ["MODEL.RESNETS.NORM", "EvalNorm", "MODEL.META_ARCHITECTURE", "EvalNormGeneralizedRCNN"], 1),
}


def _codes(path, opts, world):
    return [f for f in diagnose_cfg(read_cfg(path, opts), world_size=world)]


@pytest.mark.parametrize("code", sorted(CASES))
def test_pitfall_is_flagged_and_its_fixed_twin_is_not(code):
    path, bad, good, world = CASES[code]
    found = [f for f in _codes(path, bad, world) if f.code == code]
    assert found, code
    for f in found:
        assert f.severity in ("error", "warning", "info") and f.message and f.fix and f.paper
    assert not [f for f in _codes(path, good, world) if f.code == code], code


def test_world_size_decides_the_normalization_batch():
    """The same config on 1 and on 8 processes: 8 images per process is fine, 1 is not."""
    opts = ["SOLVER.IMS_PER_BATCH", 8, "MODEL.RESNETS.NORM", "BN"]
    assert not [f for f in _codes(DEMO, opts, 1) if f.code == "small_norm_batch"]
    small = [f for f in _codes(DEMO, opts, 8) if f.code == "small_norm_batch"]
    assert small and "1 image(s) per group (1 per process, 8 process(es))" in small[0].message
    synced = ["SOLVER.IMS_PER_BATCH", 8, "MODEL.RESNETS.NORM", "SyncBN"]  # 8 images over the 8 processes
    assert not [f for f in _codes(DEMO, synced, 8) if f.code == "small_norm_batch"]


def test_tool_reports_and_exits_1_on_an_error(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bn_doctor", os.path.join(ROOT, "tools", "bn_doctor.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--config-file", DEMO, "--output-dir", str(tmp_path / "a"), "MODEL.RESNETS.NORM",
                      "EvalNorm"]) == 1
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert any(f["code"] == "setup_error" and "EvalNormGeneralizedRCNN" in f["message"] for f in rep["findings"])
    assert "| error | setup_error |" in (tmp_path / "a" / "report.md").read_text()
    assert tool.main(["--config-file", DEMO, "--output-dir", str(tmp_path / "b")]) == 0
    assert tool.main(["--config-file", "missing.yaml"]) == 2
    capsys.readouterr()
    assert tool.main(["--config-file", DEMO, "--weights", str(tmp_path / "x.pth"), "--output-dir",
                      str(tmp_path / "c")]) == 2  # the measured diagnosis needs the checkpoint
    assert "x.pth" in capsys.readouterr().err
