"""Model registry: each architecture is one :class:`ModelRecord`; build its module and spec by name.

>>> model, spec = build("mlpnet", input_shape=(28, 28, 1), num_classes=10, bias=False)
>>> variables = init(model, jax.random.key(0), (28, 28, 1))
>>> get("mlpnet").options          # MLPNetOptions(bias: bool = False, widths: tuple[int, ...] = ...)

Adding an architecture is writing one record and registering it
(``docs/ADDING_A_MODEL.md``). A record is checked against the module contract
(:func:`check_record`, on abstract shapes) the first time it is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from otfusion_jax import spec as spec_lib
from otfusion_jax.models import mlp, resnet, vgg, vit
from otfusion_jax.models.common import ACT_COLLECTIONS, ACT_PREFIX, sow_acts
from otfusion_jax.models.mlp import MLPNet, MLPNetOptions
from otfusion_jax.models.record import ModelRecord, RecordError, check_record, sown_activations
from otfusion_jax.models.resnet import ResNet18, ResNet18Options
from otfusion_jax.models.torch_layout import LayoutError, TorchEntry, TorchLayout
from otfusion_jax.models.vgg import VGG11, VGG11Options
from otfusion_jax.models.vit import ViT, ViTOptions

__all__ = [
    "MLPNet",
    "VGG11",
    "ResNet18",
    "ViT",
    "MLPNetOptions",
    "VGG11Options",
    "ResNet18Options",
    "ViTOptions",
    "ModelRecord",
    "RecordError",
    "TorchLayout",
    "TorchEntry",
    "LayoutError",
    "build",
    "init",
    "capture_activations",
    "recompute_batch_stats",
    "available",
    "register",
    "get",
    "records",
    "check_record",
    "sow_acts",
    "ACT_COLLECTIONS",
    "ACT_PREFIX",
]

_REGISTRY: dict[str, ModelRecord] = {}
_CHECKED: set[str] = set()  # names whose record passed check_record in this process


def register(record: ModelRecord, *, replace: bool = False) -> ModelRecord:
    """Registers a model record under ``record.name``.

    The record is checked (:func:`check_record`) lazily, the first time it is
    built, so registering costs nothing at import.

    Args:
      record: the architecture (see ``docs/ADDING_A_MODEL.md``).
      replace: allow replacing a different record of the same name.

    Returns:
      The record (so ``register`` can wrap its definition).

    Raises:
      TypeError: ``record`` is not a :class:`ModelRecord`.
      ValueError: the name is taken by a different record and ``replace`` is False.
    """
    if not isinstance(record, ModelRecord):
        raise TypeError(
            f"models.register takes a ModelRecord, got {type(record).__name__} (see docs/ADDING_A_MODEL.md)"
        )
    old = _REGISTRY.get(record.name)
    if old is not None and old != record and not replace:
        raise ValueError(f"model {record.name!r} is already registered (pass replace=True to replace it)")
    if old != record:
        _CHECKED.discard(record.name)
    _REGISTRY[record.name] = record
    return record


def available() -> list[str]:
    """Names of the registered models."""
    return sorted(_REGISTRY)


def records() -> list[ModelRecord]:
    """The registered records, sorted by name."""
    return [_REGISTRY[name] for name in available()]


def get(name: str) -> ModelRecord:
    """The record of a registered model.

    Raises:
      ValueError: no model of that name is registered.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {available()}")
    return _REGISTRY[name]


def build(
    name: str, *, input_shape: tuple[int, int, int] = (28, 28, 1), num_classes: int = 10, **options: Any
) -> tuple[nn.Module, spec_lib.AlignmentSpec]:
    """Builds a registered model and its alignment spec.

    Args:
      name: a registered model, e.g. "mlpnet", "vgg11" or "resnet18" (see ``available()``).
      input_shape: (H, W, C) of one input.
      num_classes: number of output classes.
      **options: the fields of the model's options dataclass
        (``get(name).options``), e.g. mlpnet ``bias``, ``widths``; vgg11 and
        resnet18 ``bias``, ``norm``, ``width``.

    Returns:
      (module, spec).

    Raises:
      ValueError: unknown model, or an unknown or ill-typed option (the
        message names the model and the option).
      RecordError: the model's record breaks the module contract.
    """
    record = get(name)
    opts = record.make_options(**options)
    if name not in _CHECKED:
        check_record(record)
        _CHECKED.add(name)
    return record.build(opts, input_shape, num_classes)


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
    return sown_activations(state.get(coll, {}))


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


for _record in (mlp.RECORD, vgg.RECORD, resnet.RECORD, vit.RECORD):
    register(_record)
del _record
