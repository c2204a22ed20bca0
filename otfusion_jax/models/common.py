"""Conventions shared by the models: where activations are sown, and how."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["ACT_PREFIX", "ACT_COLLECTIONS", "sow_acts"]

# Models sow activations as ACT_PREFIX + plan name (a prefix keeps them clear of
# submodule names, which Flax scopes share); capture_activations strips it.
ACT_PREFIX = "@"

# Activation kind -> the collection a model sows it into.
ACT_COLLECTIONS = {"pre": "acts_pre", "post": "acts_post"}


def sow_acts(module: nn.Module, plan: str, pre: jnp.ndarray, post: jnp.ndarray | None = None) -> None:
    """Sows one tensor carrying ``plan`` into both activation collections.

    Every registered model calls this once per tensor that carries a plan: a
    layer's output before the nonlinearity (``pre``) and after it (``post``;
    the logits, which have no nonlinearity, pass ``pre`` only). The neurons
    of the plan are on the last axis of both.

    Args:
      module: the module sowing (``self`` inside ``__call__``).
      plan: the plan name in the model's alignment spec.
      pre: (N, ..., n_plan) activations before the nonlinearity.
      post: (N, ..., n_plan) activations after it; None: ``pre``.
    """
    module.sow(ACT_COLLECTIONS["pre"], ACT_PREFIX + plan, pre)
    module.sow(ACT_COLLECTIONS["post"], ACT_PREFIX + plan, pre if post is None else post)
