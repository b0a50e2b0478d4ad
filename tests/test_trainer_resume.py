"""Resuming restores the optimizer state (SGD momentum), which detectron2 v0.6's DefaultTrainer did not save."""
import os

import torch
from detectron2.config import get_cfg

import d2norm
from d2norm.data import prepare_datasets
from d2norm.engine import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(tmp, max_iter):
    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.merge_from_file(os.path.join(ROOT, "configs", "cpu", "faster_rcnn_R18_FPN_ghostbn.yaml"))
    cfg.merge_from_list([
        "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 64, "D2NORM.DATA.SYNTHETIC_IMAGE_SIZE", 64,
        "D2NORM.DATA.SYNTHETIC_NUM_TRAIN", 8, "D2NORM.DATA.SYNTHETIC_NUM_VAL", 2, "DATALOADER.NUM_WORKERS", 0,
        "SOLVER.MAX_ITER", max_iter, "SOLVER.WARMUP_ITERS", 0, "SOLVER.IMS_PER_BATCH", 2,
        "SOLVER.CHECKPOINT_PERIOD", 3, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", (),
        "OUTPUT_DIR", str(tmp / "out"), "D2NORM.DATA.SYNTHETIC_ROOT", str(tmp / "data"),
    ])
    prepare_datasets(cfg)
    return cfg


def _momenta(trainer):
    opt = trainer.optimizer
    return {id(p): opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups for p in g["params"]
            if p in opt.state}, [p for g in opt.param_groups for p in g["params"]]


def test_resume_restores_optimizer_state(tmp_path):
    torch.manual_seed(0)
    first = Trainer(_cfg(tmp_path, 3))
    first.train()
    saved, params = _momenta(first)
    assert saved, "SGD kept no momentum"
    ckpt = torch.load(tmp_path / "out" / "model_final.pth", map_location="cpu", weights_only=False)
    assert "_trainer" in ckpt["trainer"] and "optimizer" in ckpt["trainer"]["_trainer"]

    second = Trainer(_cfg(tmp_path, 6))
    second.resume_or_load(resume=True)
    assert second.start_iter == 3
    restored, params2 = _momenta(second)
    assert len(restored) == len(saved)
    for p1, p2 in zip(params, params2):
        if id(p1) in saved:
            torch.testing.assert_close(restored[id(p2)], saved[id(p1)])


def test_resume_from_checkpoint_without_optimizer_state_warns(tmp_path, caplog):
    """A checkpoint with no ``_trainer`` entry (v0.6 DefaultTrainer) resumes with a warning on every detectron2
    (upstream's own DefaultTrainer.load_state_dict would raise KeyError: '_trainer')."""
    import logging

    torch.manual_seed(0)
    Trainer(_cfg(tmp_path, 3)).train()
    path = tmp_path / "out" / "model_final.pth"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    del ckpt["trainer"]["_trainer"]
    torch.save(ckpt, path)

    second = Trainer(_cfg(tmp_path, 6))
    with caplog.at_level(logging.WARNING, logger="d2norm.engine.trainer"):
        second.resume_or_load(resume=True)
    assert second.start_iter == 3
    assert "no optimizer state" in caplog.text
    assert not second.optimizer.state  # fresh: no momentum buffers


def test_trainer_state_shim_matches_the_gap():
    """compat adds DefaultTrainer.state_dict/load_state_dict exactly when detectron2's DefaultTrainer lacks them
    (v0.6); upstream's own methods are left alone."""
    from detectron2.engine import DefaultTrainer

    from d2norm import compat

    own = DefaultTrainer.state_dict is not compat._trainer_state_dict
    assert compat.APPLIED["trainer_state"] == (not own)
    if compat.APPLIED["trainer_state"]:
        assert DefaultTrainer.load_state_dict is compat._trainer_load_state_dict
    else:
        import inspect

        assert '"_trainer"' in inspect.getsource(DefaultTrainer.state_dict)
    assert compat._shim_trainer_state() is False  # idempotent
