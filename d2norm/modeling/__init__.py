"""Registered detectron2 heads, backbones and meta-architectures (importing registers them)."""
