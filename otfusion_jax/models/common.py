"""Conventions shared by the models."""

__all__ = ["ACT_PREFIX"]

# Models sow activations as ACT_PREFIX + plan name (a prefix keeps them clear of
# submodule names, which Flax scopes share); capture_activations strips it.
ACT_PREFIX = "@"
