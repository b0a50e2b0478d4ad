"""norm_layer(name, **options): options that travel with a d2norm name (code, LazyConfig, save/load, pickle)."""
import logging
import pickle

import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling.roi_heads import FastRCNNConvFCHead

import d2norm
from d2norm.layers import GhostBatchNorm2d, MABN2d, NormLayer, get_norm, norm_layer, norm_options
from d2norm.layers import registry


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setitem(registry._state, "warned_default", set())


def _ghost_reference(x, size):
    """float64 GhostBN training output from four-things eq 4 (size divides N): per sub-batch mean / biased var."""
    x = x.double()
    out = []
    for chunk in x.split(size):
        mean = chunk.mean(dim=(0, 2, 3), keepdim=True)
        var = ((chunk - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        out.append((chunk - mean) / torch.sqrt(var + 1e-5))
    return torch.cat(out)


def test_explicit_options_build_that_layer_in_code(fresh_warnings, caplog):
    n = norm_layer("GhostBN", ghost_size=4)
    from detectron2.layers import batch_norm

    conv = Conv2d(3, 6, 3, padding=1, bias=False, norm=batch_norm.get_norm(n, 6))  # detectron2 calls a callable
    assert isinstance(conv.norm, GhostBatchNorm2d) and conv.norm.ghost_size == 4 and conv.norm.num_features == 6
    layer = get_norm(n, 5).double().train()
    x = torch.randn(8, 5, 3, 3, dtype=torch.float64) * 3 + 2
    torch.testing.assert_close(layer(x), _ghost_reference(x, 4))
    # Explicit options given: no "defaults used" warning.
    assert "no bound cfg" not in caplog.text


def test_unnamed_options_come_from_the_bound_cfg_named_ones_win(d2cfg):
    d2cfg.D2NORM.GHOST_BN.SIZE = 7
    d2cfg.D2NORM.BN.EPS = 1e-3
    with norm_options(d2cfg):
        layer = norm_layer("GhostBN", ghost_size=4)(8)
        plain = norm_layer("GhostBN")(8)
    assert (layer.ghost_size, layer.eps) == (4, 1e-3)
    assert (plain.ghost_size, plain.eps) == (7, 1e-3)


def test_defaults_without_cfg_or_options_are_said_once_per_layer_type(fresh_warnings, caplog):
    with caplog.at_level(logging.WARNING, logger="d2norm.layers.registry"):
        a = get_norm("GhostBN", 4)
        b = norm_layer("GhostBN")(6)
        c = get_norm("MABN", 4)
    msgs = [r.getMessage() for r in caplog.records if "no bound cfg" in r.getMessage()]
    assert len(msgs) == 2, msgs
    assert "GhostBN (GhostBatchNorm2d)" in msgs[0] and "ghost_size=16" in msgs[0] and "remainder='balanced'" in msgs[0]
    assert "MABN (MABN2d)" in msgs[1] and "buffer_size=16" in msgs[1] and "clip=5.0" in msgs[1]
    assert a.ghost_size == b.ghost_size == 16 and isinstance(c, MABN2d)


def test_printable_picklable_comparable():
    n = norm_layer("BGN", num_groups=4, alpha=0.5)
    assert repr(n) == "norm_layer('BGN', num_groups=4, alpha=0.5)"
    m = pickle.loads(pickle.dumps(n))
    assert isinstance(m, NormLayer) and m == n and hash(m) == hash(n)
    assert m != norm_layer("BGN", num_groups=8, alpha=0.5)
    built = m(16)
    assert built.num_groups == 4 and built.alpha == 0.5


def test_bad_name_and_bad_option_are_named():
    with pytest.raises(ValueError, match=r"'GhostBNN' is not a d2norm norm name; valid: AnySyncBN, BGN"):
        norm_layer("GhostBNN")
    with pytest.raises(ValueError, match=r"detectron2's own names take no options: write norm='GN'"):
        norm_layer("GN", num_groups=4)
    with pytest.raises(ValueError, match=r"unknown option\(s\) ghost; GhostBatchNorm2d accepts .*ghost_size"):
        norm_layer("GhostBN", ghost=4)
    # A bad value is reported by the layer when it is built, naming the value.
    with pytest.raises(ValueError, match=r"ghost_size \(D2NORM.GHOST_BN.SIZE\) must be an integer >= 1, got 0"):
        norm_layer("GhostBN", ghost_size=0)(8)


_LAZY = '''
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import FastRCNNConvFCHead
from d2norm.layers import norm_layer

model = L(FastRCNNConvFCHead)(
    input_shape=ShapeSpec(channels=8, height=6, width=6),
    conv_dims=[8, 8],
    fc_dims=[16],
    conv_norm=norm_layer("GhostBN", ghost_size=4, eps=1e-3),
)
'''


def _ghost_layers(model):
    return [m for m in model.modules() if isinstance(m, GhostBatchNorm2d)]


def test_lazyconfig_load_instantiate_save_load_round_trip(tmp_path, fresh_warnings, caplog):
    path = tmp_path / "head.py"
    path.write_text(_LAZY)
    cfg = LazyConfig.load(str(path))
    model = instantiate(cfg.model)
    assert isinstance(model, FastRCNNConvFCHead)
    assert [(m.ghost_size, m.eps) for m in _ghost_layers(model)] == [(4, 1e-3), (4, 1e-3)]

    saved = tmp_path / "head.yaml"
    LazyConfig.save(cfg, str(saved))
    text = saved.read_text()
    assert "_target_: d2norm.layers.norm_layer" in text and "ghost_size: 4" in text
    assert not (tmp_path / "head.yaml.pkl").exists()  # a real yaml, not detectron2's pickle fallback
    again = LazyConfig.load(str(saved))
    model2 = instantiate(again.model)
    assert [(m.ghost_size, m.eps) for m in _ghost_layers(model2)] == [(4, 1e-3), (4, 1e-3)]
    assert instantiate(again.model.conv_norm) == norm_layer("GhostBN", ghost_size=4, eps=1e-3)
    # Same state-dict layout either way.
    assert model.state_dict().keys() == model2.state_dict().keys()
    assert "no bound cfg" not in caplog.text


def test_lazy_call_in_code_and_yacs_name_unchanged(d2cfg):
    head = instantiate(
        L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=4, height=5, width=5), conv_dims=[4], fc_dims=[],
            conv_norm=norm_layer("ExampleWeightedBN", alpha=0.3),
        )
    )
    assert [m.alpha for m in head.modules() if type(m).__name__ == "ExampleWeightedBatchNorm2d"] == [0.3]
    # yacs: the name and cfg.D2NORM keys, exactly as before.
    d2cfg.MODEL.ROI_BOX_HEAD.NORM = "ExampleWeightedBN"
    d2cfg.D2NORM.EXAMPLE_WEIGHING.ALPHA = 0.7
    with norm_options(d2cfg):
        assert get_norm(d2cfg.MODEL.ROI_BOX_HEAD.NORM, 4).alpha == 0.7


def test_install_is_idempotent():
    import detectron2.modeling.backbone.fpn as fpn

    before = fpn.get_norm
    d2norm.layers.install()
    d2norm.layers.install()
    assert fpn.get_norm is before is d2norm.layers.get_norm


def test_empty_training_batch_is_not_counted_by_any_layer():
    """With momentum=None (cumulative average) an empty training batch must not count: torch's BatchNorm2d
    counts it in num_batches_tracked (then the next batch gets the factor 1/3 instead of 1/2); every d2norm layer
    with that counter leaves it out (EvalNorm, BatchStatsBN, ExampleWeightedBN, AnySyncBN counted it, GhostBN,
    DomainBN and BGN did not)."""
    import torch
    from torch import nn

    from d2norm.layers import norm_layer
    from d2norm.layers.registry import NORM_REGISTRY

    def steps(m):
        m.train()
        g = torch.Generator().manual_seed(0)
        m(torch.randn(4, 32, 4, 4, generator=g) + 5)
        before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("running_")}
        m(torch.randn(0, 32, 4, 4))
        for k, v in before.items():
            assert torch.equal(m.state_dict()[k], v), k  # nothing learned from no data
        m(torch.randn(4, 32, 4, 4, generator=g) - 5)
        return int(m.num_batches_tracked.reshape(-1)[0]), float(m.running_mean.reshape(-1).mean())

    torch_count, _ = steps(nn.BatchNorm2d(32, momentum=None))
    assert torch_count == 3  # torch counts the empty batch
    covered = []
    for name, _ in NORM_REGISTRY:
        opts = {"momentum": None}
        if name == "DomainBN":
            opts["num_domains"] = 1
        try:
            layer = norm_layer(name, **opts)(32)
        except (TypeError, ValueError):
            continue  # no cumulative-average option (MABN's momentum is its own EMA's)
        if getattr(layer, "num_batches_tracked", None) is None:
            continue
        count, mean = steps(layer)
        assert count == 2, name
        if name not in ("BGN",):  # BGN's statistics are per channel group; the others' per channel
            assert abs(mean) < 0.2, (name, mean)  # (+5 and -5 averaged with equal weights)
        covered.append(name)
    assert {"GhostBN", "DomainBN", "BGN", "EvalNorm", "BatchStatsBN", "ExampleWeightedBN", "AnySyncBN"} <= set(covered)


def test_ghost_batch_of_one_1x1_example_raises_like_torch():
    import pytest
    import torch

    from d2norm.layers import norm_layer

    layer = norm_layer("GhostBN", ghost_size=1)(4).train()
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel.*ghost batch of one 1x1 example"):
        layer(torch.randn(3, 4, 1, 1))
    layer(torch.randn(3, 4, 2, 1))  # two values per channel: fine
