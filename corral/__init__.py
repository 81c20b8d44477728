"""Corral: make your own instruction-following model (generate data, fine-tune, serve)."""

__version__ = "0.1.0"
