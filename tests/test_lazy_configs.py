"""LazyConfig training: every configs/lazy/ config instantiates; every CPU twin trains a few iterations with
tools/lazyconfig_train_net.py and is COCO-evaluated; train.d2norm configures d2norm's hooks; the optimizer gets
d2norm's parameter groups."""
import glob
import os
import sys

import pytest
import torch
from detectron2.config import LazyConfig
from detectron2.engine import default_argument_parser

import d2norm
from d2norm.engine.lazy import LazyTrainer, bridge_cfg, build_lazy_model
from d2norm.layers import norm_layer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

ALL = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "lazy", "**", "*.py"), recursive=True)
             if os.path.basename(p) != "common.py")
CPU = [p for p in ALL if os.sep + "cpu" + os.sep in p]
REL = lambda p: os.path.relpath(p, ROOT)  # noqa: E731
PAPER_ROWS = {  # upstream projects/Rethinking-BatchNorm/configs + one per other paper
    "rethinking/mask_rcnn_BNhead.py", "rethinking/mask_rcnn_BNhead_batch_stats.py",
    "rethinking/mask_rcnn_BNhead_shuffle.py", "rethinking/mask_rcnn_SyncBNhead.py",
    "rethinking/retinanet_SyncBNhead.py", "rethinking/retinanet_SyncBNhead_SharedTraining.py",
    "evalnorm/faster_rcnn_R50_FPN_evalnorm.py", "mabn/mask_rcnn_R50_FPN_mabn_scratch.py",
    "estimation_shift/faster_rcnn_R50_FPN_xbnblock.py", "four_things/faster_rcnn_R50_FPN_example_weighing.py",
    "ghost_bn/faster_rcnn_R50_FPN_ghostbn.py",
}


def _types(model):
    return {type(m).__name__ for m in model.modules()}


def test_every_paper_row_has_a_config_and_a_cpu_twin():
    coco = {os.path.relpath(p, os.path.join(ROOT, "configs", "lazy")) for p in ALL if p not in CPU}
    assert coco == PAPER_ROWS
    assert len(CPU) == len(PAPER_ROWS)


# What each config must contain once built (the d2norm component it exists for).
EXPECT = {
    ("mask_rcnn_BNhead.py", "mask_rcnn_R18_BNhead.py"): {"BatchNorm2d"},
    ("mask_rcnn_BNhead_batch_stats.py", "mask_rcnn_R18_BNhead_batch_stats.py"): {"BatchStatsBatchNorm2d"},
    ("mask_rcnn_BNhead_shuffle.py", "mask_rcnn_R18_BNhead_shuffle.py"): {"ShuffledConvFCHead",
                                                                       "ShuffledMaskRCNNConvUpsampleHead"},
    ("mask_rcnn_SyncBNhead.py", "mask_rcnn_R18_SyncBNhead.py"): {"AnySyncBatchNorm2d"},
    ("retinanet_SyncBNhead.py", "retinanet_R18_SyncBNhead.py", "retinanet_SyncBNhead_SharedTraining.py",
     "retinanet_R18_SyncBNhead_SharedTraining.py"): {"DomainBNRetinaNetHead", "SyncDomainBatchNorm2d"},
    ("faster_rcnn_R50_FPN_evalnorm.py", "faster_rcnn_R18_FPN_evalnorm.py"): {"EvalNorm2d", "EvalNormGeneralizedRCNN"},
    ("mask_rcnn_R50_FPN_mabn_scratch.py", "mask_rcnn_R18_FPN_mabn.py"): {"MABN2d", "CenteredConv2d"},
    ("faster_rcnn_R50_FPN_xbnblock.py", "faster_rcnn_R18_FPN_xbnblock.py"): {"BatchFreeNorm"},
    ("faster_rcnn_R50_FPN_example_weighing.py", "faster_rcnn_R18_FPN_example_weighing.py"):
        {"ExampleWeightedBatchNorm2d"},
    ("faster_rcnn_R50_FPN_ghostbn.py", "faster_rcnn_R18_FPN_ghostbn.py"): {"GhostBatchNorm2d"},
}


@pytest.mark.parametrize("path", ALL, ids=REL)
def test_lazy_config_instantiates(path):
    cfg = LazyConfig.load(path)
    bridge = bridge_cfg(cfg)
    bridge.defrost()
    bridge.MODEL.DEVICE = "cpu"
    model = build_lazy_model(cfg, bridge)
    found = _types(model)
    expected = [v for k, v in EXPECT.items() if os.path.basename(path) in k]
    assert expected, f"no expectation for {path}"
    for names in expected:
        assert names <= found, f"{REL(path)}: missing {names - found}"
    if "SharedTraining" in path:
        assert model.head.norm_layout["train_stats"] == "shared" and model.head.norm_layout["pop_stats"] == "shared"
    elif "retinanet_SyncBNhead" in path:  # Table 5 row 3
        assert model.head.norm_layout["train_stats"] == "per_level" and model.head.norm_layout["pop_stats"] == "shared"
    if "ghostbn" in path:
        assert {m.ghost_size for m in model.modules() if type(m).__name__ == "GhostBatchNorm2d"} == {2}
    if "mabn" in path:
        assert d2norm.modeling.backbone.mabn_resnet.check_mabn_wiring(model.backbone, "test") is None


def _tiny(cfg, tmp_path, max_iter=2):
    import detectron2.data.transforms as T
    from detectron2.config import LazyCall as L

    data = cfg.dataloader
    data.train.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=(64,), max_size=64,
                                                               sample_style="choice")]
    data.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=64, max_size=64)]
    data.train.total_batch_size = 2
    data.train.num_workers = data.test.num_workers = 0
    cfg.train.max_iter = max_iter
    cfg.lr_multiplier.warmup_length = 0.0
    cfg.train.output_dir = str(tmp_path / "out")
    cfg.train.d2norm.DATA = dict(SYNTHETIC_IMAGE_SIZE=64, SYNTHETIC_NUM_TRAIN=8, SYNTHETIC_NUM_VAL=4,
                                 SYNTHETIC_ROOT=str(tmp_path / "data"))
    # after 2 iterations scores are near the prior: keep every detection so COCOeval scores real predictions
    if "roi_heads" in cfg.model:
        cfg.model.roi_heads.box_predictor.test_score_thresh = 0.0
    else:
        cfg.model.test_score_thresh = 0.0
    return cfg


def _args(path, *extra):
    return default_argument_parser().parse_args(["--config-file", path, *extra])


@pytest.mark.slow
@pytest.mark.parametrize("path", CPU, ids=REL)
def test_cpu_twin_trains_and_evaluates(path, tmp_path):
    import lazyconfig_train_net

    torch.manual_seed(0)
    results = lazyconfig_train_net.run(_tiny(LazyConfig.load(path), tmp_path), _args(path))
    assert "bbox" in results, results
    ap = results["bbox"]["AP"]
    assert ap == ap and 0.0 <= ap <= 100.0  # COCOeval scored predictions (AP ~0 after 2 iterations)
    ckpt = torch.load(tmp_path / "out" / "model_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 1 and "optimizer" in ckpt["trainer"]["_trainer"]
    # default_setup's LazyConfig.save wrote a real yaml (no pickle fallback) that loads and builds the same model
    saved = tmp_path / "out" / "config.yaml"
    assert saved.is_file() and not (tmp_path / "out" / "config.yaml.pkl").exists()
    again = LazyConfig.load(str(saved))
    bridge = bridge_cfg(again)
    assert _types(build_lazy_model(again, bridge)) == _types(build_lazy_model(LazyConfig.load(path), bridge))


@pytest.mark.slow
def test_train_d2norm_hooks_resume_and_eval_only(tmp_path):
    """train.d2norm enables PreciseBN + the FrozenBN switch + the BN monitor; --resume continues from the last
    checkpoint; --eval-only loads the post-switch checkpoint."""
    import lazyconfig_train_net
    from d2norm.layers.frozen import FrozenBatchNorm as FrozenBatchNorm2d  # trainable γ/β (§4.3)

    path = os.path.join(ROOT, "configs", "lazy", "cpu", "mask_rcnn_R18_BNhead.py")
    cfg = _tiny(LazyConfig.load(path), tmp_path, max_iter=3)
    cfg.train.d2norm.PRECISE_BN = dict(ENABLED=True, PERIOD=0, NUM_SAMPLES=4, BATCH_SIZE=2)
    cfg.train.d2norm.FROZEN_BN_SWITCH = dict(ENABLED=True, ITER=2, PRECISE_BN=True)
    cfg.train.d2norm.BN_MONITOR = dict(ENABLED=True, PERIOD=1, NUM_BATCHES=1, BATCH_SIZE=2)
    trainer = LazyTrainer(cfg)
    names = [type(h).__name__ for h in trainer._hooks]
    assert {"PreciseBNHook", "FrozenBNSwitchHook", "BNMonitorHook"} <= set(names)
    trainer.train()
    switch = next(h for h in trainer._hooks if type(h).__name__ == "FrozenBNSwitchHook")
    assert switch.switched and switch.switched_at == 2
    frozen = [m for m in trainer.model.roi_heads.box_head.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 4  # the 4 BN layers of the 4conv1fc box head
    assert next(h for h in trainer._hooks if type(h).__name__ == "PreciseBNHook").num_runs >= 1

    # --resume to a longer schedule continues at iteration 3 from the converted model
    cfg.train.max_iter = 4
    again = LazyTrainer(cfg)
    again.resume_or_load(resume=True)
    assert again.start_iter == 3
    assert len([m for m in again.model.roi_heads.box_head.modules() if isinstance(m, FrozenBatchNorm2d)]) == 4

    # --eval-only with the final (post-switch) checkpoint
    cfg.train.init_checkpoint = str(tmp_path / "out" / "model_final.pth")
    res = lazyconfig_train_net.run(cfg, _args(path, "--eval-only"))
    assert "bbox" in res and "segm" in res


def test_optimizer_gets_d2norm_param_groups():
    """detectron2's get_default_optimizer_params in optimizer.params is replaced by d2norm's: weight_decay_norm for
    every d2norm layer (MABN is no torch norm class), none for EvalNorm's α̂/β̂."""
    from torch import nn

    from d2norm.layers import EvalNorm2d, MABN2d

    path = os.path.join(ROOT, "configs", "lazy", "cpu", "mask_rcnn_R18_BNhead.py")
    cfg = LazyConfig.load(path)
    from detectron2.solver.build import get_default_optimizer_params

    cfg.optimizer.params._target_ = get_default_optimizer_params
    cfg.optimizer.params.weight_decay_norm = 0.5
    cfg.optimizer.weight_decay = 1e-4
    model = nn.Sequential(nn.Conv2d(3, 4, 1), MABN2d(4), EvalNorm2d(4))
    opt = LazyTrainer.build_optimizer(type("T", (), {"lazy": cfg})(), bridge_cfg(cfg), model)
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd[id(model[0].weight)] == 1e-4
    assert wd[id(model[1].weight)] == wd[id(model[1].bias)] == 0.5
    assert wd[id(model[2].weight)] == 0.5
    assert wd[id(model[2].alpha_logit)] == wd[id(model[2].beta_logit)] == 0.0


def test_bad_train_d2norm_key_is_named():
    path = os.path.join(ROOT, "configs", "lazy", "cpu", "mask_rcnn_R18_BNhead.py")
    cfg = LazyConfig.load(path)
    cfg.train.d2norm.PRECISE_BN = dict(ENABLD=True)
    with pytest.raises(ValueError, match=r"train\.d2norm: .*ENABLD"):
        bridge_cfg(cfg)
    cfg = LazyConfig.load(path)
    cfg.train.amp.enabled = True
    with pytest.raises(ValueError, match=r"train.amp.enabled=True needs train.device 'cuda'.*'cpu'"):
        bridge_cfg(cfg)


def test_names_resolve_with_train_d2norm_options():
    """A d2norm name (or norm_layer(name) without options) in a lazy config takes its options from train.d2norm
    inside the trainer; explicit norm_layer options win."""
    path = os.path.join(ROOT, "configs", "lazy", "cpu", "faster_rcnn_R18_FPN_ghostbn.py")
    cfg = LazyConfig.load(path)
    cfg.train.d2norm.GHOST_BN = dict(SIZE=3)
    cfg.model.backbone.bottom_up.stem.norm = "GhostBN"
    cfg.model.backbone.bottom_up.stages.norm = norm_layer("GhostBN")
    bridge = bridge_cfg(cfg)
    model = build_lazy_model(cfg, bridge)
    assert {m.ghost_size for m in model.modules() if type(m).__name__ == "GhostBatchNorm2d"} == {3}
    cfg.model.backbone.bottom_up.stages.norm = norm_layer("GhostBN", ghost_size=5)
    model = build_lazy_model(cfg, bridge)
    sizes = [m.ghost_size for n, m in model.named_modules() if type(m).__name__ == "GhostBatchNorm2d"]
    assert sizes[0] == 3 and set(sizes[1:]) == {5}


@pytest.mark.slow
def test_lazyconfig_train_net_two_processes_cli(tmp_path):
    """tools/lazyconfig_train_net.py --num-gpus 2 (gloo on CPU) with key=value overrides: the shuffled-RoI heads
    train across both ranks and the model is COCO-evaluated."""
    import subprocess

    path = os.path.join(ROOT, "configs", "lazy", "cpu", "mask_rcnn_R18_BNhead_shuffle.py")
    overrides = [
        "train.max_iter=2", "lr_multiplier.warmup_length=0.0", "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0", f"train.output_dir={tmp_path / 'out'}",
        "train.d2norm.DATA.SYNTHETIC_NUM_TRAIN=8", "train.d2norm.DATA.SYNTHETIC_NUM_VAL=4",
        f"train.d2norm.DATA.SYNTHETIC_ROOT={tmp_path / 'data'}", "model.roi_heads.box_predictor.test_score_thresh=0.0",
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "lazyconfig_train_net.py"), "--config-file",
                           path, "--num-gpus", "2", *overrides], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "World size: 2" in out and "copypaste: Task: bbox" in out and "copypaste: Task: segm" in out
    ckpt = torch.load(tmp_path / "out" / "model_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 1


def test_lazyconfig_train_net_bad_config_is_one_error_line(tmp_path):
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    tool = os.path.join(ROOT, "tools", "lazyconfig_train_net.py")
    missing = str(tmp_path / "nope.py")
    proc = subprocess.run([sys.executable, tool, "--config-file", missing], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2 and f"error: config file {missing!r} not found" in proc.stderr
    path = os.path.join(ROOT, "configs", "lazy", "cpu", "mask_rcnn_R18_BNhead.py")
    proc = subprocess.run([sys.executable, tool, "--config-file", path, "train.d2norm.PRECISE_BN.ENABLD=True"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "error: config" in proc.stderr and "ENABLD" in proc.stderr
