"""Checkpoints never lose a user's work: the statistics tools leave a training run's resume point alone, writes
are atomic, ``--resume`` falls back past unreadable files, non-finite statistics and checkpoints of another
architecture are never taken silently. Each test reproduces a user's steps."""
import importlib.util
import logging
import os

import pytest
import torch
from detectron2.config import get_cfg

import d2norm
from d2norm.data import prepare_datasets
from d2norm.engine import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SMALL = ["INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 64, "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST",
         64, "D2NORM.DATA.SYNTHETIC_IMAGE_SIZE", 64, "D2NORM.DATA.SYNTHETIC_NUM_TRAIN", 8,
         "D2NORM.DATA.SYNTHETIC_NUM_VAL", 2, "DATALOADER.NUM_WORKERS", 0, "SOLVER.WARMUP_ITERS", 2,
         "SOLVER.IMS_PER_BATCH", 2, "SOLVER.CHECKPOINT_PERIOD", 2, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", ()]


def _cfg(tmp, max_iter, config="faster_rcnn_R18_FPN_ghostbn.yaml", extra=()):
    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.merge_from_file(os.path.join(ROOT, "configs", "cpu", config))
    cfg.merge_from_list(SMALL + ["SOLVER.MAX_ITER", max_iter, "OUTPUT_DIR", str(tmp / "out"),
                                 "D2NORM.DATA.SYNTHETIC_ROOT", str(tmp / "data"), *extra])
    prepare_datasets(cfg)
    return cfg


def _yaml(cfg, path):
    path.write_text(cfg.dump())
    return str(path)


def _files(folder):
    return {f: os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder)
            if os.path.isfile(os.path.join(folder, f))}


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _momenta(trainer):
    opt = trainer.optimizer
    return [opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups for p in g["params"] if p in opt.state]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A training run of 4 iterations (checkpoints at iterations 1, 3 and model_final), BN backbone."""
    tmp = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    cfg = _cfg(tmp, 4, extra=["MODEL.RESNETS.NORM", "BN"])
    trainer = Trainer(cfg)
    trainer.train()
    return {"tmp": tmp, "cfg": cfg, "out": cfg.OUTPUT_DIR, "momenta": _momenta(trainer),
            "yaml": _yaml(cfg, tmp / "run.yaml")}


# ---- the tools never change what --resume picks up ---------------------------------------------------------
@pytest.mark.slow
def test_tools_with_defaults_leave_resume_point_alone(trained):
    out = trained["out"]
    before = _files(out)
    assert open(os.path.join(out, "last_checkpoint")).read() == "model_final.pth"
    src = os.path.join(out, "model_final.pth")
    source = _load(src)
    common = ["--config-file", trained["yaml"], "--weights", src]
    assert _tool("recompute_bn_stats").main(common + ["--num-samples", "4", "--batch-size", "2"]) == 0
    assert _tool("fit_evalnorm").main(common + ["--rule", "4"]) == 0

    assert _files(out) == before  # nothing in the training folder was written or touched
    rc = _load(os.path.join(out, "recompute_bn_stats", "model_final_precise_bn_d2norm_synthetic_train.pth"))
    assert rc["iteration"] == source["iteration"] == 3
    assert rc["trainer"]["iteration"] == 3 and rc["trainer"].keys() == source["trainer"].keys()
    for a, b in zip(rc["trainer"]["_trainer"]["optimizer"]["state"].values(),
                    source["trainer"]["_trainer"]["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert not os.path.exists(os.path.join(out, "recompute_bn_stats", "last_checkpoint"))
    fit = _load(os.path.join(out, "fit_evalnorm", "model_final_evalnorm_rule.pth"))
    assert fit["iteration"] == 3 and "trainer" not in fit and "converted to EvalNorm" in fit["inference_only"]

    # --resume of the training run continues from ITS last checkpoint: iteration 4, optimizer state kept
    resumed = Trainer(_cfg(trained["tmp"], 6, extra=["MODEL.RESNETS.NORM", "BN"]))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 4
    for a, b in zip(_momenta(resumed), trained["momenta"]):
        assert torch.equal(a, b)


def test_tool_refuses_trainer_names_in_a_training_folder(tmp_path):
    from d2norm.engine import cli

    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    with pytest.raises(cli.ToolError, match="'model_final' is a name the trainer uses"):
        cli.save_checkpoint(torch.nn.Conv2d(1, 1, 1), str(tmp_path), "model_final")
    assert not (tmp_path / "model_final.pth").exists()
    cli.save_checkpoint(torch.nn.Conv2d(1, 1, 1), str(tmp_path), "model_precise")
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"


# ---- atomic writes and the resume fallback -----------------------------------------------------------------
def _copy_run(trained, tmp_path):
    import shutil

    shutil.copytree(trained["out"], tmp_path / "out")
    return tmp_path / "out"


def _resume(trained, tmp_path, max_iter=6):
    cfg = _cfg(tmp_path, max_iter, extra=["MODEL.RESNETS.NORM", "BN",
                                          "D2NORM.DATA.SYNTHETIC_ROOT", str(trained["tmp"] / "data")])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    return trainer


@pytest.mark.slow
def test_resume_falls_back_past_a_truncated_last_checkpoint(trained, tmp_path, caplog):
    out = _copy_run(trained, tmp_path)
    final = out / "model_final.pth"
    final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])  # a write cut in the middle
    with caplog.at_level(logging.WARNING, logger="d2norm"):
        trainer = _resume(trained, tmp_path)
    assert f"Cannot read checkpoint {final}" in caplog.text
    assert "Resuming from " + str(out / "model_0000003.pth") in caplog.text
    assert trainer.start_iter == 4  # model_0000003.pth holds iteration 3, as model_final did
    for a, b in zip(_momenta(trainer), trained["momenta"]):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_resume_with_empty_last_checkpoint(trained, tmp_path, caplog):
    out = _copy_run(trained, tmp_path)
    (out / "last_checkpoint").write_text("")
    with caplog.at_level(logging.WARNING, logger="d2norm"):
        trainer = _resume(trained, tmp_path)
    assert "last_checkpoint is empty" in caplog.text
    assert trainer.start_iter == 4


@pytest.mark.slow
def test_resume_without_any_readable_checkpoint_is_an_error(trained, tmp_path):
    out = _copy_run(trained, tmp_path)
    for f in out.glob("*.pth"):
        f.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"no readable training checkpoint; unreadable: .*model_final\.pth"):
        _resume(trained, tmp_path)


def test_interrupted_save_keeps_the_previous_files(tmp_path, monkeypatch):
    from d2norm.engine.checkpoint import D2NormCheckpointer

    model = torch.nn.Conv2d(2, 2, 1)
    ck = D2NormCheckpointer(model, save_dir=str(tmp_path))
    ck.save("model_final", iteration=1)
    good = (tmp_path / "model_final.pth").read_bytes()

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(OSError, match="No space left"):
        ck.save("model_final", iteration=2)
    assert (tmp_path / "model_final.pth").read_bytes() == good
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_final.pth"]  # no temp left


# ---- non-finite statistics are never written silently ------------------------------------------------------
def test_checkpoint_with_nonfinite_statistics(tmp_path, caplog):
    from d2norm.engine import cli
    from d2norm.engine.checkpoint import D2NormCheckpointer, NonFiniteCheckpointError

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    model[1].running_var[1] = float("nan")
    with caplog.at_level(logging.WARNING, logger="d2norm"):
        D2NormCheckpointer(model, save_dir=str(tmp_path)).save("model_0000001")
    assert "non-finite (NaN/Inf) statistics in 1 module(s): 1: running_var" in caplog.text
    assert _load(tmp_path / "model_0000001.pth")["nonfinite_statistics"] == {"1": ["running_var"]}
    with pytest.raises(NonFiniteCheckpointError, match="refusing to write .*1: running_var"):
        D2NormCheckpointer(model, save_dir=str(tmp_path), on_nonfinite="error").save("model_0000002")
    with pytest.raises(NonFiniteCheckpointError, match="refusing to write"):
        cli.save_checkpoint(model, str(tmp_path / "tool"), "model_precise")
    assert not (tmp_path / "model_0000002.pth").exists() and not (tmp_path / "tool" / "model_precise.pth").exists()


# ---- a checkpoint of another architecture ------------------------------------------------------------------
@pytest.fixture(scope="module")
def retinanet_weights(tmp_path_factory):
    from detectron2.checkpoint import DetectionCheckpointer

    tmp = tmp_path_factory.mktemp("retina")
    cfg = _cfg(tmp, 1, config="retinanet_R18_ghostbn.yaml")
    model = d2norm.layers.build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp)).save("retinanet")
    frcnn = _cfg(tmp, 1)
    state = model.state_dict()
    fmodel = d2norm.layers.build_model(frcnn)
    fparams, fstate = dict(fmodel.named_parameters()), fmodel.state_dict()
    missing = [k for k in fparams if k not in state]  # counted independently of the checkpointer
    return {"tmp": tmp, "path": str(tmp / "retinanet.pth"), "frcnn": frcnn, "yaml": _yaml(frcnn, tmp / "f.yaml"),
            "total": len(fparams), "missing": missing, "unused": [k for k in state if k not in fstate]}


def test_tool_fails_on_checkpoint_of_another_architecture(retinanet_weights, tmp_path, capsys):
    r = retinanet_weights
    rc = _tool("recompute_bn_stats").main(["--config-file", r["yaml"], "--weights", r["path"], "--num-samples", "2",
                                           "--batch-size", "2", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    n_missing = len(r["missing"])
    assert n_missing >= 10  # RPN and box head (and FPN level 2) are not in a RetinaNet checkpoint
    assert (f"does not fit this model: {r['total'] - n_missing} of {r['total']} parameter tensors of the model "
            f"loaded; {n_missing} not in the checkpoint (") in err
    assert "proposal_generator: " in err and "roi_heads: " in err
    assert f"{len(r['unused'])} checkpoint entries unused by the model" in err
    assert not list(tmp_path.glob("*.pth"))  # nothing written


def test_eval_only_fails_and_training_warns(retinanet_weights, tmp_path, caplog):
    from detectron2.engine import default_argument_parser

    from d2norm.engine.cli import ToolError  # train_net's command line prints it as one error line, exit 2

    r = retinanet_weights
    train_net = _tool("train_net")
    args = default_argument_parser().parse_args(
        ["--config-file", r["yaml"], "--eval-only", "MODEL.WEIGHTS", r["path"], "OUTPUT_DIR", str(tmp_path / "e")])
    with pytest.raises(ToolError, match=r"not in the checkpoint \(.*roi_heads"):
        train_net.main(args)

    cfg = r["frcnn"].clone()
    cfg.merge_from_list(["MODEL.WEIGHTS", r["path"], "OUTPUT_DIR", str(tmp_path / "t")])
    trainer = Trainer(cfg)
    with caplog.at_level(logging.WARNING, logger="d2norm"):
        trainer.resume_or_load(resume=False)  # fine-tuning from another detector: allowed, but said loudly
    n = len(r["missing"])
    assert f"{r['total'] - n} of {r['total']} parameter tensors of the model loaded; {n} not in" in caplog.text
    assert "Is this the checkpoint of another architecture?" in caplog.text
    assert "=" * 100 in caplog.text
    assert trainer.checkpointer.load_report.missing == r["missing"]


def test_most_of_the_model_not_loaded_is_said_so(tmp_path, caplog):
    from d2norm.engine.checkpoint import D2NormCheckpointer

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1), torch.nn.Conv2d(2, 2, 1), torch.nn.Conv2d(2, 2, 1))
    torch.save({"model": {"0.weight": model[0].weight.detach(), "9.weight": torch.zeros(1)}}, tmp_path / "x.pth")
    with caplog.at_level(logging.WARNING, logger="d2norm"):
        D2NormCheckpointer(model).load(str(tmp_path / "x.pth"))
    assert "MOST OF THE MODEL WAS NOT LOADED" in caplog.text
    assert "1 of 6 parameter tensors of the model loaded; 5 not in the checkpoint (0: 1, 1: 2, 2: 2)" in caplog.text
    assert "1 checkpoint entries unused by the model (9: 1)" in caplog.text


def test_evalnorm_alpha_beta_are_optional(tmp_path):
    """A BN checkpoint into an EvalNorm model: α̂, β̂ keep their documented initial values, not an error."""
    from d2norm.engine.checkpoint import D2NormCheckpointer
    from d2norm.layers import EvalNorm2d

    bn = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    torch.save({"model": bn.state_dict()}, tmp_path / "bn.pth")
    en = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), EvalNorm2d(3))
    ck = D2NormCheckpointer(en, on_mismatch="error")
    ck.load(str(tmp_path / "bn.pth"))
    assert ck.load_report.optional == ["1.alpha_logit", "1.beta_logit"] and not ck.load_report.missing
    assert ck.load_report.loaded == 4


# ---- the recompute tool on data with one NaN pixel ---------------------------------------------------------
def _poison_second_batch(monkeypatch):
    from d2norm.engine import cli

    real = cli.train_style_loader

    def loader(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 1:
                img = batch[0]["image"].float()
                img[1, 7, 9] = float("nan")  # one pixel of one channel of the first image
                batch[0]["image"] = img
            yield batch

    monkeypatch.setattr(cli, "train_style_loader", loader)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_recompute_tool_with_one_nan_pixel(trained, tmp_path, monkeypatch, capsys, policy):
    _poison_second_batch(monkeypatch)
    src = os.path.join(trained["out"], "model_final.pth")
    rc = _tool("recompute_bn_stats").main([
        "--config-file", trained["yaml"], "--weights", src, "--num-samples", "8", "--batch-size", "2",
        "--output-dir", str(tmp_path), "--nonfinite", policy])
    cap = capsys.readouterr()
    if policy == "error":
        assert rc == 2
        assert "error: PreciseBN: non-finite (NaN/Inf) batch statistics in " in cap.err
        assert "first: layer 'backbone.bottom_up.stem.conv1.norm' in batch 1 of rank 0 (its samples 2..3; images " \
            in cap.err and "/train/" in cap.err and ".png)" in cap.err
        assert not list(tmp_path.glob("*.pth"))
        return
    assert rc == 0 and "WARNING: non-finite batch statistics were left out of" in cap.out
    report = __import__("json").loads((tmp_path / "model_final_precise_bn_d2norm_synthetic_train.json").read_text())
    assert all(v == [b for b in v if b.startswith("batch 1 of rank 0")] for v in report["nonfinite_skipped"].values())
    assert len(report["nonfinite_skipped"]) == report["layers"]  # the NaN reaches every later layer
    ck = _load(tmp_path / "model_final_precise_bn_d2norm_synthetic_train.pth")
    assert all(torch.isfinite(v).all() for k, v in ck["model"].items() if v.is_floating_point())


def test_resume_when_last_checkpoint_names_a_missing_file(tmp_path, caplog):
    from d2norm.engine.checkpoint import D2NormCheckpointer

    model = torch.nn.Conv2d(2, 2, 1)
    ck = D2NormCheckpointer(model, save_dir=str(tmp_path))
    for it in (1, 3):
        with torch.no_grad():
            model.weight.fill_(it)
        ck.save(f"model_{it:07d}", iteration=it)
        os.utime(tmp_path / f"model_{it:07d}.pth", (1000 + it, 1000 + it))  # 3 is the newest
    torch.save({"model": {}}, tmp_path / "model_precise_bn_x.pth")  # a tool's output: never a resume candidate
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    fresh = torch.nn.Conv2d(2, 2, 1)
    with caplog.at_level(logging.WARNING, logger="d2norm"):
        extra = D2NormCheckpointer(fresh, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert "names 'model_final.pth', which does not exist" in caplog.text
    assert extra["iteration"] == 3 and torch.all(fresh.weight == 3)
