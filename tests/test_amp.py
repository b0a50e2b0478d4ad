"""Every registered norm under autocast (fp16 and bf16, the routes CUDA AMP takes; here on CPU autocast): the
training forward + backward (EvalNorm's aux loss included) and the eval forward agree with the float32 run of
the same layer on the same input, everything finite, output in the input's dtype, statistics in float32.

Set-up: conv (float32 weights) → norm, so under autocast the norm receives the conv's half-precision output, as
in a detector. Tolerances, from the dtype: the half-precision conv output carries a relative rounding error of
u (fp16 2^-11, bf16 2^-8) and the norm's output is rounded once more; a normalized output of magnitude |y| is
then off by a few u·|y|. We allow 8·u·max|y| (+ 8·u for values near 0) for outputs, 16·u relative on the
input-gradient norm and on the affine gradients, 8·u relative on statistics buffers and the aux loss.
"""
import copy

import pytest
import torch
from torch import nn

import d2norm  # noqa: F401
from d2norm.layers import norm_layer
from d2norm.layers.evalnorm import evalnorm_aux_loss
from d2norm.layers.registry import NORM_REGISTRY

NAMES = sorted(k for k, _ in NORM_REGISTRY)
UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
C = 32


def _options(name):
    return {"DomainBN": {"num_domains": 1}, "GhostBN": {"ghost_size": 2}, "MABN": {"warmup_iters": 1}}.get(name, {})


class Net(nn.Module):
    def __init__(self, name):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(8, C, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(C, generator=g))
        self.norm = norm_layer(name, **_options(name))(C)

    def forward(self, x):
        return self.norm(self.conv(x))


def _step(net, x, dy, dtype):
    """One training forward + backward (autocast ``dtype`` or float32 when None); (y, aux, grads)."""
    net.train()
    net.zero_grad()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        y = net(x)
        aux = evalnorm_aux_loss(net)
    loss = (y.float() * dy).sum() + (aux if aux is not None else 0)
    loss.backward()
    # conv.bias is left out: for every mean-subtracting norm its exact gradient is 0 and both runs hold rounding
    # noise; the input gradient of the norm is checked through conv.weight's
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None and n != "conv.bias"}
    return y, (None if aux is None else float(aux)), grads


@pytest.fixture(params=["native", "torch"])
def route(request, monkeypatch):
    """"native": d2norm's CPU kernels where they apply; "torch": every native kernel off (D2NORM_NATIVE=0), the
    torch ops CUDA runs."""
    from d2norm.layers import native

    if request.param == "torch":
        monkeypatch.setattr(native, "_load", lambda: None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scale", [3.0, 10.0])
def test_layer_under_autocast_matches_float32(name, dtype, scale, route):
    u = UNIT[dtype]
    g = torch.Generator().manual_seed(7)
    # 4 x 32 x 48 x 48 = 295k values: sums over them leave fp16's range (max 65504) unless accumulated in float32
    x = torch.randn(4, 8, 48, 48, generator=g) * scale + 1
    dy = torch.randn(4, C, 48, 48, generator=g)
    ref, amp = Net(name), None
    amp = copy.deepcopy(ref)
    for _ in range(3):  # a few steps: EMAs / ring buffers / EvalNorm's recorded batch size move
        y32, aux32, g32 = _step(ref, x, dy, None)
        y16, aux16, g16 = _step(amp, x, dy, dtype)
    assert y16.dtype == dtype  # the conv's output dtype under autocast, kept by the norm
    assert torch.isfinite(y16.float()).all()
    ymax = float(y32.abs().max())
    torch.testing.assert_close(y16.float(), y32, rtol=0, atol=8 * u * ymax + 8 * u)
    if aux32 is not None:
        assert aux16 is not None and abs(aux16 - aux32) <= 8 * u * abs(aux32) + 1e-6, (aux16, aux32)
    assert g16.keys() == g32.keys()
    for k in g32:
        assert torch.isfinite(g16[k]).all(), k
        err = float((g16[k].float() - g32[k]).norm())
        assert err <= 16 * u * float(g32[k].norm()) + 1e-6, (k, err, float(g32[k].norm()))
    for (k, b16), b32 in zip(amp.norm.state_dict().items(), ref.norm.state_dict().values()):
        if b32.is_floating_point():
            assert b16.dtype == b32.dtype == torch.float32, k  # statistics stay in float32
            assert torch.isfinite(b16).all(), k
            torch.testing.assert_close(b16, b32, rtol=8 * u, atol=8 * u * float(b32.abs().max()) + 1e-6)
    # eval forward
    ref.eval(), amp.eval()
    with torch.no_grad():
        e32 = ref(x)
        with torch.autocast("cpu", dtype=dtype):
            e16 = amp(x)
    assert e16.dtype == dtype and torch.isfinite(e16.float()).all()
    torch.testing.assert_close(e16.float(), e32, rtol=0, atol=8 * u * float(e32.abs().max()) + 8 * u)


def _detector_cases():
    from helpers import tiny_r18_fpn_rcnn_cfg, tiny_retinanet_cfg

    cases = {}
    for name in NAMES:
        opts = ["MODEL.RESNETS.NORM", name, "MODEL.FPN.NORM", name, "D2NORM.DOMAIN_BN.NUM_DOMAINS", 1,
                "D2NORM.GHOST_BN.SIZE", 1, "D2NORM.MABN.WARMUP_ITERS", 0, "D2NORM.BGN.NUM_CHANNEL_GROUPS", 8]
        if name == "EvalNorm":
            opts += ["MODEL.META_ARCHITECTURE", "EvalNormGeneralizedRCNN"]
        cases[f"rcnn-{name}"] = lambda o=opts: tiny_r18_fpn_rcnn_cfg(opts=o)
    cases["rcnn-mabn-backbone"] = lambda: tiny_r18_fpn_rcnn_cfg(opts=[
        "MODEL.BACKBONE.NAME", "build_mabn_resnet_fpn_backbone", "MODEL.RESNETS.NORM", "MABN", "MODEL.FPN.NORM", "MABN"])
    cases["rcnn-xbn-backbone"] = lambda: tiny_r18_fpn_rcnn_cfg(opts=[
        "MODEL.BACKBONE.NAME", "build_xbn_resnet_fpn_backbone", "MODEL.RESNETS.NORM", "BN"])
    cases["retinanet-domainbn-head"] = lambda: tiny_retinanet_cfg("BN", [
        "MODEL.META_ARCHITECTURE", "DomainBNRetinaNet", "MODEL.RETINANET.NORM", ""])
    return cases


DETECTORS = _detector_cases()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", sorted(DETECTORS))
def test_detector_training_step_under_autocast(case, dtype):
    """One AMP training step of a tiny detector with each norm in backbone + FPN (and d2norm's backbones / head):
    finite losses (EvalNorm's aux loss among them) and finite gradients for every parameter that gets one."""
    from detectron2.utils.events import EventStorage

    from d2norm.layers import build_model
    from helpers import tiny_instance_batch

    cfg = DETECTORS[case]()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with EventStorage(0), torch.autocast("cpu", dtype=dtype):
        losses = model(tiny_instance_batch())
    assert all(torch.isfinite(v).all() for v in losses.values()), {k: float(v) for k, v in losses.items()}
    if "EvalNorm" in case:
        assert "loss_evalnorm" in losses
    sum(v.float() for v in losses.values()).backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, bad
    stats = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    assert all(b.dtype == torch.float32 and torch.isfinite(b).all() for _, b in stats)
