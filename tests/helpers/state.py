"""Snapshots of module state for "nothing else changed" assertions."""
from typing import Dict

import torch
from torch import nn

__all__ = ["buffers"]


def buffers(m: nn.Module) -> Dict[str, torch.Tensor]:
    """``{name: detached clone}`` of every buffer of ``m``."""
    return {k: v.detach().clone() for k, v in m.named_buffers()}
