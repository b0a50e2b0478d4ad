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
    rc = _load(os.path.join(out, "recompute_bn_stats", "model_precise_bn_d2norm_synthetic_train.pth"))
    assert rc["iteration"] == source["iteration"] == 3
    assert rc["trainer"]["iteration"] == 3 and rc["trainer"].keys() == source["trainer"].keys()
    for a, b in zip(rc["trainer"]["_trainer"]["optimizer"]["state"].values(),
                    source["trainer"]["_trainer"]["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert not os.path.exists(os.path.join(out, "recompute_bn_stats", "last_checkpoint"))
    fit = _load(os.path.join(out, "fit_evalnorm", "model_evalnorm_rule.pth"))
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
