"""Registered meta-architectures (importing a module registers it in detectron2's META_ARCH_REGISTRY)."""
