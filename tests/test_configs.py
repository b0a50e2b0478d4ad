"""Every config under configs/ parses and builds; every configs/cpu/ config trains a few iterations and is
evaluated with detectron2's COCOEvaluator (through tools/train_net.py's main)."""
import glob
import os
import sys

import pytest
import torch
from detectron2.config import get_cfg

import d2norm
from d2norm.layers import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

# every detectron2 config (configs/paper_rows.yaml is the catalogue of paper rows, not a config)
ALL = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
             if os.path.basename(p) != "paper_rows.yaml")
CPU = [p for p in ALL if os.sep + "cpu" + os.sep in p and not os.path.basename(p).startswith("Base-")]
REL = lambda p: os.path.relpath(p, ROOT)  # noqa: E731

TINY_DATA = [
    "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 64, "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64,
    "D2NORM.DATA.SYNTHETIC_IMAGE_SIZE", 64, "D2NORM.DATA.SYNTHETIC_NUM_TRAIN", 8, "D2NORM.DATA.SYNTHETIC_NUM_VAL", 4,
    "DATALOADER.NUM_WORKERS", 0, "SOLVER.MAX_ITER", 2, "SOLVER.WARMUP_ITERS", 0, "SOLVER.IMS_PER_BATCH", 2,
    "TEST.EVAL_PERIOD", 0,
    # after 2 iterations scores are near the prior: keep every detection so COCOeval scores real predictions
    "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
]


def _load(path):
    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.merge_from_file(path)
    return cfg


def test_there_are_configs():
    assert len(CPU) >= 3 and len(ALL) > len(CPU)


@pytest.mark.parametrize("path", ALL, ids=REL)
def test_config_parses_and_builds(path):
    cfg = _load(path)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n > 0
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("path", CPU, ids=REL)
def test_cpu_config_trains_and_evaluates(path, tmp_path):
    import train_net
    from detectron2.engine import default_argument_parser

    opts = [str(v) if not isinstance(v, str) else v for v in TINY_DATA]
    args = default_argument_parser().parse_args(
        ["--config-file", path, *opts, "OUTPUT_DIR", str(tmp_path / "out"),
         "D2NORM.DATA.SYNTHETIC_ROOT", str(tmp_path / "data")]
    )
    torch.manual_seed(0)
    results = train_net.main(args)
    assert "bbox" in results, results
    ap = results["bbox"]["AP"]
    assert ap == ap and 0.0 <= ap <= 100.0  # COCOeval scored predictions (AP ~0 after 2 iterations)
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")


@pytest.mark.parametrize("path", ALL, ids=REL)
def test_configs_are_plain_yaml(path):
    """No config needs ``yaml.unsafe_load`` (fvcore falls back to it, with a warning, for python tags such as
    ``!!python/object/apply:eval``); the RetinaNet anchor sizes are written as the values the formula gave:
    three octave scales x, x*2^(1/3), x*2^(2/3) per level (Lin et al.'s RetinaNet, detectron2's Base-RetinaNet)."""
    import yaml

    with open(path) as f:
        yaml.safe_load(f)  # raises a ConstructorError on a python tag
    sizes = _load(path).MODEL.ANCHOR_GENERATOR.SIZES
    if len(sizes) == 5 and all(len(s) == 3 for s in sizes):
        for s in sizes:
            assert s[1] == pytest.approx(s[0] * 2 ** (1 / 3), abs=1e-9) and s[2] == pytest.approx(s[0] * 2 ** (2 / 3), abs=1e-9)
