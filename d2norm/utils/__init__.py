"""Utilities shared by layers, modeling and statistics: :mod:`.comm`, the cross-process collectives."""
