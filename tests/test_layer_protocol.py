"""What every d2norm layer shares: construction options, checkpoints, and the protocol other modules use."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

import d2norm
from d2norm.layers import NORM_REGISTRY
from d2norm.layers.base import D2NormBatchNorm2d
from d2norm.layers.frozen import FrozenBatchNorm

C = 8


def _cfg():
    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.D2NORM.BGN.NUM_CHANNEL_GROUPS = 4
    cfg.D2NORM.DOMAIN_BN.NUM_DOMAINS = 3
    return cfg


def _layers(**extra):
    cfg = _cfg()
    out = {}
    for name, cls in NORM_REGISTRY:
        kwargs = cls.from_config(cfg, C)
        kwargs.update(extra)
        out[name] = cls(**kwargs)
    out["FrozenBatchNorm"] = FrozenBatchNorm(C, **extra)
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_every_layer_accepts_device_and_dtype_like_torch_norms(dtype):
    ref = nn.BatchNorm2d(C, device="meta", dtype=dtype)
    for name, layer in _layers(device="meta", dtype=dtype).items():
        floats = [t for t in list(layer.parameters()) + list(layer.buffers()) if t.is_floating_point()]
        assert floats, name
        for t in list(layer.parameters()) + list(layer.buffers()):
            assert t.device.type == "meta", name
        if name != "EvalNorm":  # EvalNorm keeps its α̂/β̂ logits and B in float32 (like its statistics math)
            assert all(t.dtype == dtype for t in floats), name
        else:
            assert layer.running_mean.dtype == layer.weight.dtype == dtype
    assert ref.weight.dtype == dtype


def test_bn_derived_layers_load_frozen_bn_state_strictly():
    frozen = FrozenBatchNorm2d(C)
    with torch.no_grad():
        frozen.weight.uniform_(0.5, 2)
        frozen.bias.uniform_(-1, 1)
        frozen.running_mean.uniform_(-1, 1)
        frozen.running_var.uniform_(0.5, 2)
    for name, layer in _layers().items():
        if not isinstance(layer, D2NormBatchNorm2d):
            continue
        before = layer.num_batches_tracked.clone()
        extra = {k: v for k, v in layer.state_dict().items() if k not in frozen.state_dict()}
        res = layer.load_state_dict({**frozen.state_dict(), **extra}, strict=True)
        assert res.missing_keys == [] and res.unexpected_keys == [], name
        assert torch.equal(layer.num_batches_tracked, before), name
        rm = layer.running_mean if layer.running_mean.dim() == 1 else layer.running_mean[1]
        assert torch.equal(rm, frozen.running_mean), name


@pytest.mark.parametrize("bad", [dict(eps=-1.0), dict(eps=0), dict(momentum=2.0), dict(momentum="0.1")])
def test_bn_derived_layers_share_the_bn_option_checks(bad):
    cfg = _cfg()
    for name, cls in NORM_REGISTRY:
        if not issubclass(cls, D2NormBatchNorm2d):
            continue
        kwargs = {**cls.from_config(cfg, C), **bad}
        with pytest.raises(ValueError, match="eps|momentum"):
            cls(**kwargs)


def _call(layer, x):
    return layer(x, domain=1) if hasattr(layer, "forward_domains") else layer(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_zero_size_input_passes_through_every_layer(dtype, training):
    for name, layer in _layers().items():
        layer.train(training)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        x = torch.randn(0, C, 4, 4, dtype=dtype, requires_grad=True)
        y = _call(layer, x)
        assert y.shape == x.shape and y.dtype == dtype, name
        state = layer.state_dict()
        changed = [k for k, v in before.items() if not torch.equal(state[k], v)]
        # layers that train through torch's BN count an empty training batch as torch does (AnySyncBN needs it:
        # every rank of a sync group must count the same forwards); no statistic is ever touched
        counts_like_torch = ("AnySyncBN", "ExampleWeightedBN", "BatchStatsBN", "EvalNorm")
        assert changed == [] or (training and name in counts_like_torch and changed == ["num_batches_tracked"]), (
            name, changed)
        if layer.weight is not None and layer.weight.requires_grad:
            y.sum().backward()
            assert layer.weight.grad is not None and torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
            layer.weight.grad = None


def test_probes_read_any_bn_derived_layer_through_the_protocol():
    """A layer no d2norm module knows (the registry, convert_norm, PreciseBN, FrozenBN and folding are checked in
    test_add_a_norm.py): the statistics probes find it and read its estimates through estimated_stats()."""
    from d2norm.stats.probe import estimated_stats, num_slots, probed_layers

    class UnknownBN(D2NormBatchNorm2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, C, 1), UnknownBN(C), nn.GroupNorm(2, C), FrozenBatchNorm2d(C))
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
    assert list(probed_layers(model)) == ["1", "3"] and num_slots(model[1]) == 1
    torch.testing.assert_close(estimated_stats(model[1])[0][1], model[1].running_var.double())


# Images per training normalization group (rethinking §4's "normalization batch size") at 8 images over 2
# processes, ghost size 2, one sync group: written here from each layer's definition, one row per NORM name, so a
# newly registered layer fails until it says how it groups its batch statistics.
NORMALIZATION_IMAGES = {
    "BN": 4, "SyncBN": 8, "naiveSyncBN": 8, "naiveSyncBN_N": 8, "nnSyncBN": 8, "FrozenBN": None, "GN": None,
    "LN": None, "GhostBN": 2, "EvalNorm": 4, "ExampleWeightedBN": 4, "BatchStatsBN": 4, "DomainBN": 4,
    "AnySyncBN": 8, "BGN": None, "MABN": None, "BRN": None,
}


def test_normalization_images_of_every_norm_name():
    from d2norm.config import add_d2norm_config
    from d2norm.layers.protocol import batch_statistics_of, cfg_normalization_images

    assert {n for n, _ in NORM_REGISTRY} <= set(NORMALIZATION_IMAGES)
    cfg = add_d2norm_config(get_cfg())
    cfg.SOLVER.IMS_PER_BATCH, cfg.D2NORM.GHOST_BN.SIZE = 8, 2
    got = {n: cfg_normalization_images(n, cfg, 2) for n in NORMALIZATION_IMAGES}
    assert got == NORMALIZATION_IMAGES
    cfg.D2NORM.SYNC_BN.GROUP_SIZE = 1  # sync groups of one process: per-process statistics
    assert cfg_normalization_images("AnySyncBN", cfg, 2) == 4 and batch_statistics_of("AnySyncBN") == "synced"
    cfg.D2NORM.GHOST_BN.SIZE = 16  # a ghost size above the process's images: the process's images
    assert cfg_normalization_images("GhostBN", cfg, 2) == 4
    with pytest.raises(ValueError, match="'per_gpu'"):
        from d2norm.layers.base import normalization_images

        normalization_images("per_gpu", 4, 2)
