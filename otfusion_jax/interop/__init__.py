"""Interoperability with the original OTFusion (PyTorch)."""

from otfusion_jax.interop import layouts

__all__ = ["layouts"]
