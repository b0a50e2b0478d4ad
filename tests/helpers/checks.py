"""The forward + backward comparison every layer test makes against its float64 reference."""
from typing import Callable, Tuple

import torch
from torch import nn

__all__ = ["assert_matches_reference"]


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
