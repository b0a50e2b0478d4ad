"""Registered detectron2 backbones (XBNBlock ResNet, MABN ResNet, ...).

Each module registers its builders in detectron2's ``BACKBONE_REGISTRY`` when imported; d2norm/modeling/__init__.py
imports them.
"""
