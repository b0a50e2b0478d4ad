"""SOLVER.WEIGHT_DECAY_NORM reaches every d2norm layer's affine; no-decay parameters get none (four-things §3.3)."""
import torch
from detectron2.config import get_cfg
from torch import nn

import d2norm
from d2norm.layers import D2NormModule, GhostBatchNorm2d
from d2norm.solver import build_optimizer


class _NotTorchNorm(nn.Module, D2NormModule):
    """A d2norm-style norm that is not a torch norm subclass, with one no-decay parameter."""

    no_weight_decay = ("alpha",)

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.alpha = nn.Parameter(torch.zeros(1))


def test_param_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), GhostBatchNorm2d(4), _NotTorchNorm(4), nn.Linear(4, 2))
    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    cfg.SOLVER.WEIGHT_DECAY_NORM = 3e-5
    cfg.SOLVER.WEIGHT_DECAY_BIAS = None
    opt = build_optimizer(cfg, model)
    wd = {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert id(p) not in wd, "parameter in two groups"
            wd[id(p)] = g["weight_decay"]
    assert len(wd) == len(list(model.parameters()))
    assert wd[id(model[0].weight)] == 1e-4 and wd[id(model[3].weight)] == 1e-4
    for p in (model[1].weight, model[1].bias, model[2].weight, model[2].bias):
        assert wd[id(p)] == 3e-5
    assert wd[id(model[2].alpha)] == 0.0
    # detectron2's own builder misses the non-torch norm: the gap this module closes
    from detectron2.solver import build_optimizer as d2_build_optimizer

    d2 = {id(p): g["weight_decay"] for g in d2_build_optimizer(cfg, model).param_groups for p in g["params"]}
    assert d2[id(model[2].weight)] == 1e-4
