"""2 processes on gloo (CPU) through tools/train_net.py's path: both ranks hold identical parameters after
every step, and training changes them."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.RETINANET.NUM_CONVS", "1",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "D2NORM.DATA.SYNTHETIC_IMAGE_SIZE", "64", "D2NORM.DATA.SYNTHETIC_NUM_TRAIN", "16", "D2NORM.DATA.SYNTHETIC_NUM_VAL", "4",
    "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "0", "SOLVER.BASE_LR", "0.01",
]


@pytest.mark.slow
def test_two_process_gloo_training_keeps_ranks_identical(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, os.path.join(ROOT, "tests", "_train_probe.py"),
        "--config-file", os.path.join(ROOT, "configs", "cpu", "retinanet_R18_ghostbn.yaml"),
        "--num-gpus", "2",
        *TINY,
        "SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "4", "TEST.EVAL_PERIOD", "0",
        "D2NORM.DATA.SYNTHETIC_ROOT", str(tmp_path / "data"), "OUTPUT_DIR", str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0 = torch.load(out / "probe_rank0.pt")
    r1 = torch.load(out / "probe_rank1.pt")
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["backend"] == "gloo"
    assert r0["steps"].shape[0] == 4
    assert torch.equal(r0["steps"], r1["steps"]), "ranks diverged"
    assert not torch.equal(r0["steps"][0], r0["steps"][-1]), "parameters did not change"
