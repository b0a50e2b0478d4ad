"""Training: the d2norm Trainer and config setup for tools/train_net.py."""
from .trainer import Trainer, setup_cfg

__all__ = ["Trainer", "setup_cfg"]
