"""Model registry: build a Flax module and its alignment spec by name.

>>> model, spec = build("mlpnet", input_shape=(28, 28, 1), num_classes=10, bias=False)
>>> variables = init(model, jax.random.key(0), (28, 28, 1))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from otfusion_jax import spec as spec_lib
from otfusion_jax.models.common import ACT_PREFIX
from otfusion_jax.models.mlp import MLPNet, mlpnet_spec
from otfusion_jax.models.resnet import ResNet18, resnet18_spec
from otfusion_jax.models.vgg import VGG11, vgg11_spec

__all__ = [
    "MLPNet",
    "VGG11",
    "ResNet18",
    "build",
    "init",
    "capture_activations",
    "recompute_batch_stats",
    "available",
    "register",
    "ACT_COLLECTIONS",
]

ACT_COLLECTIONS = {"pre": "acts_pre", "post": "acts_post"}

Builder = Callable[..., tuple[nn.Module, spec_lib.AlignmentSpec]]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding a builder ``f(input_shape, num_classes, **options) -> (module, spec)``."""

    def deco(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    """Names of the registered models."""
    return sorted(_REGISTRY)


def build(
    name: str, *, input_shape: tuple[int, int, int] = (28, 28, 1), num_classes: int = 10, **options: Any
) -> tuple[nn.Module, spec_lib.AlignmentSpec]:
    """Builds a registered model and its alignment spec.

    Args:
      name: "mlpnet", "vgg11" or "resnet18" (see ``available()``).
      input_shape: (H, W, C) of one input.
      num_classes: number of output classes.
      **options: model options: ``bias`` (bool), ``norm`` (bool, conv nets),
        ``width`` (float multiplier, conv nets), ``widths`` (tuple, mlpnet).

    Returns:
      (module, spec).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {available()}")
    try:
        return _REGISTRY[name](tuple(input_shape), num_classes, **options)
    except TypeError as e:
        raise ValueError(f"model {name!r}: bad options {sorted(options)}: {e}") from None


@register("mlpnet")
def _mlpnet(input_shape, num_classes, *, bias: bool = False, widths=(400, 200, 100)):
    widths = tuple(int(w) for w in widths)
    return (
        MLPNet(widths=widths, num_classes=num_classes, use_bias=bias),
        mlpnet_spec(len(widths), bias=bias),
    )


@register("vgg11")
def _vgg11(input_shape, num_classes, *, bias: bool = False, norm: bool = False, width: float = 1.0):
    module = VGG11(num_classes=num_classes, use_bias=bias, use_norm=norm, width=width)
    return module, vgg11_spec(input_shape[:2], bias=bias, norm=norm)


@register("resnet18")
def _resnet18(input_shape, num_classes, *, bias: bool = False, norm: bool = True, width: float = 1.0):
    module = ResNet18(num_classes=num_classes, use_bias=bias, use_norm=norm, width=width)
    return module, resnet18_spec(bias=bias, norm=norm)


def init(module: nn.Module, rng: jax.Array, input_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Initial variables ``{"params": ..., ["batch_stats": ...]}`` as plain nested dicts."""
    variables = module.init(rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    return {k: v for k, v in variables.items() if k not in ACT_COLLECTIONS.values()}


def capture_activations(
    module: nn.Module, variables: Mapping[str, Any], x: jnp.ndarray, kind: str = "pre"
) -> dict[str, tuple[jnp.ndarray, ...]]:
    """Runs the model in eval mode and returns the activations each plan is computed from.

    Args:
      module: a registered model.
      variables: its variables.
      x: (S, H, W, C) input samples.
      kind: "pre" (before the ReLU) or "post" (after it).

    Returns:
      plan name -> tuple of (S, ..., n_plan) arrays, one per tensor carrying that
      plan (a residual stream has several).
    """
    if kind not in ACT_COLLECTIONS:
        raise ValueError(f"activation kind must be 'pre' or 'post', got {kind!r}")
    coll = ACT_COLLECTIONS[kind]
    _, state = module.apply(dict(variables), x, train=False, mutable=[coll])
    out: dict[str, tuple] = {}

    def walk(node):
        for key, value in node.items():
            if isinstance(value, tuple):
                plan = key.removeprefix(ACT_PREFIX)
                out[plan] = out.get(plan, ()) + value
            else:
                walk(value)

    walk(state.get(coll, {}))
    return out


def recompute_batch_stats(module: nn.Module, variables: Mapping[str, Any], x: jnp.ndarray) -> dict[str, Any]:
    """Replaces BatchNorm running statistics by those of ``x`` under the given weights.

    One train-mode pass over all S samples with momentum 0, so each BatchNorm's
    statistics are exactly the batch mean and (biased) variance of its input
    under the preceding (new) layers. Used after fusion, where aligned and
    averaged statistics no longer describe the averaged weights.

    Args:
      module: a registered model with a ``bn_momentum`` field.
      variables: its variables (returned unchanged if there is no batch_stats).
      x: (S, H, W, C) samples, e.g. a few hundred training images.

    Returns:
      Variables with new batch_stats.
    """
    if "batch_stats" not in variables:
        return dict(variables)
    fresh = module.clone(bn_momentum=0.0)
    _, state = fresh.apply(dict(variables), x, train=True, mutable=["batch_stats"])
    return {**variables, "batch_stats": state["batch_stats"]}
