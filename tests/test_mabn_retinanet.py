"""MABNRetinaNet (mabn Appendix B.3, Table 7): every MABN layer follows a weight-centralized conv, also in the
RetinaNet head that v0.6 builds from plain nn.Conv2d; head warm-up from cfg; trains without NaN."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import d2norm
import d2norm.solver
from d2norm.layers import build_model
from d2norm.layers.mabn import CenteredConv2d, CenteredPlainConv2d, MABN2d
from d2norm.modeling.meta_arch.mabn_retinanet import MABNRetinaNet


def _cfg():
    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.META_ARCHITECTURE", "MABNRetinaNet",
        "MODEL.BACKBONE.NAME", "build_mabn_retinanet_resnet_fpn_backbone", "MODEL.BACKBONE.FREEZE_AT", 0,
        "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.RESNETS.NORM", "MABN",
        "MODEL.RESNETS.OUT_FEATURES", ["res3", "res4", "res5"], "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"],
        "MODEL.FPN.OUT_CHANNELS", 16, "MODEL.FPN.NORM", "MABN",
        "MODEL.RETINANET.NORM", "MABN", "MODEL.RETINANET.NUM_CONVS", 2, "MODEL.RETINANET.NUM_CLASSES", 3,
        "MODEL.ANCHOR_GENERATOR.SIZES", [[8], [16], [32], [64], [128]],
        "D2NORM.MABN_MODEL.HEAD_WARMUP_ITERS", 7, "D2NORM.MABN_MODEL.BACKBONE_WARMUP_ITERS", 3,
    ])
    return cfg


def test_every_mabn_is_fed_by_a_centered_conv_and_warmups():
    model = build_model(_cfg())
    assert isinstance(model, MABNRetinaNet)
    head_convs = [m for m in model.head.modules() if isinstance(m, CenteredPlainConv2d)]
    assert len(head_convs) == 4  # 2 convs x (cls, bbox) subnets; the output convs have no norm
    assert type(model.head.cls_score) is torch.nn.Conv2d and type(model.head.bbox_pred) is torch.nn.Conv2d
    for seq in (model.head.cls_subnet, model.head.bbox_subnet):
        kids = list(seq.children())
        for i, k in enumerate(kids):
            if isinstance(k, MABN2d):
                assert isinstance(kids[i - 1], CenteredPlainConv2d)
                assert k.warmup_iters == 7 * 5  # HEAD_WARMUP_ITERS in iterations; the layer counts its 5 level calls
    backbone_mabn = [m for m in model.backbone.modules() if isinstance(m, MABN2d)]
    assert backbone_mabn and all(m.warmup_iters == 3 for m in backbone_mabn)
    assert sum(isinstance(m, CenteredConv2d) for m in model.backbone.modules()) == len(backbone_mabn)
    # parameter names are the stock RetinaNet head's
    assert "head.cls_subnet.0.weight" in model.state_dict() and "head.cls_subnet.1.running_chi" in model.state_dict()


def test_head_conv_is_centered_in_forward():
    torch.manual_seed(0)
    conv = build_model(_cfg()).head.cls_subnet[0]
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64) * 2 + 1
    conv = conv.double()
    w = conv.weight.detach()
    ref = F.conv2d(x, w - w.mean(dim=(1, 2, 3), keepdim=True), conv.bias.detach(), padding=1)
    torch.testing.assert_close(conv(x), ref)
    assert not torch.allclose(conv(x), F.conv2d(x, w, conv.bias.detach(), padding=1))
    conv(x).sum().backward()
    torch.testing.assert_close(conv.weight.grad.mean(dim=(1, 2, 3)), torch.zeros(w.shape[0], dtype=torch.float64))


def test_trains_and_requires_mabn_everywhere():
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg)
    model.train()
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 30.0, 40.0]]))
    inst.gt_classes = torch.tensor([1])
    batch = [{"image": torch.rand(3, 64, 64) * 255, "instances": inst} for _ in range(2)]
    opt = d2norm.solver.build_optimizer(cfg, model)
    for _ in range(3):
        with EventStorage():
            loss = sum(model(batch).values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cfg.MODEL.RETINANET.NORM = "BN"
    with pytest.raises(ValueError, match="MODEL.RETINANET.NORM must be 'MABN'"):
        build_model(cfg)
    cfg = _cfg()
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    with pytest.raises(ValueError, match="not preceded by a weight-centralized conv"):
        build_model(cfg)


def test_effective_conv_weight_is_what_each_conv_convolves_with():
    from torch import nn

    from d2norm.layers.mabn import effective_conv_weight

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for conv in (CenteredPlainConv2d(3, 4, 3, padding=1), CenteredConv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)):
        conv = conv.double()
        w = effective_conv_weight(conv)
        torch.testing.assert_close(conv(x), F.conv2d(x, w, conv.bias, padding=1))
        if type(conv) is nn.Conv2d:
            assert w is conv.weight
        else:  # mabn eq 18: zero mean over (in, kh, kw) per output channel
            torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(4, dtype=torch.float64))


def test_shared_head_warmup_window_and_momentum_are_in_iterations():
    """One head MABN serves the 5 FPN levels: 5 calls per iteration. HEAD_WARMUP_ITERS 7 ends after 7
    iterations (was: after 7 calls, i.e. during iteration 2); the SMA buffer holds m iterations of every level;
    the EMA decays by the paper's 0.98 per iteration (mabn §4.1, B.3)."""
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg).train()
    layer = model.head.cls_subnet[1]
    assert isinstance(layer, MABN2d)
    assert layer.buffer_size == 16 * 5 and tuple(layer.chi_sq_buffer.shape) == (80, 16)
    assert layer.momentum ** 5 == pytest.approx(0.98, rel=1e-12)
    backbone = next(m for m in model.backbone.modules() if isinstance(m, MABN2d))
    assert backbone.buffer_size == 16 and backbone.momentum == 0.98  # called once per iteration: unchanged
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 30.0, 40.0]]))
    inst.gt_classes = torch.tensor([1])
    batch = [{"image": torch.rand(3, 64, 64) * 255, "instances": inst} for _ in range(2)]
    in_warmup = []
    for it in range(8):
        in_warmup.append(int(layer.num_batches_tracked) < layer.warmup_iters)  # before iteration `it`'s forward
        with EventStorage(it):
            model(batch)
        assert int(layer.num_batches_tracked) == 5 * (it + 1)
    assert in_warmup == [True] * 7 + [False]
