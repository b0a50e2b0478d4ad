"""The comparisons layer tests share: forward + backward against a float64 reference, and training-mode
equality with torch's ``nn.BatchNorm2d`` for the layers documented as "exactly BN" in training."""
from typing import Callable, Tuple

import torch
from torch import nn

__all__ = ["assert_matches_reference", "assert_trains_as_batchnorm"]


def assert_matches_reference(
    layer: nn.Module,
    x: torch.Tensor,
    reference: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    out_tol: Tuple[float, float] = (1e-10, 1e-10),
    grad_tol: Tuple[float, float] = (1e-9, 1e-10),
    seed: int = 0,
) -> torch.Tensor:
    """``layer(x)`` against ``reference(x, weight, bias)`` evaluated on detached copies (an independent graph),
    then the gradients w.r.t. the input, ``layer.weight`` and ``layer.bias`` for one random output gradient.
    Tolerances are ``(rtol, atol)``. Returns the layer's output."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    wr = layer.weight.detach().clone().requires_grad_(True)
    br = layer.bias.detach().clone().requires_grad_(True)
    y = layer(x)
    yr = reference(xr, wr, br)
    torch.testing.assert_close(y, yr, rtol=out_tol[0], atol=out_tol[1])
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    (y * g).sum().backward()
    (yr * g.to(yr.dtype)).sum().backward()
    for got, want, what in ((x.grad, xr.grad, "input"), (layer.weight.grad, wr.grad, "weight"),
                            (layer.bias.grad, br.grad, "bias")):
        torch.testing.assert_close(got, want, rtol=grad_tol[0], atol=grad_tol[1], msg=lambda m: f"{what} grad: {m}")
    return y


def assert_trains_as_batchnorm(layer: nn.Module, batches) -> None:
    """Training ``layer`` and an ``nn.BatchNorm2d`` loaded with its state on the same ``batches`` gives identical
    outputs and input gradients at every step, identical accumulated γ/β gradients and identical buffers."""
    ref = nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum).to(layer.weight.dtype)
    ref.load_state_dict(layer.state_dict())
    layer.train(), ref.train()
    for x in batches:
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, y2 = layer(x1), ref(x2)
        y1.square().sum().backward()
        y2.square().sum().backward()
        assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)
    assert torch.equal(layer.weight.grad, ref.weight.grad) and torch.equal(layer.bias.grad, ref.bias.grad)
    for (k1, b1), (k2, b2) in zip(layer.named_buffers(), ref.named_buffers()):
        assert k1 == k2 and torch.equal(b1, b2), k1
