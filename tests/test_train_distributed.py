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


def _train_two_processes(tmp_path, *opts):
    """tests/_train_probe.py (train_net + a per-step parameter recorder) on 2 gloo processes, 4 iterations of the
    tiny GhostBN RetinaNet; returns both ranks' records."""
    out = tmp_path / "out"
    cmd = [
        sys.executable, os.path.join(ROOT, "tests", "_train_probe.py"),
        "--config-file", os.path.join(ROOT, "configs", "cpu", "retinanet_R18_ghostbn.yaml"),
        "--num-gpus", "2",
        *TINY, *opts,
        "SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "4", "TEST.EVAL_PERIOD", "0",
        "D2NORM.DATA.SYNTHETIC_ROOT", str(tmp_path / "data"), "OUTPUT_DIR", str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return tuple(torch.load(out / f"probe_rank{r}.pt", weights_only=False) for r in (0, 1))


@pytest.mark.slow
def test_two_process_gloo_training_keeps_ranks_identical(tmp_path):
    r0, r1 = _train_two_processes(tmp_path)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["backend"] == "gloo"
    assert r0["steps"].shape[0] == 4
    assert torch.equal(r0["steps"], r1["steps"]), "ranks diverged"
    assert not torch.equal(r0["steps"][0], r0["steps"][-1]), "parameters did not change"


@pytest.mark.slow
def test_two_process_monitor_and_evalnorm_fit_hooks(tmp_path):
    """The BN-statistics monitor and the EvalNorm offline fit run in a 2-process gloo training: no deadlock,
    identical parameters on both ranks after every step and after the fit, α̂/β̂ changed by the fit only,
    monitor scalars in metrics.json."""
    import json

    out = tmp_path / "out"
    r0, r1 = _train_two_processes(
        tmp_path,
        "MODEL.RESNETS.NORM", "EvalNorm", "D2NORM.EVALNORM.MODE", "offline",
        "D2NORM.EVALNORM_FIT.ENABLED", "True", "D2NORM.EVALNORM_FIT.BATCH_SIZE", "2",
        "D2NORM.EVALNORM.OFFLINE_ITERS", "3",
        "D2NORM.BN_MONITOR.ENABLED", "True", "D2NORM.BN_MONITOR.PERIOD", "2", "D2NORM.BN_MONITOR.NUM_BATCHES", "2",
        "D2NORM.BN_MONITOR.BATCH_SIZE", "2",
    )
    assert torch.equal(r0["steps"], r1["steps"])
    s0, s1 = r0["final_state"], r1["final_state"]
    logits = [k for k in s0 if k.endswith(("alpha_logit", "beta_logit"))]
    assert logits
    for k in logits:
        assert torch.equal(s0[k], s1[k]), k
    # the fit moved alpha/beta away from their init (logit of INIT_ALPHA = 0.1)
    init = torch.logit(torch.tensor(0.1))
    assert any(not torch.allclose(s0[k].float(), init) for k in logits)
    with open(out / "metrics.json") as f:
        keys = set().union(*(json.loads(line).keys() for line in f))
    assert any(k.startswith("bn_monitor/") and k.endswith("/mean_gap") for k in keys), sorted(keys)[:20]
