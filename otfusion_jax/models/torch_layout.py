"""The PyTorch layout of an architecture: how the original OTFusion's model names and shapes its weights.

A :class:`TorchLayout` is the optional part of a
:class:`~otfusion_jax.models.record.ModelRecord` that
``otfusion_jax.interop.torch_checkpoints`` reads: which state dicts belong to
the architecture, every state-dict entry with the Flax leaf it becomes, and how
to read the model's options back from a state dict's shapes. It is plain data
(shapes and names, no arrays), so a layout needs neither torch nor the array
conversions, which live in ``otfusion_jax.interop.layouts``.

The helpers below (``dense_entries``, ``conv_entries``, ``bn_entries``,
``require``, ...) are what a layout is written with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

__all__ = [
    "LayoutError",
    "TorchEntry",
    "TorchLayout",
    "ENTRY_KINDS",
    "dense_entries",
    "conv_entries",
    "bn_entries",
    "flax_shape",
    "torch_shape",
    "require",
    "scaled",
    "width_of",
    "preview",
]

# "dense": weight (out, in) <-> kernel (in, out); "flatten_dense": the same after
# a conv map is flattened (NCHW order in torch, NHWC in Flax); "conv": OIHW <-> HWIO;
# "vector": biases, BatchNorm parameters and statistics (same shape);
# "count": BatchNorm's num_batches_tracked (no Flax leaf, kept in metadata).
ENTRY_KINDS = ("dense", "flatten_dense", "conv", "vector", "count")

Shape = tuple[int, ...]


class LayoutError(ValueError):
    """A state dict (or variables) does not fit a layout; interop prefixes the file's name."""


@dataclasses.dataclass(frozen=True)
class TorchEntry:
    """One state-dict entry: its torch key and shape, the Flax leaf it becomes, and how it converts.

    Attributes:
      key: the state-dict key, e.g. ``"features.0.weight"``.
      path: the Flax leaf, e.g. ``"params/conv1/kernel"``; None for
        ``num_batches_tracked`` (metadata only).
      kind: one of ``ENTRY_KINDS``.
      shape: the torch shape.
      hw: "flatten_dense" only: (H, W) of the flattened map.
    """

    key: str
    path: str | None
    kind: str
    shape: Shape
    hw: tuple[int, int] | None = None

    def __post_init__(self):
        if self.kind not in ENTRY_KINDS:
            raise ValueError(f"entry {self.key!r}: kind must be one of {ENTRY_KINDS}, got {self.kind!r}")
        if (self.kind == "flatten_dense") != (self.hw is not None):
            raise ValueError(f"entry {self.key!r}: hw is given exactly for kind 'flatten_dense'")


@dataclasses.dataclass(frozen=True)
class TorchLayout:
    """The original OTFusion's PyTorch model of one architecture.

    Attributes:
      detect: ``detect(keys)``: whether a state dict with these keys (a
        frozenset, no ``module.`` prefix) is this architecture. Detectors of
        different records must not both accept one state dict.
      entries: ``entries(options, input_shape, num_classes)``: every
        :class:`TorchEntry`, in the order torch's ``state_dict()`` lists them.
      infer: ``infer(shapes, input_shape)``: ``(options, input_shape,
        num_classes)`` implied by a state dict's ``key -> torch shape``;
        ``input_shape`` (H, W, C) is the caller's or None (infer it). Raises
        :class:`LayoutError` naming the key.
      reads: ``reads(paths)``: the ``(flax path, torch key, required)`` triples
        ``infer`` needs, given the Flax leaf paths at hand; writing a
        checkpoint infers the options from these leaves' shapes.
    """

    detect: Callable[[frozenset[str]], bool]
    entries: Callable[[Any, tuple[int, int, int], int], list[TorchEntry]]
    infer: Callable[[Mapping[str, Shape], tuple[int, int, int] | None], tuple[Any, tuple[int, int, int], int]]
    reads: Callable[[Collection[str]], Iterable[tuple[str, str, bool]]]


# ----------------------------------------------------------------------------- entries


def dense_entries(
    key: str, name: str, n_in: int, n_out: int, bias: bool, hw: tuple[int, int] | None = None
) -> list[TorchEntry]:
    """A ``nn.Linear`` (torch ``key``) as the Flax Dense ``name``; ``hw``: it reads a flattened (H, W) map."""
    out = [TorchEntry(f"{key}.weight", f"params/{name}/kernel", "dense" if hw is None else "flatten_dense",
                      (n_out, n_in), hw)]
    if bias:
        out.append(TorchEntry(f"{key}.bias", f"params/{name}/bias", "vector", (n_out,)))
    return out


def conv_entries(key: str, name: str, c_in: int, c_out: int, k: int, bias: bool) -> list[TorchEntry]:
    """A ``nn.Conv2d`` with a k x k kernel (torch ``key``) as the Flax Conv ``name``."""
    out = [TorchEntry(f"{key}.weight", f"params/{name}/kernel", "conv", (c_out, c_in, k, k))]
    if bias:
        out.append(TorchEntry(f"{key}.bias", f"params/{name}/bias", "vector", (c_out,)))
    return out


def bn_entries(key: str, name: str, c: int) -> list[TorchEntry]:
    """A ``nn.BatchNorm2d`` (torch ``key``) as the Flax BatchNorm ``name``."""
    return [
        TorchEntry(f"{key}.weight", f"params/{name}/scale", "vector", (c,)),
        TorchEntry(f"{key}.bias", f"params/{name}/bias", "vector", (c,)),
        TorchEntry(f"{key}.running_mean", f"batch_stats/{name}/mean", "vector", (c,)),
        TorchEntry(f"{key}.running_var", f"batch_stats/{name}/var", "vector", (c,)),
        TorchEntry(f"{key}.num_batches_tracked", None, "count", ()),
    ]


def flax_shape(entry: TorchEntry) -> Shape:
    """The shape of an entry's Flax leaf."""
    if entry.kind in ("dense", "flatten_dense"):
        return entry.shape[::-1]
    if entry.kind == "conv":
        o, i, kh, kw = entry.shape
        return (kh, kw, i, o)
    return entry.shape


def torch_shape(shape: Shape) -> Shape:
    """The torch shape of a Flax leaf of this shape: kernels (in, out) and HWIO transposed, vectors as they are."""
    shape = tuple(shape)
    if len(shape) == 2:
        return shape[::-1]
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


# ----------------------------------------------------------------------------- inference helpers


def preview(keys: Iterable[str], n: int = 8) -> str:
    """The first ``n`` keys, comma separated, and how many there are in all."""
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def require(shapes: Mapping[str, Shape], key: str, ndim: int, model: str) -> Shape:
    """The shape of state-dict entry ``key``, which must exist with ``ndim`` axes."""
    if key not in shapes:
        raise LayoutError(f"missing key {key!r} for {model} (found keys: {preview(shapes)})")
    shape = tuple(shapes[key])
    if len(shape) != ndim:
        raise LayoutError(f"key {key!r} has shape {shape}, expected {ndim} axes for {model}")
    return shape


def scaled(c: int, width: float) -> int:
    """A standard width ``c`` times the multiplier ``width``, rounded as the conv nets round it."""
    return max(1, int(round(c * width)))


def width_of(c0: int, standard: int, key: str, model: str) -> float:
    """The width multiplier that turns the standard width into ``c0`` channels."""
    width = c0 / standard
    if scaled(standard, width) != c0:
        raise LayoutError(f"key {key!r}: {c0} channels is not a width multiple for {model}")
    return width
