"""EvalNorm-aware meta-architectures (evalnorm §3.4 online estimation, §4.3 Table 2).

* training with ``loss_evalnorm`` leaves every other parameter/buffer on exactly the plain-BN trajectory;
* ``loss_evalnorm`` is one term, decreases on a fixed batch because α̂, β̂ learn; α̂, β̂ reach the event storage;
* BN / FrozenBN / ImageNet-style (name-heuristic ``.pkl``) / folded-statistics checkpoints load into EvalNorm
  layers through ``DetectionCheckpointer`` and what cannot be mapped is reported;
* the Table 2 (a)-(d) keys give the documented state (fresh vs loaded statistics and affine, frozen vs trained).
"""
import glob
import itertools
import logging
import os
import pickle

import pytest
import torch

import d2norm  # noqa: F401,I001  (compat shims before detectron2 imports)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import SimpleTrainer
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, ProposalNetwork, RetinaNet
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import d2norm.layers.evalnorm  # noqa: F401  (registers "EvalNorm")
import d2norm.modeling.meta_arch.evalnorm_arch as ea
from d2norm.layers import build_model
from d2norm.layers.evalnorm import evalnorm_modules
from d2norm.solver import build_optimizer

from helpers import tiny_r18_fpn_rcnn_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEM = "backbone.bottom_up.stem.conv1.norm"

# Table 2 rows -> keys (evalnorm §4.3); WEIGHTS "" = random init (row a), "ckpt" = a pretrained checkpoint
ROWS = {
    "a": dict(weights=False, STATS_INIT="fresh", AFFINE_INIT="fresh", FREEZE_STATS=False),
    "b": dict(weights=True, STATS_INIT="fresh", AFFINE_INIT="fresh", FREEZE_STATS=False),
    "c": dict(weights=True, STATS_INIT="loaded", AFFINE_INIT="loaded", FREEZE_STATS=True),
    "d": dict(weights=True, STATS_INIT="loaded", AFFINE_INIT="loaded", FREEZE_STATS=False),
}


# ---- tiny deterministic models and data ---------------------------------------------------------------------
def _batch(seed, n=2, size=64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        img = torch.rand(3, size, size, generator=g) * 200 + 20
        xy = torch.rand(3, 2, generator=g) * (size - 24)
        boxes = torch.cat([xy, xy + torch.rand(3, 2, generator=g) * 16 + 8], 1)
        for b in boxes.round().long():
            img[:, b[1] : b[3], b[0] : b[2]] = 240.0
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, 3, (3,), generator=g)
        out.append({"image": img, "instances": inst, "height": size, "width": size})
    return out


def _cfg(norm="EvalNorm", arch="EvalNormGeneralizedRCNN", **evalnorm_model):
    cfg = tiny_r18_fpn_rcnn_cfg(width=16, opts=[
        "MODEL.META_ARCHITECTURE", arch,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64, "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 200,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16,
        # EvalNorm in backbone, FPN and box head (evalnorm §4.3: base network and RCN)
        "MODEL.RESNETS.NORM", norm, "MODEL.FPN.NORM", norm, "MODEL.ROI_BOX_HEAD.NORM", norm,
        "SOLVER.BASE_LR", 0.01, "D2NORM.EVALNORM_MODEL.LOG_PERIOD", 1,
    ])
    for k, v in evalnorm_model.items():
        cfg.D2NORM.EVALNORM_MODEL[k] = v
    return cfg


def _retina(cfg):
    cfg.merge_from_list(
        [
            "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone",
            "MODEL.RESNETS.OUT_FEATURES", ["res3", "res4", "res5"], "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"],
        ]
    )
    return cfg


def _build(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.train()
    return model


def _train(model, cfg, batches, iters, start_iter=0):
    """detectron2's SimpleTrainer (what DefaultTrainer runs) with d2norm's optimizer; returns its EventStorage."""
    trainer = SimpleTrainer(model, itertools.cycle(batches), build_optimizer(cfg, model))
    torch.manual_seed(123)
    trainer.train(start_iter, start_iter + iters)
    return trainer.storage


def _is_alpha_beta(name):
    return name.endswith("alpha_logit") or name.endswith("beta_logit")


def _randomize_bn(model, seed=7):
    """Distinctive BN state (as a pretrained checkpoint would have): statistics and affine far from the init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in ea.bn_statistics_layers(model):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5 + 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.5)
            m.num_batches_tracked.fill_(1000)
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def bn_checkpoint(tmp_path_factory):
    """A plain-BN GeneralizedRCNN checkpoint (the 'pretrained' weights of Table 2 rows b-d) and its state."""
    model = _randomize_bn(_build(_cfg("BN", "GeneralizedRCNN")))
    d = str(tmp_path_factory.mktemp("bn_ckpt"))
    DetectionCheckpointer(model, save_dir=d).save("bn")
    return os.path.join(d, "bn.pth"), {k: v.clone() for k, v in model.state_dict().items()}


# ---- registration and options -------------------------------------------------------------------------------
def test_registered_archs_keep_base_names():
    for name, base in (("EvalNormGeneralizedRCNN", GeneralizedRCNN), ("EvalNormRetinaNet", RetinaNet)):
        assert name in META_ARCH_REGISTRY
        assert issubclass(META_ARCH_REGISTRY.get(name), base)
    cfg = _retina(_cfg(arch="EvalNormRetinaNet"))
    en = build_model(cfg)
    assert isinstance(en, RetinaNet) and isinstance(en, ea.EvalNormModelMixin)
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    plain = build_model(cfg)
    assert type(plain) is RetinaNet
    assert list(en.state_dict()) == list(plain.state_dict())  # checkpoints of the base arch load as they are
    # the generic entry point: any registered meta-architecture class
    cfg = _cfg(arch="EvalNormMetaArch")
    cfg.D2NORM.EVALNORM_MODEL.BASE_META_ARCHITECTURE = "ProposalNetwork"
    m = build_model(cfg)
    assert isinstance(m, ProposalNetwork) and isinstance(m, ea.EvalNormModelMixin)
    assert type(m).__name__ == "EvalNormProposalNetwork" and ea.evalnorm_aware(ProposalNetwork) is type(m)
    assert ea.evalnorm_aware(GeneralizedRCNN) is ea.EvalNormGeneralizedRCNN
    assert len(evalnorm_modules(m)) > 0


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("STATS_INIT", "random", "STATS_INIT.*'random'"),
        ("AFFINE_INIT", "imagenet", "AFFINE_INIT.*'imagenet'"),
        ("FREEZE_STATS", 1, "FREEZE_STATS.*1"),
        ("LOG_PERIOD", -1, "LOG_PERIOD.*-1"),
        ("BASE_META_ARCHITECTURE", "NoSuchArch", "NoSuchArch.*valid:.*GeneralizedRCNN"),
    ],
)
def test_bad_options_raise(key, value, match):
    cfg = _cfg(arch="EvalNormMetaArch")
    cfg.D2NORM.EVALNORM_MODEL[key] = value
    with pytest.raises(ValueError, match=match):
        build_model(cfg)


def test_bad_weight_and_contradictions_raise():
    cfg = _cfg()
    cfg.D2NORM.EVALNORM.AUX_LOSS_WEIGHT = -1.0
    with pytest.raises(ValueError, match="AUX_LOSS_WEIGHT.*-1.0"):
        build_model(cfg)
    cfg = _cfg(FREEZE_STATS=True)
    cfg.D2NORM.PRECISE_BN.ENABLED = True
    with pytest.raises(ValueError, match="FREEZE_STATS.*PRECISE_BN"):
        build_model(cfg)
    # statistics outside BN's EMA (MABN) cannot be frozen / reset by these keys
    cfg = _cfg("MABN", FREEZE_STATS=True)
    with pytest.raises(ValueError, match="BN-derived layers only.*fpn_lateral2.norm"):
        build_model(cfg)


# ---- training: same trajectory as BN, one named term, logging ----------------------------------------------
@pytest.mark.parametrize("arch", ["rcnn", "retinanet"])
def test_training_equals_plain_bn_except_alpha_beta(arch):
    """§3.4: the stop-gradient aux loss moves only α̂, β̂: after K DefaultTrainer-style steps with the same seed,
    data and init, every parameter and BN buffer is bit-identical to the plain-BN model's."""
    k = 3
    if arch == "rcnn":
        bn_cfg, en_cfg = _cfg("BN", "GeneralizedRCNN"), _cfg("EvalNorm", "EvalNormGeneralizedRCNN")
    else:  # EvalNorm in backbone + FPN; the head without norm (stock "BN" would be a per-level CycleBatchNormList)
        bn_cfg, en_cfg = _retina(_cfg("BN", "RetinaNet")), _retina(_cfg("EvalNorm", "EvalNormRetinaNet"))
    batches = [_batch(1), _batch(2)]
    if arch == "retinanet":
        # RetinaNet's focal loss is a TorchScript function whose first (profiling) call differs from later calls in
        # the last bits: warm it up so that both compared runs use the same executor state.
        _train(_build(bn_cfg), bn_cfg, batches, 1)
    bn = _build(bn_cfg)
    en = _build(en_cfg)
    incompatible = en.load_state_dict(bn.state_dict(), strict=False)  # same init
    assert not incompatible.unexpected_keys
    assert incompatible.missing_keys and all(
        k.rsplit(".", 1)[1] in ("alpha_logit", "beta_logit", "seen_batch_size", "seen_batches")
        for k in incompatible.missing_keys
    )
    init_ab = {n: p.detach().clone() for n, p in en.named_parameters() if _is_alpha_beta(n)}
    assert len(init_ab) == 2 * len(evalnorm_modules(en)) > 0

    bn_storage = _train(bn, bn_cfg, batches, k)
    en_storage = _train(en, en_cfg, batches, k)

    en_params = dict(en.named_parameters())
    bn_params = dict(bn.named_parameters())
    assert set(en_params) - set(bn_params) == set(init_ab)
    for name, p in bn_params.items():
        assert torch.equal(p, en_params[name]), name
    en_bufs = dict(en.named_buffers())
    for name, b in bn.named_buffers():
        assert torch.equal(b, en_bufs[name]), name
    # ... and the models did train, and α̂, β̂ learned
    assert not torch.equal(bn_params[f"{STEM}.weight"], torch.ones_like(bn_params[f"{STEM}.weight"]))
    assert all(not torch.equal(en_params[n], v) for n, v in init_ab.items())
    # the detector losses are the same; loss_evalnorm is the only extra term
    bn_hist, en_hist = bn_storage.histories(), en_storage.histories()
    bn_losses = {n for n in bn_hist if n.startswith("loss_")}
    assert {n for n in en_hist if n.startswith("loss_")} == bn_losses | {ea.LOSS_KEY}
    for n in bn_losses:
        assert bn_hist[n].values() == en_hist[n].values(), n
    assert len(en_hist[ea.LOSS_KEY].values()) == k and all(v > 0 for v, _ in en_hist[ea.LOSS_KEY].values())


def test_loss_evalnorm_decreases_on_fixed_batch():
    """On a fixed batch with the EMA frozen, loss_evalnorm decreases over a few steps, and it is α̂, β̂ that make
    it decrease: a control run with a negligible weight (identical network trajectory, by the test above) ends
    with a larger unweighted aux loss."""
    fixed = [_batch(3)]
    steps, w = 6, 50.0
    runs = {}
    for weight in (w, 1e-6):
        cfg = _cfg(FREEZE_STATS=True)
        cfg.D2NORM.EVALNORM.AUX_LOSS_WEIGHT = weight
        storage = _train(_build(cfg), cfg, fixed, steps)
        runs[weight] = [v / weight for v, _ in storage.history(ea.LOSS_KEY).values()]
    learned, control = runs[w], runs[1e-6]
    assert learned[0] == pytest.approx(control[0], rel=1e-5)  # same model, same first forward
    assert all(b < a for a, b in zip(learned, learned[1:])), learned
    assert learned[-1] < 0.85 * learned[0]
    assert learned[-1] < 0.9 * control[-1], (learned, control)


def test_alpha_beta_in_event_storage():
    cfg = _cfg()
    cfg.D2NORM.EVALNORM.INIT_ALPHA = 0.2
    cfg.D2NORM.EVALNORM.INIT_BETA = 0.3
    cfg.D2NORM.EVALNORM.AUX_LOSS_WEIGHT = 20.0
    model = _build(cfg)
    layers = evalnorm_modules(model)
    storage = _train(model, cfg, [_batch(1)], 3)
    hist = storage.histories()
    for name, m in layers.items():
        a = hist[f"evalnorm/alpha/{name}"].values()
        b = hist[f"evalnorm/beta/{name}"].values()
        assert [it for _, it in a] == [0, 1, 2]
        # logged in each forward: the value that iteration's forward used (before its optimizer step)
        assert a[0][0] == pytest.approx(0.2, abs=1e-6) and b[0][0] == pytest.approx(0.3, abs=1e-6)
        assert a[-1][0] != a[0][0]
    last = torch.tensor([hist[f"evalnorm/alpha/{n}"].latest() for n in layers])
    assert hist["evalnorm/alpha_mean"].latest() == pytest.approx(float(last.mean()), rel=1e-6)
    assert hist["evalnorm/alpha_min"].latest() == pytest.approx(float(last.min()))
    assert hist["evalnorm/alpha_max"].latest() == pytest.approx(float(last.max()))

    # LOG_PERIOD / LOG_PER_LAYER
    cfg.D2NORM.EVALNORM_MODEL.LOG_PERIOD = 2
    cfg.D2NORM.EVALNORM_MODEL.LOG_PER_LAYER = False
    hist = _train(_build(cfg), cfg, [_batch(1)], 3).histories()
    assert [it for _, it in hist["evalnorm/beta_mean"].values()] == [0, 2]
    assert not any(n.startswith("evalnorm/alpha/") for n in hist)


@pytest.mark.parametrize("mode", ["rule", "offline"])
def test_no_loss_term_outside_online_mode(mode):
    cfg = _cfg()
    cfg.D2NORM.EVALNORM.MODE = mode
    cfg.D2NORM.EVALNORM.RULE_BATCH_SIZE = 2
    model = _build(cfg)
    with EventStorage(0) as storage:
        losses = model(_batch(1))
    assert ea.LOSS_KEY not in losses and "loss_cls" in losses
    expect = 0.25 if mode == "rule" else 0.1  # 1/B^2 with B = 2; else INIT_ALPHA
    assert storage.history("evalnorm/alpha_mean").latest() == pytest.approx(expect, abs=1e-6)


def test_stale_terms_dropped_and_eval_untouched():
    cfg = _cfg()
    model = _build(cfg)
    with EventStorage(0):
        model(_batch(1))  # loss dict discarded: its terms were collected
        layer = evalnorm_modules(model)[STEM]
        layer(torch.randn(2, 64, 8, 8) * 3 + 2)  # a stray forward whose term nobody collects
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(1)
        losses = model(_batch(1))
    ref = _build(cfg)
    ref.load_state_dict(state)
    # the reported loss contains only this iteration's terms
    with EventStorage(0):
        torch.manual_seed(1)
        ref_losses = ref(_batch(1))
    assert losses[ea.LOSS_KEY].item() == pytest.approx(ref_losses[ea.LOSS_KEY].item(), rel=1e-6)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model(_batch(4))
    assert len(out) == 2 and "instances" in out[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- checkpoints ---------------------------------------------------------------------------------------------
def _bn_tensors(state, prefix):
    return {k: v for k, v in state.items() if k.startswith(prefix + ".")}


def test_load_bn_checkpoint(bn_checkpoint, caplog):
    path, bn_state = bn_checkpoint
    model = _build(_cfg())
    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(model).load(path)
    state = model.state_dict()
    layers = evalnorm_modules(model)
    for name in layers:
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(state[f"{name}.{key}"], bn_state[f"{name}.{key}"]), (name, key)
    # not mappable from BN: alpha/beta keep their init, reported by the model and in the checkpointer's log
    report = model.evalnorm_load_report
    assert report.uninitialized_target == {n: ["alpha_logit", "beta_logit"] for n in layers}
    assert report.skipped == {} and report.converted == {}
    assert all(float(m.alpha_hat.detach()) == pytest.approx(0.1) for m in layers.values())
    assert "alpha_logit" in caplog.text


def test_load_frozen_bn_checkpoint(tmp_path):
    """A detectron2 model trained with NORM "FrozenBN" (FrozenBatchNorm2d buffers) loads into EvalNorm layers."""
    cfg = _cfg("FrozenBN", "GeneralizedRCNN")
    cfg.MODEL.FPN.NORM = ""
    cfg.MODEL.ROI_BOX_HEAD.NORM = ""
    frozen = _build(cfg)
    g = torch.Generator().manual_seed(3)
    fbn = {n: m for n, m in frozen.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert fbn
    with torch.no_grad():
        for m in fbn.values():
            for t in (m.weight, m.bias, m.running_mean):
                t.copy_(torch.randn(t.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    DetectionCheckpointer(frozen, save_dir=str(tmp_path)).save("frozen")
    en_cfg = _cfg()
    en_cfg.MODEL.FPN.NORM = ""
    en_cfg.MODEL.ROI_BOX_HEAD.NORM = ""
    model = _build(en_cfg)
    DetectionCheckpointer(model).load(str(tmp_path / "frozen.pth"))
    layers = evalnorm_modules(model)
    assert set(layers) == set(fbn)
    for name, m in layers.items():
        for key in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(m, key), getattr(fbn[name], key)), (name, key)
    assert not any("running_mean" in k for k in model.evalnorm_load_report.uninitialized_target.values())
    # EMA evaluation of the converted layer = the FrozenBN function (eps as FrozenBN's); EvalNorm eval differs
    x = torch.randn(2, 64, 8, 8) * 3 + 2
    m, f = layers[STEM], fbn[STEM]
    m.eval()
    ref = torch.nn.functional.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
    assert torch.allclose(ref, f(x), atol=1e-5)


def test_load_imagenet_style_pkl_and_folded_checkpoint(tmp_path, bn_checkpoint, caplog):
    """ImageNet checkpoints: a torchvision-converted ``.pkl`` (backbone names without ``backbone.bottom_up``,
    numpy arrays, ``matching_heuristics``) maps BN statistics into EvalNorm layers; a FrozenBN file with the
    statistics folded into scale/shift (Caffe2/MSRA R-50) is reported as 'affine without statistics'."""
    _, bn_state = bn_checkpoint
    prefix = "backbone.bottom_up."
    blobs = {k[len(prefix):]: v.numpy() for k, v in bn_state.items() if k.startswith(prefix)}
    assert "stem.conv1.norm.running_var" in blobs and "res2.0.conv1.norm.running_mean" in blobs
    pkl = tmp_path / "R-18-tv.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": blobs, "__author__": "torchvision", "matching_heuristics": True}, f)
    model = _build(_cfg())
    DetectionCheckpointer(model).load(str(pkl))
    for name, m in evalnorm_modules(model).items():
        if name.startswith("backbone.bottom_up"):
            assert torch.equal(m.running_var, bn_state[f"{name}.running_var"]), name
            assert torch.equal(m.weight, bn_state[f"{name}.weight"]), name
    report = model.evalnorm_load_report
    assert not any("running_mean" in k for k in report.uninitialized_target.values())
    assert report.skipped and all(not n.startswith("backbone.bottom_up") for n in report.skipped)

    # statistics folded into the affine: only weight/bias per norm
    folded = {k: v for k, v in bn_state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    path = tmp_path / "folded.pth"
    torch.save({"model": folded}, path)
    model = _build(_cfg())
    with caplog.at_level(logging.WARNING, logger=ea.__name__):
        DetectionCheckpointer(model).load(str(path))
    report = model.evalnorm_load_report
    assert sorted(n for n, k in report.uninitialized_target.items() if k[:2] == ["running_mean", "running_var"]) \
        == sorted(evalnorm_modules(model))
    assert "no running statistics" in caplog.text and STEM in caplog.text
    m = evalnorm_modules(model)[STEM]
    assert torch.equal(m.weight, bn_state[f"{STEM}.weight"])
    assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
    assert torch.equal(m.running_var, torch.ones_like(m.running_var))


# ---- Table 2 set-ups -----------------------------------------------------------------------------------------
def _probe(layer):
    """Record, at the layer's training forward, its input and the state it starts from."""
    seen = {}

    def hook(mod, args):
        seen.update(
            x=args[0].detach().double(),
            mean=mod.running_mean.clone(),
            var=mod.running_var.clone(),
            weight=mod.weight.detach().clone(),
            bias=mod.bias.detach().clone(),
        )

    layer.register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize("row", sorted(ROWS))
def test_table2_rows(row, bn_checkpoint):
    """Each row's keys give its documented state at the first step and after it (float64 EMA reference)."""
    spec = dict(ROWS[row])
    with_weights = spec.pop("weights")
    cfg = _cfg(**spec)
    model = _build(cfg)
    path, bn_state = bn_checkpoint
    if with_weights:
        DetectionCheckpointer(model).load(path)
    layer = evalnorm_modules(model)[STEM]
    frozen = spec["FREEZE_STATS"]
    assert all(m.momentum == (0.0 if frozen else 0.1) for _, m in ea.bn_statistics_layers(model))
    seen = _probe(layer)
    a0 = float(layer.alpha_hat.detach())
    _train(model, cfg, [_batch(5)], 1)

    loaded = {k: bn_state[f"{STEM}.{k}"] for k in ("running_mean", "running_var", "weight", "bias")}
    if spec["STATS_INIT"] == "fresh":  # rows a, b: BN's initial statistics at the first step
        assert torch.equal(seen["mean"], torch.zeros_like(seen["mean"]))
        assert torch.equal(seen["var"], torch.ones_like(seen["var"]))
    else:  # rows c, d
        assert torch.equal(seen["mean"], loaded["running_mean"]) and torch.equal(seen["var"], loaded["running_var"])
    if spec["AFFINE_INIT"] == "fresh":
        assert torch.equal(seen["weight"], torch.ones_like(seen["weight"]))
        assert torch.equal(seen["bias"], torch.zeros_like(seen["bias"]))
    else:
        assert torch.equal(seen["weight"], loaded["weight"]) and torch.equal(seen["bias"], loaded["bias"])
    if frozen:  # row c: the EMA is exactly the loaded one after training
        assert torch.equal(layer.running_mean, loaded["running_mean"])
        assert torch.equal(layer.running_var, loaded["running_var"])
    else:  # EMA update from the start state (torch convention, unbiased variance), float64 reference
        x = seen["x"]
        n = x.numel() / x.shape[1]
        exp_mean = 0.9 * seen["mean"].double() + 0.1 * x.mean((0, 2, 3))
        exp_var = 0.9 * seen["var"].double() + 0.1 * x.var((0, 2, 3), unbiased=False) * n / (n - 1)
        assert torch.allclose(layer.running_mean.double(), exp_mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(layer.running_var.double(), exp_var, rtol=1e-5, atol=1e-6)
    # γ/β are network weights (trained in every row) and α̂, β̂ learn in every row, frozen statistics included
    assert not torch.equal(layer.weight.detach(), seen["weight"])
    assert float(layer.alpha_hat.detach()) != a0


def test_fresh_init_not_applied_when_resumed_or_without_grad(bn_checkpoint):
    path, bn_state = bn_checkpoint
    cfg = _cfg(STATS_INIT="fresh", AFFINE_INIT="fresh")
    # a no-grad training-mode forward (statistics tools) does not trigger the reset
    model = _build(cfg)
    DetectionCheckpointer(model).load(path)
    with torch.no_grad(), EventStorage(0):
        model(_batch(1))
    assert torch.equal(evalnorm_modules(model)[STEM].weight.detach(), bn_state[f"{STEM}.weight"])
    # a resumed run (storage iteration > 0) keeps the checkpoint's statistics and affine
    model = _build(cfg)
    DetectionCheckpointer(model).load(path)
    seen = _probe(evalnorm_modules(model)[STEM])
    _train(model, cfg, [_batch(5)], 1, start_iter=10)
    assert torch.equal(seen["mean"], bn_state[f"{STEM}.running_mean"])
    assert torch.equal(seen["weight"], bn_state[f"{STEM}.weight"])
    # explicit application
    model = _build(cfg)
    DetectionCheckpointer(model).load(path)
    counts = model.apply_evalnorm_init()
    assert counts["stats"] == counts["affine"] == len(ea.bn_statistics_layers(model))
    m = evalnorm_modules(model)[STEM]
    assert torch.equal(m.running_var, torch.ones_like(m.running_var)) and int(m.num_batches_tracked) == 0


def test_freeze_stats_applies_to_bn_ema_rows():
    """The EMA rows of Table 2 use the same keys with NORM "BN": FREEZE_STATS freezes BN's EMA too."""
    cfg = _cfg("BN", FREEZE_STATS=True)
    model = _build(cfg)
    assert not evalnorm_modules(model)
    before = {n: m.running_mean.clone() for n, m in ea.bn_statistics_layers(model)}
    with EventStorage(0):
        losses = model(_batch(1))
    assert ea.LOSS_KEY not in losses
    assert all(torch.equal(m.running_mean, before[n]) for n, m in ea.bn_statistics_layers(model))


# ---- configs -------------------------------------------------------------------------------------------------
def _load_cfg(path):
    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.merge_from_file(path)
    return cfg


def test_table2_configs_express_the_rows():
    everything = sorted(glob.glob(os.path.join(REPO, "configs", "evalnorm", "faster_rcnn_R50_C4_table2*_bs*.yaml")))
    files = [f for f in everything if not f.endswith("_ema.yaml")]
    assert len(files) == 12  # rows (a)-(d) x 8, 4, 2 images per GPU
    for f in everything:  # each EN row has its EMA entry: the same training with BN
        if f.endswith("_ema.yaml"):
            ema, en = _load_cfg(f), _load_cfg(f.replace("_ema.yaml", ".yaml"))
            assert ema.MODEL.RESNETS.NORM == "BN" and f.replace("_ema.yaml", ".yaml") in files
            assert ema.SOLVER.MAX_ITER == en.SOLVER.MAX_ITER and ema.SOLVER.IMS_PER_BATCH == en.SOLVER.IMS_PER_BATCH
    assert len(everything) == 24
    for f in files:
        stem = os.path.basename(f)[: -len(".yaml")]
        row, n = stem.split("table2")[1].split("_bs")
        cfg = _load_cfg(f)
        spec = ROWS[row]
        assert bool(cfg.MODEL.WEIGHTS) == spec["weights"], f
        for key in ("STATS_INIT", "AFFINE_INIT", "FREEZE_STATS"):
            assert cfg.D2NORM.EVALNORM_MODEL[key] == spec[key], (f, key)
        assert cfg.SOLVER.IMS_PER_BATCH == 8 * int(n)  # N images per GPU on 8 GPUs
        assert cfg.MODEL.META_ARCHITECTURE == "EvalNormGeneralizedRCNN" and cfg.MODEL.RESNETS.NORM == "EvalNorm"
        assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeads" and cfg.MODEL.BACKBONE.FREEZE_AT == 0
        assert cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 64
    cpu = _load_cfg(os.path.join(REPO, "configs", "cpu", "faster_rcnn_R18_C4_evalnorm_table2a.yaml"))
    assert cpu.DATASETS.TRAIN == ("d2norm_synthetic_train",) and cpu.MODEL.DEVICE == "cpu"
    assert cpu.D2NORM.EVALNORM_MODEL.STATS_INIT == "fresh" and not cpu.MODEL.WEIGHTS


def test_layers_without_a_bn_ema_are_named_for_the_table2_keys():
    from torch import nn

    from d2norm.layers import BatchGroupNorm, EvalNorm2d, GhostBatchNorm2d, MABN2d

    model = nn.Sequential(EvalNorm2d(8), MABN2d(8), GhostBatchNorm2d(8), BatchGroupNorm(8, num_groups=2), nn.ReLU())
    assert ea._other_stat_layers(model) == ["1", "3"]
    assert [n for n, _ in ea.bn_statistics_layers(model)] == ["0", "2"]
