"""End to end through tools/train_net.py on the synthetic set: the tiny detector learns (COCO AP above a
calibrated threshold), --eval-only on the saved checkpoint reproduces the same AP, --resume continues from the
last iteration."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "cpu", "e2e_test.yaml")
# Calibrated on this machine: see the config's header for the AP measured at this schedule.
MIN_AP50 = float(os.environ.get("D2NORM_E2E_MIN_AP50", "3.0"))


def _run(args, out_dir, data_dir, extra=()):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", CONFIG, *args,
           "OUTPUT_DIR", str(out_dir), "D2NORM.DATA.SYNTHETIC_ROOT", str(data_dir), *extra]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.setdefault("OMP_NUM_THREADS", "2")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    return log


def _copypaste(log):
    m = re.findall(r"copypaste: ([-0-9.,nan]+)\n", log)
    assert m, "no COCO AP table in the log"
    return [float(v) for v in m[-1].split(",")]


def test_fold_needs_eval_only(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", CONFIG, "--fold"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--fold is an inference transform: use it with --eval-only" in res.stderr


@pytest.mark.slow
def test_train_eval_resume(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    log = _run([], out, data)
    assert "Average Precision" in log
    ap, ap50 = _copypaste(log)[:2]
    assert ap50 >= MIN_AP50, f"AP50 {ap50} below calibrated threshold {MIN_AP50}: the detector did not learn"
    with open(out / "metrics.json") as f:
        metrics = [json.loads(line) for line in f]
    final = [m for m in metrics if "bbox/AP" in m][-1]
    assert abs(final["bbox/AP"] - ap) < 1e-3
    import torch

    start = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["iteration"] + 1

    # --eval-only on the saved checkpoint reproduces the AP exactly
    log_eval = _run(["--eval-only"], tmp_path / "eval", data, ["MODEL.WEIGHTS", str(out / "model_final.pth")])
    again, first = _copypaste(log_eval), _copypaste(log)
    assert len(again) == len(first) and all(a == b or (a != a and b != b) for a, b in zip(again, first)), (again, first)

    # --eval-only --fold: norms folded into the convolutions, same AP (float rounding only)
    log_fold = _run(["--eval-only", "--fold"], tmp_path / "fold", data, ["MODEL.WEIGHTS", str(out / "model_final.pth")])
    assert re.search(r"fold_norms \(into the preceding convolution\): [1-9][0-9]* module\(s\) converted", log_fold)
    folded = _copypaste(log_fold)
    assert all(abs(a - b) <= 0.05 or (a != a and b != b) for a, b in zip(folded, first)), (folded, first)

    # --resume continues from the last iteration
    log_resume = _run(["--resume"], out, data, ["SOLVER.MAX_ITER", str(start + 5)])
    assert f"Starting training from iteration {start}" in log_resume
    assert torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["iteration"] == start + 4
