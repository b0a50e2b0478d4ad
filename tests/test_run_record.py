"""A run's folder is its record (issue "nothing lost", items 1-3): each test is a user's command line through
``tools/train_net.py`` / the statistics tools, and checks that the run's files are byte-identical afterwards
where nothing should have been written.

1. ``--resume`` in a folder whose ``last_checkpoint`` was deleted continues from the newest readable checkpoint;
   a launch from scratch into a finished run's folder is refused (``--overwrite`` to start over).
2. A failed launch into a run's folder writes nothing; a launch with another config keeps the previous
   ``config.yaml`` as ``config.<k>.yaml``; the config ``fit_evalnorm.py`` writes evaluates into its own folder.
3. ``recompute_bn_stats.py`` names its output after the source checkpoint and never overwrites an earlier one.
"""
import hashlib
import importlib.util
import os
import shutil

import pytest
import torch

import d2norm  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "cpu", "faster_rcnn_R18_FPN_ghostbn.yaml")

SMALL = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
         "INPUT.MAX_SIZE_TEST", "64", "D2NORM.DATA.SYNTHETIC_IMAGE_SIZE", "64", "D2NORM.DATA.SYNTHETIC_NUM_TRAIN", "8",
         "D2NORM.DATA.SYNTHETIC_NUM_VAL", "2", "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "2",
         "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST",
         "()", "MODEL.RESNETS.NORM", "BN", "SEED", "3"]


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train_net(*argv):
    """``python tools/train_net.py ARGV``: the exit code (0 when it returns)."""
    try:
        _tool("train_net").cli(list(argv))
    except SystemExit as e:
        return e.code
    return 0


def _opts(tmp, out, max_iter=4):
    return [*SMALL, "SOLVER.MAX_ITER", str(max_iter), "OUTPUT_DIR", str(out), "D2NORM.DATA.SYNTHETIC_ROOT",
            str(tmp / "data")]


def _digest(folder):
    """{relative path: sha256} of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-iteration run (model_0000001, model_0000003, model_final, config.yaml, log.txt)."""
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "run"
    assert _train_net("--config-file", CONFIG, *_opts(tmp, out)) == 0
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000001.pth", "model_0000003.pth",
                                                         "model_final.pth"]
    return tmp, out


@pytest.fixture
def run(finished, tmp_path):
    """A private copy of the finished run (tests change or delete its files)."""
    tmp, out = finished
    shutil.copytree(out, tmp_path / "run")
    # as if it had been trained there: its config names its own folder (a relaunch then writes the same yaml)
    cfg = tmp_path / "run" / "config.yaml"
    cfg.write_text(cfg.read_text().replace(f"OUTPUT_DIR: {out}\n", f"OUTPUT_DIR: {tmp_path / 'run'}\n"))
    return tmp, tmp_path / "run"


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


# ---- 1. resume and fresh starts ------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_without_last_checkpoint_continues_from_the_newest_checkpoint(run, caplog):
    import logging

    tmp, out = run
    (out / "last_checkpoint").unlink()
    before = _digest(out)
    with caplog.at_level(logging.WARNING, logger="d2norm"):
        assert _train_net("--config-file", CONFIG, "--resume", *_opts(tmp, out)) == 0
    assert "last_checkpoint does not exist; resuming from the newest readable checkpoint" in caplog.text
    assert "Initializing from scratch" not in caplog.text
    after = _digest(out)
    after.pop("log.txt"), before.pop("log.txt")  # the log is appended to
    added = [k for k in after if k not in before]
    assert all(k.startswith("events.out.tfevents.") for k in added), added  # a new event file per launch
    assert {k: after[k] for k in before} == before  # the finished run resumed at its end: nothing rewritten

    # an interrupted run (newest checkpoint: iteration 1) continues from there, leaving that checkpoint alone
    (out / "model_final.pth").unlink()
    (out / "model_0000003.pth").unlink()
    first = (out / "model_0000001.pth").read_bytes()
    assert _train_net("--config-file", CONFIG, "--resume", *_opts(tmp, out)) == 0
    assert (out / "model_0000001.pth").read_bytes() == first
    assert torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["iteration"] == 3
    assert (out / "last_checkpoint").read_text() == "model_final.pth"


@pytest.mark.slow
def test_fresh_start_into_a_finished_run_is_refused_and_writes_nothing(run, capsys):
    tmp, out = run
    before = _digest(out)
    assert _train_net("--config-file", CONFIG, *_opts(tmp, out)) == 2
    err = capsys.readouterr().err
    assert "error: OUTPUT_DIR" in err and "holds the checkpoints of an earlier run" in err
    assert "model_final.pth" in err and "--resume" in err and "--overwrite" in err
    assert _digest(out) == before


@pytest.mark.slow
def test_overwrite_starts_over(run):
    tmp, out = run
    old = (out / "model_final.pth").read_bytes()
    assert _train_net("--config-file", CONFIG, "--overwrite", *_opts(tmp, out, max_iter=2)) == 0
    assert (out / "model_final.pth").read_bytes() != old  # told to: replaced
    assert torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["iteration"] == 1


def test_fresh_start_into_an_empty_or_tool_only_folder_is_allowed(tmp_path):
    from d2norm.engine.run_folder import check_fresh_start

    check_fresh_start(str(tmp_path / "missing"), resume=False, eval_only=False, overwrite=False)
    torch.save({}, tmp_path / "model_final_precise_bn_x.pth")  # a tool's output, not the trainer's
    check_fresh_start(str(tmp_path), resume=False, eval_only=False, overwrite=False)
    torch.save({}, tmp_path / "model_0000009.pth")
    with pytest.raises(ValueError, match=r"OUTPUT_DIR .* \(model_0000009\.pth\)"):
        check_fresh_start(str(tmp_path), resume=False, eval_only=False, overwrite=False)
    check_fresh_start(str(tmp_path), resume=True, eval_only=False, overwrite=False)
    check_fresh_start(str(tmp_path), resume=False, eval_only=True, overwrite=False)


# ---- 2. the run's config.yaml ------------------------------------------------------------------------------
@pytest.mark.slow
def test_failed_launch_into_a_run_writes_nothing(run, capsys):
    tmp, out = run
    before = _digest(out)
    assert _train_net("--config-file", CONFIG, "--resume", *_opts(tmp, out), "MODEL.RESNETS.NORM", "ghostbn") == 2
    assert "MODEL.RESNETS.NORM: Unknown norm 'ghostbn'" in capsys.readouterr().err
    assert _digest(out) == before
    # setup_cfg itself (e.g. called from a script) validates before writing too
    import argparse

    from d2norm.engine.trainer import setup_cfg

    args = argparse.Namespace(config_file=CONFIG, opts=[*_opts(tmp, out), "MODEL.RESNETS.NORM", "ghostbn"],
                              resume=True, eval_only=False, num_gpus=1, num_machines=1, machine_rank=0,
                              dist_url="auto")
    with pytest.raises(ValueError, match="Unknown norm 'ghostbn'"):
        setup_cfg(args)
    assert _digest(out) == before


@pytest.mark.slow
def test_launch_with_another_config_keeps_the_previous_one(run):
    tmp, out = run
    old = (out / "config.yaml").read_bytes()
    assert _train_net("--config-file", CONFIG, "--resume", *_opts(tmp, out, max_iter=5)) == 0
    assert (out / "config.1.yaml").read_bytes() == old
    assert b"MAX_ITER: 5" in (out / "config.yaml").read_bytes()
    # the same config again: nothing new kept
    assert _train_net("--config-file", CONFIG, "--resume", *_opts(tmp, out, max_iter=5)) == 0
    assert not (out / "config.2.yaml").exists()


@pytest.mark.slow
def test_eval_only_with_the_fit_evalnorm_config_leaves_the_run_alone(run):
    tmp, out = run
    before = _digest(out)
    cfg_file = tmp / "run.yaml"
    shutil.copy(out / "config.yaml", cfg_file)
    assert _tool("fit_evalnorm").main(["--config-file", str(cfg_file), "--weights", str(out / "model_final.pth"),
                                       "--rule", "2"]) == 0
    fit_dir = out / "fit_evalnorm"
    written = fit_dir / "model_final_evalnorm_rule.yaml"
    assert f"OUTPUT_DIR: {fit_dir}" in written.read_text()
    with_fit = _digest(out)
    assert {k: v for k, v in with_fit.items() if not k.startswith("fit_evalnorm")} == before
    assert _train_net("--config-file", str(written), "--eval-only", "DATASETS.TEST", "('d2norm_synthetic_val',)",
                      "D2NORM.DATA.SYNTHETIC_ROOT", str(tmp / "data")) == 0
    after = _digest(out)
    assert {k: v for k, v in after.items() if not k.startswith("fit_evalnorm")} == before  # the run untouched
    assert (fit_dir / "config.yaml").exists() and (fit_dir / "inference").is_dir()


# ---- 3. tool outputs ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_recompute_bn_stats_names_outputs_after_the_source_and_never_overwrites(run, capsys):
    tmp, out = run
    cfg_file = tmp / "run.yaml"
    shutil.copy(out / "config.yaml", cfg_file)
    tool = _tool("recompute_bn_stats")
    common = ["--config-file", str(cfg_file), "--num-samples", "4", "--batch-size", "2"]
    assert tool.main(common + ["--weights", str(out / "model_0000001.pth")]) == 0
    assert tool.main(common + ["--weights", str(out / "model_final.pth")]) == 0
    rc = out / "recompute_bn_stats"
    names = sorted(p.name for p in rc.glob("*.pth"))
    assert names == ["model_0000001_precise_bn_d2norm_synthetic_train.pth",
                     "model_final_precise_bn_d2norm_synthetic_train.pth"]
    first = _weights(rc / names[0])
    assert not all(torch.equal(v, _weights(rc / names[1])[k]) for k, v in first.items())
    before = _digest(out)
    capsys.readouterr()
    assert tool.main(common + ["--weights", str(out / "model_0000001.pth"), "--seed", "5"]) == 2
    assert "model_0000001_precise_bn_d2norm_synthetic_train.pth' exists" in capsys.readouterr().err
    assert _digest(out) == before  # the repeated command changed nothing
    assert tool.main(common + ["--weights", str(out / "model_0000001.pth"), "--seed", "5", "--overwrite"]) == 0


# ---- evaluation never runs on statistics the checkpoint does not hold (issue items 5, 6) ----------------------
@pytest.mark.slow
def test_eval_only_with_nonfinite_statistics_fails_naming_the_layer(run, capsys):
    tmp, out = run
    ck = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    key = next(k for k in ck["model"] if k.endswith("running_var"))
    ck["model"][key][1] = float("nan")
    torch.save(ck, tmp / "nan.pth")
    rc = _train_net("--config-file", str(out / "config.yaml"), "--eval-only", "MODEL.WEIGHTS", str(tmp / "nan.pth"),
                    "DATASETS.TEST", "('d2norm_synthetic_val',)", "OUTPUT_DIR", str(tmp / "eval_nan"))
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "error: non-finite (NaN/Inf) statistics in 1 layer(s)" in err and key.rsplit(".", 1)[0] in err


@pytest.mark.slow
def test_eval_only_of_a_bn_checkpoint_in_an_mabn_model_fails(run, capsys, caplog):
    """MABN's χ̂ (running_chi) is not in a BN checkpoint: evaluating with χ̂ = 1 is refused; training from it
    (fine-tuning, mabn Table 6) only warns."""
    import logging

    tmp, out = run
    rc = _train_net("--config-file", str(out / "config.yaml"), "--eval-only", "MODEL.RESNETS.NORM", "MABN",
                    "MODEL.WEIGHTS", str(out / "model_final.pth"), "DATASETS.TEST", "('d2norm_synthetic_val',)",
                    "OUTPUT_DIR", str(tmp / "eval_mabn"))
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "has no population statistics for 20 normalization layer(s)" in err and "running_chi" in err

    from d2norm.engine.checkpoint import D2NormCheckpointer
    from d2norm.engine.cli import read_cfg
    from d2norm.layers import build_model

    cfg = read_cfg(str(out / "config.yaml"), ["MODEL.RESNETS.NORM", "MABN"])
    with caplog.at_level(logging.WARNING, logger="d2norm"):
        D2NormCheckpointer(build_model(cfg)).load(str(out / "model_final.pth"))  # training's policy: warn
    assert "no population statistics for 20 normalization layer(s)" in caplog.text


# ---- expected failures are one error line and exit code 2 (issue item 11) ---------------------------------
@pytest.fixture
def empty_val():
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = "d2norm_test_empty_val"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"], evaluator_type="coco")
    return name


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "corrupt", "empty_set"])
def test_eval_only_bad_inputs_are_one_error_line(run, capsys, case, empty_val):
    tmp, out = run
    weights, test = str(out / "model_final.pth"), "('d2norm_synthetic_val',)"
    if case == "missing":
        weights = str(tmp / "nope.pth")
    elif case == "corrupt":
        (tmp / "bad.pth").write_bytes(b"not a checkpoint")
        weights = str(tmp / "bad.pth")
    else:
        test = f"('{empty_val}',)"
    rc = _train_net("--config-file", str(out / "config.yaml"), "--eval-only", "MODEL.WEIGHTS", weights,
                    "DATASETS.TEST", test, "OUTPUT_DIR", str(tmp / f"eval_{case}"))
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    expected = {"missing": f"error: checkpoint not found: '{weights}' (MODEL.WEIGHTS)",
                "corrupt": f"error: cannot load checkpoint '{weights}' (MODEL.WEIGHTS)",
                "empty_set": f"error: dataset '{empty_val}' has no images"}[case]
    # exit code 2 comes from the tool's own error path (an uncaught exception would propagate out of _train_net)
    assert any(line.startswith(expected) for line in err.splitlines()), err[-2000:]


@pytest.mark.slow
def test_tools_on_an_empty_set_are_one_error_line(run, capsys, empty_val):
    tmp, out = run
    common = ["--config-file", str(out / "config.yaml"), "--weights", str(out / "model_final.pth"),
              "--output-dir", str(tmp / "tool")]
    assert _tool("tune_example_weight").main([*common, "--dataset", empty_val, "--alphas", "0.5"]) == 2
    assert f"error: dataset '{empty_val}' has no images" in capsys.readouterr().err
    assert _tool("recompute_bn_stats").main([*common, "--dataset", empty_val, "--forward", "inference"]) == 2
    assert f"error: dataset '{empty_val}' has no images" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_into_another_architecture_is_one_error_line(run, capsys):
    tmp, out = run
    before = _digest(out)
    rc = _train_net("--config-file", CONFIG, "--resume", *_opts(tmp, out, max_iter=6), "MODEL.ROI_BOX_HEAD.NUM_FC",
                    "1")
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "error: --resume: the checkpoint in" in err and "another architecture or norm" in err
    after = _digest(out)
    assert {k: after[k] for k in before if k not in ("log.txt", "config.yaml")} == \
        {k: v for k, v in before.items() if k not in ("log.txt", "config.yaml")}
    assert (out / "config.1.yaml").read_bytes() is not None  # the run's own config is kept
