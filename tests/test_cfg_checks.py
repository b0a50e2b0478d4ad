"""Setup-time checks of a cfg's norm choices (d2norm/layers/cfg_checks.py), through the paths a user takes:
``tools/train_net.py``'s ``setup_cfg``, a tool's cfg loading, ``build_model``. Each bad choice fails (or warns)
before any data is generated or any model is trained, naming the cfg key and what to do."""
import logging
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "cpu", "faster_rcnn_R18_FPN_ghostbn.yaml")
RETINA = os.path.join(ROOT, "configs", "cpu", "retinanet_R18_ghostbn.yaml")


def _setup(tmp_path, config, *opts):
    """``tools/train_net.py --config-file config opts`` up to the end of its setup (d2norm.engine.setup_cfg)."""
    from detectron2.engine import default_argument_parser

    from d2norm.engine import setup_cfg

    data = tmp_path / "data"
    args = default_argument_parser().parse_args(
        ["--config-file", config, "OUTPUT_DIR", str(tmp_path / "out"), "D2NORM.DATA.SYNTHETIC_ROOT", str(data),
         "D2NORM.DATA.SYNTHETIC_NUM_TRAIN", "4", "D2NORM.DATA.SYNTHETIC_NUM_VAL", "2", *map(str, opts)])
    return setup_cfg(args), data


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_of_checks():
    from d2norm.layers import cfg_checks

    h = _Records()
    lg = logging.getLogger("d2norm.layers.cfg_checks")
    lg.addHandler(h)
    cfg_checks._warned.clear()
    yield h.messages
    lg.removeHandler(h)


# ---- unknown NORM names in keys the model does not use ---------------------------------------------------
@pytest.mark.parametrize("opts,key", [
    (("MODEL.ROI_BOX_HEAD.NORM", "Foo"), "MODEL.ROI_BOX_HEAD.NORM"),  # the demo's 2fc box head has no norm
    (("MODEL.ROI_MASK_HEAD.NORM", "Foo", "MODEL.MASK_ON", "False"), "MODEL.ROI_MASK_HEAD.NORM"),
    (("MODEL.SEM_SEG_HEAD.NORM", "GhostBNN"), "MODEL.SEM_SEG_HEAD.NORM"),
])
def test_unknown_norm_in_unused_key_fails_at_setup(tmp_path, opts, key):
    with pytest.raises(ValueError) as e:
        _setup(tmp_path, DEMO, *opts)
    msg = str(e.value)
    assert msg.startswith(f"{key}: Unknown norm {opts[1]!r}") and "GhostBN" in msg and "EvalNorm" in msg, msg
    assert not (tmp_path / "data").exists()  # failed before generating any data


def test_unknown_norm_in_unused_key_fails_in_tools_and_build_model(tmp_path, capsys):
    from d2norm.engine import cli
    from d2norm.layers import build_model

    with pytest.raises(ValueError, match="MODEL.ROI_BOX_HEAD.NORM: Unknown norm 'Foo'"):
        cli.load_cfg(DEMO, ["MODEL.ROI_BOX_HEAD.NORM", "Foo"])
    cfg = cli.load_cfg(DEMO, [])
    cfg.MODEL.ROI_BOX_HEAD.NORM = "Foo"
    with pytest.raises(ValueError, match="MODEL.ROI_BOX_HEAD.NORM: Unknown norm 'Foo'"):
        build_model(cfg)


# ---- GhostBN that is plain BN -----------------------------------------------------------------------------
def test_ghost_bn_size_at_least_batch_warns(tmp_path, warnings_of_checks):
    _setup(tmp_path, DEMO)  # the demo: SIZE 2, 4 images -> two ghost batches, no warning
    assert not [m for m in warnings_of_checks if "GhostBN" in m], warnings_of_checks
    _setup(tmp_path, DEMO, "D2NORM.GHOST_BN.SIZE", 4)
    msgs = [m for m in warnings_of_checks if "GhostBN" in m]
    assert len(msgs) == 1, warnings_of_checks
    m = msgs[0]
    assert m.startswith("MODEL.RESNETS.NORM 'GhostBN' with D2NORM.GHOST_BN.SIZE 4") and "4 images per process" in m
    assert "plain BN" in m and "below 4" in m, m


def test_ghost_bn_in_box_head_counts_rois(tmp_path, warnings_of_checks):
    from d2norm.layers.cfg_checks import check_norm_cfg
    from d2norm.engine import cli

    cfg = cli.load_cfg(DEMO, ["MODEL.ROI_BOX_HEAD.NUM_CONV", 1, "MODEL.ROI_BOX_HEAD.NORM", "GhostBN",
                              "D2NORM.GHOST_BN.SIZE", 256, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64])
    check_norm_cfg(cfg)
    msgs = [m for m in warnings_of_checks if m.startswith("MODEL.ROI_BOX_HEAD.NORM 'GhostBN'")]
    assert len(msgs) == 1 and "at most 256 RoIs per process" in msgs[0], warnings_of_checks
    warnings_of_checks.clear()
    cfg.D2NORM.GHOST_BN.SIZE = 64
    check_norm_cfg(cfg)
    assert not [m for m in warnings_of_checks if m.startswith("MODEL.ROI_BOX_HEAD.NORM")], warnings_of_checks


# ---- MABN without weight centralization -------------------------------------------------------------------
def test_mabn_in_stock_backbone_warns_with_the_mabn_builder(tmp_path, warnings_of_checks):
    _setup(tmp_path, DEMO, "MODEL.RESNETS.NORM", "MABN")
    msgs = [m for m in warnings_of_checks if "MABN" in m]
    assert len(msgs) == 1, warnings_of_checks
    assert msgs[0].startswith("MODEL.RESNETS.NORM 'MABN' with the stock backbone MODEL.BACKBONE.NAME "
                              "'build_resnet_fpn_backbone'") and "eq 18" in msgs[0]
    assert "'build_mabn_resnet_fpn_backbone'" in msgs[0]
    warnings_of_checks.clear()
    _setup(tmp_path, DEMO, "MODEL.RESNETS.NORM", "MABN", "MODEL.BACKBONE.NAME", "build_mabn_resnet_fpn_backbone")
    assert not [m for m in warnings_of_checks if "MABN" in m], warnings_of_checks


def test_mabn_retinanet_head_warns_in_stock_retinanet(tmp_path, warnings_of_checks):
    _setup(tmp_path, RETINA, "MODEL.RETINANET.NORM", "MABN")
    msgs = [m for m in warnings_of_checks if m.startswith("MODEL.RETINANET.NORM 'MABN'")]
    assert len(msgs) == 1 and "'MABNRetinaNet'" in msgs[0], warnings_of_checks


# ---- DomainBN in a stock model ----------------------------------------------------------------------------
def test_domain_bn_in_stock_model_fails_at_setup(tmp_path):
    with pytest.raises(ValueError) as e:
        _setup(tmp_path, DEMO, "MODEL.RESNETS.NORM", "DomainBN")
    msg = str(e.value)
    assert msg.startswith("MODEL.RESNETS.NORM 'DomainBN' with D2NORM.DOMAIN_BN.NUM_DOMAINS 5"), msg
    assert "'DomainBNRetinaNet'" in msg and "first forward would fail" in msg, msg
    assert not (tmp_path / "data").exists()
    # one domain (or a layout with nothing domain-specific) is plain BN in a stock model: accepted
    _setup(tmp_path, DEMO, "MODEL.RESNETS.NORM", "DomainBN", "D2NORM.DOMAIN_BN.NUM_DOMAINS", 1)
    _setup(tmp_path, DEMO, "MODEL.RESNETS.NORM", "DomainBN", "D2NORM.DOMAIN_BN.POP_STATS", "shared")


def test_domain_bn_rule_is_the_layers_own():
    """The setup check asks the layer (needs_domain) and agrees with what its forward does."""
    import torch

    from d2norm.layers.domain_bn import DomainBatchNorm2d

    x = torch.randn(2, 8, 3, 3)
    for k in (1, 3):
        for train in ("per_domain", "shared"):
            for pop in ("per_domain", "shared"):
                for aff in (False, True):
                    m = DomainBatchNorm2d(8, num_domains=k, train_stats=train, pop_stats=pop, affine_per_domain=aff)
                    try:
                        m.train()(x)
                        m.eval()(x)
                        ok = True
                    except ValueError:
                        ok = False
                    assert ok == (not m.needs_domain), (k, train, pop, aff)


# ---- sync group sizes ---------------------------------------------------------------------------------------
def test_sync_group_size_must_divide_world(tmp_path):
    cfg_opts = ("MODEL.RESNETS.NORM", "AnySyncBN", "D2NORM.SYNC_BN.GROUP_SIZE", 3)
    with pytest.raises(ValueError) as e:
        _setup(tmp_path, DEMO, *cfg_opts)
    assert str(e.value).startswith("D2NORM.SYNC_BN.GROUP_SIZE 3 does not divide the number of processes (1")
    assert "use 0 (all processes)" in str(e.value)
    from detectron2.config import get_cfg

    from d2norm import add_d2norm_config
    from d2norm.layers.cfg_checks import check_norm_cfg

    cfg = add_d2norm_config(get_cfg())
    cfg.merge_from_file(DEMO)
    cfg.merge_from_list(["MODEL.RESNETS.NORM", "AnySyncBN", "D2NORM.SYNC_BN.GROUP_SIZE", 2])
    check_norm_cfg(cfg, world_size=4)
    with pytest.raises(ValueError, match="GROUP_SIZE 2 does not divide the number of processes \\(3"):
        check_norm_cfg(cfg, world_size=3)
    cfg.MODEL.RESNETS.NORM = "BN"  # the key is irrelevant without AnySyncBN
    check_norm_cfg(cfg, world_size=3)


# ---- BN monitor patterns ----------------------------------------------------------------------------------
def test_bn_monitor_pattern_matching_nothing_fails_when_the_trainer_is_built(tmp_path):
    from d2norm.engine import Trainer

    cfg, _ = _setup(tmp_path, DEMO, "D2NORM.BN_MONITOR.ENABLED", True,
                    "D2NORM.BN_MONITOR.LAYERS", "['stem', 'backbone.bottom_up.res9']", "SOLVER.IMS_PER_BATCH", 2,
                    "D2NORM.DATA.SYNTHETIC_IMAGE_SIZE", 64)
    with pytest.raises(ValueError) as e:
        Trainer(cfg)
    msg = str(e.value)
    assert msg.startswith("D2NORM.BN_MONITOR.LAYERS: ['backbone.bottom_up.res9'] match(es) none"), msg
    assert "backbone.bottom_up.stem.conv1.norm" in msg  # lists what exists
    cfg.defrost()
    cfg.D2NORM.BN_MONITOR.LAYERS = ["stem", "res5"]
    trainer = Trainer(cfg)  # every pattern matches: accepted
    assert any(type(h).__name__ == "BNMonitorHook" for h in trainer._hooks)


# ---- layer option errors name the cfg key -----------------------------------------------------------------
@pytest.mark.parametrize("norm,key,value", [
    ("GhostBN", "D2NORM.GHOST_BN.SIZE", 0), ("GhostBN", "D2NORM.GHOST_BN.REMAINDER", "x"),
    ("GhostBN", "D2NORM.BN.EPS", -1.0), ("GhostBN", "D2NORM.BN.MOMENTUM", 2.0),
    ("MABN", "D2NORM.MABN.BUFFER_SIZE", 0), ("MABN", "D2NORM.MABN.CLIP", 0.5),
    ("BGN", "D2NORM.BGN.NUM_CHANNEL_GROUPS", 0), ("BGN", "D2NORM.BGN.ALPHA", 2.0),
    ("EvalNorm", "D2NORM.EVALNORM.MODE", "x"), ("EvalNorm", "D2NORM.EVALNORM.RULE_BATCH_SIZE", -1),
    ("EvalNorm", "D2NORM.EVALNORM.INIT_ALPHA", 0.0), ("EvalNorm", "D2NORM.EVALNORM.INIT_BETA", 1.0),
    ("ExampleWeightedBN", "D2NORM.EXAMPLE_WEIGHING.ALPHA", 2.0),
    ("DomainBN", "D2NORM.DOMAIN_BN.NUM_DOMAINS", 0), ("DomainBN", "D2NORM.DOMAIN_BN.TRAIN_STATS", "x"),
    ("DomainBN", "D2NORM.DOMAIN_BN.POP_STATS", "x"), ("AnySyncBN", "D2NORM.SYNC_BN.GROUP_SIZE", -1),
])
def test_bad_layer_option_names_its_cfg_key(tmp_path, norm, key, value):
    """``train_net.py ... MODEL.RESNETS.NORM <norm> <key> <bad value>``: the error names the cfg key."""
    from d2norm.engine import Trainer

    extra = ["MODEL.BACKBONE.NAME", "build_mabn_resnet_fpn_backbone"] if norm == "MABN" else []
    with pytest.raises(ValueError) as e:
        cfg, _ = _setup(tmp_path, DEMO, "MODEL.RESNETS.NORM", norm, key, value, *extra)
        Trainer(cfg)
    assert key in str(e.value) and repr(value) in str(e.value), str(e.value)


@pytest.mark.parametrize("config,extra", [
    ("retinanet_R18_table5_cpu.yaml", []),  # DomainBNRetinaNet, per-level training statistics
    ("retinanet_R18_ghostbn.yaml", ["MODEL.RETINANET.NORM", "BN"]),  # detectron2's per-level head BN
])
def test_retinanet_head_with_one_value_at_p7_fails_at_setup(tmp_path, config, extra):
    """One 128 px image per process: P7 is 1x1, one value per channel for a per-level batch variance (the
    first iteration would fail deep in the head)."""
    from d2norm.layers.cfg_checks import check_norm_cfg
    from d2norm.engine.cli import read_cfg

    cfg = read_cfg(os.path.join(ROOT, "configs", "cpu", config), [*extra, "SOLVER.IMS_PER_BATCH", 1])
    with pytest.raises(ValueError, match=r"level 'p7' \(stride 128\).*SOLVER\.IMS_PER_BATCH 1 over 1 process"):
        check_norm_cfg(cfg, world_size=1)
    cfg.SOLVER.IMS_PER_BATCH = 2
    check_norm_cfg(cfg, world_size=1)  # two images: two values, accepted
    cfg.SOLVER.IMS_PER_BATCH = 1
    cfg.INPUT.MAX_SIZE_TRAIN = 200  # 2x2 at P7
    check_norm_cfg(cfg, world_size=1)


def test_online_evalnorm_in_a_stock_meta_architecture_fails_at_setup(tmp_path):
    """`MODEL.RESNETS.NORM EvalNorm` (MODE online) in GeneralizedRCNN: nobody adds the eq-9 aux loss, so α̂, β̂
    would never train; refused at setup with the fixes, before anything is written."""
    from d2norm.engine.cli import read_cfg
    from d2norm.layers import build_model
    from d2norm.modeling.meta_arch.evalnorm_arch import check_aux_loss_collected

    with pytest.raises(ValueError, match=r"MODEL.RESNETS.NORM 'EvalNorm' with D2NORM.EVALNORM.MODE 'online' in "
                                         r"MODEL.META_ARCHITECTURE 'GeneralizedRCNN'.*EvalNormGeneralizedRCNN"):
        _setup(tmp_path, DEMO, "MODEL.RESNETS.NORM", "EvalNorm")
    assert not (tmp_path / "out").exists()  # nothing written
    _setup(tmp_path, DEMO, "MODEL.RESNETS.NORM", "EvalNorm", "MODEL.META_ARCHITECTURE", "EvalNormGeneralizedRCNN")
    _setup(tmp_path, DEMO, "MODEL.RESNETS.NORM", "EvalNorm", "D2NORM.EVALNORM.MODE", "rule", "OUTPUT_DIR",
           str(tmp_path / "rule"))
    # the built model (also where a custom head or a LazyConfig placed the layer): the Trainer's check
    model = build_model(read_cfg(DEMO, ["MODEL.RESNETS.NORM", "EvalNorm"]))
    with pytest.raises(ValueError, match=r"EvalNorm layer\(s\) in mode 'online'.*'GeneralizedRCNN'"):
        check_aux_loss_collected(model)
    check_aux_loss_collected(build_model(read_cfg(DEMO, ["MODEL.RESNETS.NORM", "EvalNorm",
                                                          "MODEL.META_ARCHITECTURE", "EvalNormGeneralizedRCNN"])))
