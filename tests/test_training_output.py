"""What a user sees when training with ``tools/train_net.py`` (run as a user runs it, in a subprocess): no
``torch.jit`` / ``yaml.unsafe_load`` warnings, no ANSI colour codes in ``log.txt``, the full model print and
config dump in ``log.txt`` only, and an EvalNorm model's ``loss_evalnorm`` (which trains only α̂, β̂,
evalnorm §3.4 eq 9) logged as its own scalar, not inside ``total_loss``."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TINY = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64", "D2NORM.DATA.SYNTHETIC_IMAGE_SIZE", "64", "D2NORM.DATA.SYNTHETIC_NUM_TRAIN",
        "4", "D2NORM.DATA.SYNTHETIC_NUM_VAL", "2", "DATALOADER.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "1",
        "SOLVER.WARMUP_ITERS", "0", "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "100000"]


def _train(config, tmp_path, *extra):
    out = tmp_path / "out"
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), PYTHONWARNINGS="default")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file",
           os.path.join(ROOT, config), *TINY, "OUTPUT_DIR", str(out), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(tmp_path), env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return res, out


@pytest.fixture(scope="module")
def evalnorm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalnorm_run")
    return _train("configs/cpu/faster_rcnn_R18_C4_evalnorm_table2a.yaml", tmp, "SOLVER.IMS_PER_BATCH", "2")


def test_console_has_no_warnings_and_no_model_print(evalnorm_run):
    res, out = evalnorm_run
    text = res.stdout + res.stderr
    assert "torch.jit" not in text, text[-3000:]
    assert "unsafe_load" not in text, text[-3000:]
    # the model print (hundreds of lines) and the full config dump are in log.txt only
    log = (out / "log.txt").read_text()
    assert "Model:\nEvalNormGeneralizedRCNN(" in log
    assert "EvalNormGeneralizedRCNN(" not in res.stdout
    assert "Running with full config" in log and "Running with full config" not in res.stdout
    assert "Contents of args.config_file" in log and "Contents of args.config_file" not in res.stdout
    assert "Environment info" in log and "Environment info:" not in res.stdout
    assert "log.txt" in res.stdout  # the console says where they went
    n_setup = res.stdout.split("Starting training from iteration 0")[0].count("\n")
    assert n_setup < 150, n_setup


def test_log_file_has_no_colour_codes(evalnorm_run):
    res, out = evalnorm_run
    log = (out / "log.txt").read_text()
    assert "Starting training" in log
    assert not ANSI.search(log), ANSI.findall(log)[:5]


def test_total_loss_excludes_evalnorm_aux_loss(evalnorm_run):
    res, out = evalnorm_run
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "total_loss" in r]
    assert rows  # one iteration: the written values are that iteration's (no smoothing window)
    for r in rows:
        det = sum(v for k, v in r.items() if k.startswith("loss_") and k != "loss_evalnorm")
        assert "loss_evalnorm" in r and r["loss_evalnorm"] > 0
        assert r["total_loss"] == pytest.approx(det, rel=1e-6, abs=1e-6), r


KNOWN_NOISE = ("torch.meshgrid: in an upcoming release", "TypedStorage is deprecated", "No CUDA runtime is found")


def test_train_net_console_has_no_third_party_noise(evalnorm_run):
    res, _ = evalnorm_run
    text = res.stdout + res.stderr
    for noise in KNOWN_NOISE:
        assert noise not in text, noise


@pytest.mark.slow
def test_lazyconfig_console_is_like_train_net(tmp_path):
    """tools/lazyconfig_train_net.py printed 258 console lines (environment table, coloured config, full model)
    and "unofficial COCO API" while evaluating with pycocotools; now the same rules as train_net.py."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONWARNINGS="default")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "lazyconfig_train_net.py"), "--config-file",
           os.path.join(ROOT, "configs", "lazy", "cpu", "faster_rcnn_R18_FPN_ghostbn.py"),
           "train.max_iter=1", "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
           "dataloader.test.num_workers=0", f"train.output_dir={out}", "lr_multiplier.warmup_length=0.0",
           "train.d2norm.DATA.SYNTHETIC_IMAGE_SIZE=64", "train.d2norm.DATA.SYNTHETIC_NUM_TRAIN=4",
           "train.d2norm.DATA.SYNTHETIC_NUM_VAL=2", f"train.d2norm.DATA.SYNTHETIC_ROOT={tmp_path / 'data'}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(tmp_path), env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    text = res.stdout + res.stderr
    log = (out / "log.txt").read_text()
    assert "GeneralizedRCNN(" in log and "GeneralizedRCNN(" not in text  # the model print: log.txt only
    assert "Contents of args.config_file" in log and "Contents of args.config_file" not in text
    assert "Environment info" in log and "Environment info:" not in text
    from d2norm import compat

    # without the compiled ops COCOeval is pycocotools' (compat), and the log must say so; with them (CI's upstream
    # leg) detectron2's fast C++ COCOeval runs and "unofficial" is true
    assert ("unofficial COCO API" in text) == compat.HAS_COMPILED_OPS and "official COCO API" in text
    for noise in KNOWN_NOISE:
        assert noise not in text, noise
    assert not ANSI.search(log)
    n_setup = res.stdout.split("Starting training from iteration 0")[0].count("\n")
    assert n_setup < 150, n_setup


def test_known_third_party_warnings_are_silenced_and_others_are_not():
    import warnings

    from d2norm.engine.log_output import quiet_known_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn("`broadcast_buffers` is deprecated. Use `forward_sync_buffers` instead.", FutureWarning)
        warnings.warn("torch.meshgrid: in an upcoming release, it will be required to pass the indexing argument.")
        warnings.warn("TypedStorage is deprecated. It will be removed in the future.")
        warnings.warn("something the user should see", UserWarning)
    assert [str(w.message) for w in caught] == ["something the user should see"]
