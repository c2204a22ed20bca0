"""Glue between experiment configs (``configs/*.py``) and the library.

The library takes plain arguments and frozen dataclasses; this module turns a
config (an ``ml_collections.ConfigDict`` or the equivalent nested dict) into
them, so that ``train.py`` and ``fuse.py`` stay thin. Config layout::

    seed, num_parents, workdir
    model: name, bias, norm, width, widths
    data:  name, source, data_dir, pad_to, max_train, max_test, seed
    train: the TrainConfig fields except seed (parent k uses seed + k)
    fusion: fusion settings (free-form here; validated by the fusion code)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from otfusion_jax import data as data_lib
from otfusion_jax import models
from otfusion_jax import spec as spec_lib
from otfusion_jax import training

__all__ = [
    "SCHEMA",
    "MODEL_OPTIONS",
    "to_dict",
    "validate",
    "train_config_from",
    "model_options_from",
    "model_from",
    "model_from_metadata",
    "data_kwargs_from",
    "load_data",
    "parent_seed",
    "parent_dir",
    "parents_dir",
]

_TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(training.TrainConfig) if f.name != "seed")

# Allowed keys of each section (None: the top level); "fusion" is free-form here.
SCHEMA: dict[str | None, tuple[str, ...]] = {
    None: ("seed", "num_parents", "workdir", "parents_dir", "parent_widths", "model", "data", "train", "fusion"),
    "model": ("name", "bias", "norm", "width", "widths"),
    "data": ("name", "source", "data_dir", "pad_to", "max_train", "max_test", "seed"),
    "train": _TRAIN_FIELDS,
}

class _ModelOptions(Mapping):
    """Model name -> the config.model fields it takes: its record's option fields (a live view of the registry)."""

    def __getitem__(self, name: str) -> tuple[str, ...]:
        if name not in models.available():
            raise KeyError(name)
        return models.get(name).option_names

    def __iter__(self):
        return iter(models.available())

    def __len__(self) -> int:
        return len(models.available())

    def __repr__(self) -> str:
        return repr(dict(self))


# Which config.model fields each registered model takes as build() options:
# the fields of its options dataclass (models.get(name).options), e.g. mlpnet: bias, widths.
MODEL_OPTIONS: Mapping[str, tuple[str, ...]] = _ModelOptions()


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain nested dicts (ConfigDicts and FieldReferences resolved).

    Args:
      config: A ConfigDict (anything with ``to_dict()``) or a mapping.

    Returns:
      Nested dicts; tuples stay tuples.
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise ValueError(f"a config must be a ConfigDict or a mapping, got {type(config).__name__}")
    return {k: to_dict(v) if isinstance(v, Mapping) or hasattr(v, "to_dict") else v for k, v in config.items()}


def validate(config: Any) -> dict[str, Any]:
    """Checks a config's keys and values.

    Args:
      config: The experiment config.

    Returns:
      The config as plain dicts.

    Raises:
      ValueError: For a missing or unknown key (named with its full path,
        e.g. ``config.train.epochz``) or an invalid value.
    """
    cfg = to_dict(config)
    for section, allowed in SCHEMA.items():
        node = cfg if section is None else cfg.get(section)
        where = "config" if section is None else f"config.{section}"
        if not isinstance(node, Mapping):
            raise ValueError(f"{where} must be a section (ConfigDict), got {node!r}")
        unknown = sorted(set(node) - set(allowed))
        missing = sorted(set(allowed) - set(node))
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(f'{where}.{k}' for k in unknown)}")
        if missing:
            raise ValueError(f"missing config key(s): {', '.join(f'{where}.{k}' for k in missing)}")
    if not isinstance(cfg["fusion"], Mapping):
        raise ValueError("config.fusion must be a section (ConfigDict)")
    if not isinstance(cfg["num_parents"], int) or cfg["num_parents"] < 1:
        raise ValueError(f"config.num_parents must be an integer >= 1, got {cfg['num_parents']!r}")
    if not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise ValueError(f"config.seed must be an integer >= 0, got {cfg['seed']!r}")
    if not cfg["workdir"]:
        raise ValueError("config.workdir must be a non-empty path")
    if cfg["model"]["name"] not in models.available():
        raise ValueError(f"config.model.name {cfg['model']['name']!r} is not one of {models.available()}")
    for key in ("max_train", "max_test", "pad_to"):
        value = cfg["data"][key]
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"config.data.{key} must be None or an integer >= 1, got {value!r}")
    train_config_from(cfg)
    return cfg


def train_config_from(config: Any, seed: int | None = None) -> training.TrainConfig:
    """The :class:`~otfusion_jax.training.TrainConfig` of ``config.train``.

    Args:
      config: The experiment config.
      seed: Data-order seed; default ``config.seed`` (pass ``parent_seed(config, k)``).

    Returns:
      The frozen training config.

    Raises:
      ValueError: For an unknown ``config.train`` key or an invalid value.
    """
    cfg = to_dict(config)
    train = dict(cfg["train"])
    unknown = sorted(set(train) - set(_TRAIN_FIELDS))
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join('config.train.' + k for k in unknown)}")
    train["seed"] = cfg["seed"] if seed is None else seed
    if train.get("milestones") is not None:
        train["milestones"] = tuple(train["milestones"])
    try:
        return training.TrainConfig(**train)
    except TypeError as e:
        raise ValueError(f"bad config.train value: {e}") from None
    except ValueError as e:
        raise ValueError(f"bad config.train value: {e}".replace("TrainConfig.", "config.train.")) from None


def model_options_from(config: Any, k: int | None = None) -> tuple[str, dict[str, Any]]:
    """The model name and the ``models.build`` options selected by ``config.model``.

    Args:
      config: The experiment config.
      k: Parent index: its factor in ``config.parent_widths`` scales the widths
        (the record's ``scale_width``: mlpnet hidden widths, conv nets' width
        multiplier). None: factor 1.

    Returns:
      ``(name, options)``, e.g. ``("mlpnet", {"bias": False, "widths": [400, 200, 100]})``:
      every field of the model's options dataclass (``models.get(name).options``),
      from ``config.model`` where it has the field, else the default; JSON-friendly
      (lists, not tuples) for checkpoint metadata.

    Raises:
      ValueError: An unknown model, an option value of the wrong type, or a
        width factor for a model without a width option.
    """
    cfg = to_dict(config)
    model = cfg["model"]
    name = model["name"]
    record = models.get(name)
    try:
        options = record.make_options(**{key: model[key] for key in record.option_names if key in model})
    except ValueError as e:
        raise ValueError(f"config.model: {e}") from None
    factors = tuple(cfg.get("parent_widths") or ())
    factor = float(factors[k]) if k is not None and k < len(factors) else 1.0
    if factor != 1.0:
        if record.scale_width is None:
            raise ValueError(f"config.parent_widths: model {name!r} has no width option to scale")
        options = record.scale_width(options, factor)
    return name, record.options_dict(options)


def model_from(
    config: Any, input_shape: tuple[int, int, int], num_classes: int, k: int | None = None
) -> tuple[nn.Module, spec_lib.AlignmentSpec]:
    """Builds the configured model.

    Args:
      config: The experiment config.
      input_shape: (H, W, C) of one input (``dataset.input_shape``).
      num_classes: Number of classes.
      k: Parent index (its width factor), see :func:`model_options_from`.

    Returns:
      ``(module, spec)`` from :func:`otfusion_jax.models.build`.
    """
    name, options = model_options_from(config, k)
    return models.build(name, input_shape=tuple(input_shape), num_classes=num_classes, **options)


def model_from_metadata(metadata: Mapping[str, Any]) -> tuple[nn.Module, spec_lib.AlignmentSpec]:
    """Rebuilds the model of a checkpoint saved by ``train.py``.

    Args:
      metadata: Checkpoint metadata with ``model = {"name", "options",
        "input_shape", "num_classes"}``.

    Returns:
      ``(module, spec)``.

    Raises:
      ValueError: If the metadata does not describe a model.
    """
    try:
        m = metadata["model"]
        name, options = m["name"], dict(m["options"])
        input_shape, num_classes = tuple(m["input_shape"]), int(m["num_classes"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"checkpoint metadata does not describe a model (missing {e})") from None
    return models.build(name, input_shape=input_shape, num_classes=num_classes, **options)


def data_kwargs_from(config: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`otfusion_jax.data.load` for ``config.data``."""
    d = to_dict(config)["data"]
    return {
        "name": d["name"],
        "source": d["source"],
        "data_dir": d["data_dir"],
        "pad_to": d["pad_to"],
        "max_train": d["max_train"],
        "max_test": d["max_test"],
        "seed": d["seed"],
    }


def load_data(config: Any) -> data_lib.Dataset:
    """Loads ``config.data`` (raises ``data.DataSourceError`` if unavailable)."""
    kwargs = data_kwargs_from(config)
    return data_lib.load(kwargs.pop("name"), **kwargs)


def parent_seed(config: Any, k: int) -> int:
    """Seed of parent ``k``: ``config.seed + k`` (model init and data order)."""
    return int(to_dict(config)["seed"]) + int(k)


def parents_dir(config: Any) -> str:
    """``config.parents_dir``, or ``<workdir>/parents`` when it is None."""
    cfg = to_dict(config)
    return os.fspath(cfg.get("parents_dir") or os.path.join(os.fspath(cfg["workdir"]), "parents"))


def parent_dir(config: Any, k: int) -> str:
    """Checkpoint directory of parent ``k``: ``<parents_dir>/parent_<k>``."""
    return os.path.join(parents_dir(config), f"parent_{int(k)}")
