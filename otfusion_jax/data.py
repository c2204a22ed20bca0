"""Image classification data sets as normalised NumPy arrays, and batching.

Every loader returns a :class:`Dataset` whose images are ``float32`` arrays of
shape ``(N, H, W, C)`` normalised as ``(x / max - mean) / std`` and whose labels
are ``int32`` arrays of shape ``(N,)``. Four data sets are known:

* ``"digits"``: scikit-learn's bundled 8x8 digits (1797 images, no download).
  Split deterministically by ``seed`` into 1497 train / 300 test images. This
  is the offline default (source ``"sklearn"``).
* ``"mnist"`` and ``"fashion_mnist"``: read from a folder of IDX files (source
  ``"idx"``; ``apt-get install dataset-fashion-mnist`` puts Fashion-MNIST in
  ``/usr/share/datasets/fashion-mnist``) or from TensorFlow Datasets (source
  ``"tfds"``).
* ``"cifar10"``: TensorFlow Datasets only.

The TFDS path uses ``tfds.data_source`` (random access, works without
TensorFlow installed); ``tfds.load`` needs TensorFlow and is not used. Every
failure to obtain data is raised as :class:`DataSourceError`, whose message
names the data set and the source or file and lists the offline alternatives.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DataSourceError",
    "Dataset",
    "load",
    "batches",
    "num_batches",
    "read_idx",
    "NORMALIZATION",
    "FASHION_MNIST_SYSTEM_DIR",
    "EVAL_SPLITS",
]

EVAL_SPLITS = ("test", "heldout")  # what a Dataset's x_test holds (see load's eval_split)

# Where `apt-get install dataset-fashion-mnist` puts the Fashion-MNIST IDX files.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"

# Per-channel (mean, std) of the pixel values after division by the maximum.
# MNIST: the constants the original OTFusion code uses. Fashion-MNIST, CIFAR-10:
# the usual train-split statistics. digits: mean/std of the train split (seed 0,
# 1497 images) after division by 16, computed once and fixed here so that the
# normalisation does not depend on the split seed (other seeds differ by <1e-3).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3057,), (0.3761,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

_NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10}
_PIXEL_MAX = {"digits": 16.0, "mnist": 255.0, "fashion_mnist": 255.0, "cifar10": 255.0}
_SOURCES = {
    "digits": ("sklearn",),
    "mnist": ("idx", "tfds"),
    "fashion_mnist": ("idx", "tfds"),
    "cifar10": ("tfds",),
}
_DIGITS_NUM_TEST = 300

# IDX file stems, looked up as `stem` or `stem.gz` inside the data folder.
_IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX data type codes (third byte of the magic number); multi-byte types are
# big-endian in the file.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataSourceError(ValueError):
    """A data set could not be read from its source, or its content is invalid.

    The message names the data set and the source or file involved and, where
    the data could not be obtained at all, the offline alternatives.
    """


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A normalised image classification data set held in host memory.

    Attributes:
      name: Data set name, e.g. ``"digits"`` or ``"fashion_mnist"``.
      source: Where it came from: ``"sklearn"``, ``"idx"`` or ``"tfds"``.
      x_train: ``float32`` images, shape ``(N_train, H, W, C)``, normalised.
      y_train: ``int32`` labels in ``[0, num_classes)``, shape ``(N_train,)``.
      x_test: ``float32`` images, shape ``(N_test, H, W, C)``, normalised.
      y_test: ``int32`` labels in ``[0, num_classes)``, shape ``(N_test,)``.
      num_classes: Number of classes.
      eval_split: What ``x_test``/``y_test`` hold: ``"test"`` (the test set) or
        ``"heldout"`` (the training examples after ``max_train``, which no
        parent trained on: for choices that must not see the test set).

    Equality and hashing are by identity (the fields are arrays).
    """

    name: str
    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    eval_split: str = "test"

    def __post_init__(self) -> None:
        """Checks that the arrays have consistent shapes.

        Raises:
          ValueError: If images are not 4-D, labels not 1-D, counts differ, or
            train and test images differ in shape.
        """
        splits = (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test))
        for split, x, y in splits:
            if x.ndim != 4 or y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"Dataset {self.name!r}: {split} images must be (N, H, W, C) and labels (N,), "
                    f"got {x.shape} and {y.shape}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"Dataset {self.name!r}: train and test images differ in shape: "
                f"{self.x_train.shape[1:]} vs {self.x_test.shape[1:]}"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The shape of one image, ``(H, W, C)``."""
        h, w, c = self.x_train.shape[1:]
        return int(h), int(w), int(c)


def _offline_alternatives(name: str) -> str:
    """Returns a sentence listing the offline ways to get data.

    Args:
      name: The data set that could not be loaded.

    Returns:
      Human-readable text naming the offline alternatives.
    """
    idx_files = ", ".join(f"{stem}[.gz]" for stem in _IDX_STEMS.values())
    parts = []
    if name in ("mnist", "fashion_mnist"):
        parts.append(f"source='idx' with data_dir set to a folder holding {idx_files}")
    parts.append(
        f"for Fashion-MNIST, `apt-get install dataset-fashion-mnist` installs the IDX files in "
        f"{FASHION_MNIST_SYSTEM_DIR} (then load('fashion_mnist', source='idx'))"
    )
    parts.append("load('digits'), scikit-learn's bundled 8x8 digits, needs no download")
    return "Offline alternatives: " + "; ".join(parts) + "."


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parses one IDX file (the MNIST format), optionally gzip-compressed.

    Compression is detected from the gzip magic bytes, not the file name. The
    header is validated: two zero bytes, a known data type code, at least one
    dimension, and exactly ``prod(dims) * itemsize`` data bytes after it.

    Args:
      path: Path to the IDX file.

    Returns:
      An array of shape ``dims`` in native byte order (e.g. ``uint8`` of shape
      ``(N, 28, 28)`` for an image file, ``(N,)`` for a label file).

    Raises:
      DataSourceError: If the file cannot be read or decompressed, or its
        header or size is invalid. The message names the file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataSourceError(f"cannot read IDX file {path!r}: {e}") from e

    if len(raw) < 4:
        raise DataSourceError(f"IDX file {path!r} is too short ({len(raw)} bytes) for a header")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0:
        raise DataSourceError(
            f"IDX file {path!r} has a bad magic number 0x{raw[:4].hex()} (must start with 0x0000)"
        )
    if code not in _IDX_DTYPES:
        raise DataSourceError(f"IDX file {path!r} has an unknown data type code 0x{code:02x}")
    if ndim == 0:
        raise DataSourceError(f"IDX file {path!r} declares zero dimensions")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataSourceError(
            f"IDX file {path!r} is truncated: header declares {ndim} dimensions but the file has "
            f"only {len(raw)} bytes"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    dtype = _IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    actual = len(raw) - header_size
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise DataSourceError(
            f"IDX file {path!r} is {what}: dims {dims} of {dtype.name} need {expected} data bytes, "
            f"found {actual}"
        )
    data = np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=header_size)
    return data.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def _find_idx_file(name: str, data_dir: str, stem: str) -> str:
    """Returns the path of ``stem`` or ``stem.gz`` in ``data_dir``.

    Args:
      name: Data set name (for the error message).
      data_dir: Folder holding the IDX files.
      stem: File name without ``.gz``.

    Returns:
      The path of the uncompressed file if present, else of the ``.gz`` file.

    Raises:
      DataSourceError: If neither exists.
    """
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    raise DataSourceError(
        f"{name}: IDX file {stem}[.gz] not found in {data_dir!r}. {_offline_alternatives(name)}"
    )


def _validate_split(
    name: str, what: str, images: np.ndarray, labels: np.ndarray, num_classes: int
) -> None:
    """Checks one split's raw arrays: non-empty, matching counts, labels in range.

    Args:
      name: Data set name.
      what: Description of the source of the split (file names or tfds split).
      images: Raw images, shape ``(N, H, W, C)``.
      labels: Integer labels, shape ``(N,)``.
      num_classes: Labels must lie in ``[0, num_classes)``.

    Raises:
      DataSourceError: If a check fails; the message names ``what``.
    """
    if images.shape[0] == 0 or labels.shape[0] == 0:
        raise DataSourceError(f"{name}: {what} holds no examples")
    if images.shape[0] != labels.shape[0]:
        raise DataSourceError(
            f"{name}: {what} has {images.shape[0]} images but {labels.shape[0]} labels"
        )
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise DataSourceError(
            f"{name}: {what} has labels in [{lo}, {hi}], outside [0, {num_classes})"
        )


def _load_idx_split(name: str, data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads and validates one split from a folder of IDX files.

    Args:
      name: Data set name.
      data_dir: Folder holding the IDX files.
      split: ``"train"`` or ``"test"``.

    Returns:
      ``uint8`` images of shape ``(N, H, W, 1)`` and ``int32`` labels ``(N,)``.

    Raises:
      DataSourceError: If a file is missing or invalid.
    """
    images_path = _find_idx_file(name, data_dir, _IDX_STEMS[f"{split}_images"])
    labels_path = _find_idx_file(name, data_dir, _IDX_STEMS[f"{split}_labels"])
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataSourceError(
            f"{name}: IDX file {images_path!r} must hold uint8 images of shape (N, H, W), "
            f"got {images.dtype.name} {images.shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataSourceError(
            f"{name}: IDX file {labels_path!r} must hold integer labels of shape (N,), "
            f"got {labels.dtype.name} {labels.shape}"
        )
    what = f"IDX files {images_path!r} and {labels_path!r}"
    _validate_split(name, what, images, labels, _NUM_CLASSES[name])
    return images[..., None], labels.astype(np.int32)


def _load_idx(name: str, data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reads train and test splits from a folder of IDX files.

    Args:
      name: ``"mnist"`` or ``"fashion_mnist"``.
      data_dir: Folder holding the four IDX files.

    Returns:
      ``(x_train, y_train, x_test, y_test)``, raw ``uint8`` images ``(N, H, W, 1)``
      and ``int32`` labels.

    Raises:
      DataSourceError: If the folder or a file is missing or invalid.
    """
    if not os.path.isdir(data_dir):
        raise DataSourceError(
            f"{name}: IDX folder {data_dir!r} does not exist. {_offline_alternatives(name)}"
        )
    x_train, y_train = _load_idx_split(name, data_dir, "train")
    x_test, y_test = _load_idx_split(name, data_dir, "test")
    return x_train, y_train, x_test, y_test


def _read_records(source: Sequence[Any], limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Reads the first ``limit`` records of a TFDS data source into arrays.

    Records are fetched one by one with ``source[i]``: the batch accessor
    ``__getitems__`` is broken under ``tfds.testing.mock_data`` in tfds 4.9.10.

    Args:
      source: A random-access sequence of ``{"image", "label"}`` dicts.
      limit: Number of records to read; ``None`` reads all.

    Returns:
      Stacked images ``(N, H, W, C)`` and labels ``(N,)`` (``int64``).
    """
    n = len(source) if limit is None else min(limit, len(source))
    images, labels = [], []
    for i in range(n):
        record = source[i]
        images.append(np.asarray(record["image"]))
        labels.append(np.asarray(record["label"]))
    if n == 0:
        return np.zeros((0, 0, 0, 0), np.uint8), np.zeros((0,), np.int64)
    return np.stack(images), np.stack(labels).astype(np.int64)


def _load_tfds(
    name: str, data_dir: str | None, max_train: int | None, max_test: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reads a data set with ``tfds.data_source`` (no TensorFlow needed).

    Args:
      name: TFDS name, e.g. ``"mnist"`` or ``"cifar10"``.
      data_dir: TFDS data folder, or ``None`` for the TFDS default.
      max_train: Read at most this many train records (``None``: all).
      max_test: Read at most this many test records (``None``: all).

    Returns:
      ``(x_train, y_train, x_test, y_test)``: raw ``uint8`` images
      ``(N, H, W, C)`` and ``int32`` labels.

    Raises:
      DataSourceError: If TFDS cannot provide the data (not installed, not
        prepared, no network, missing TensorFlow, ...) or it is invalid.
    """
    arrays = []
    for split, limit in (("train", max_train), ("test", max_test)):
        try:
            import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

            source = tfds.data_source(name, split=split, data_dir=data_dir)
            images, labels = _read_records(source, limit)
        except Exception as e:  # noqa: BLE001 - any tfds failure becomes a DataSourceError.
            where = f" (data_dir={data_dir!r})" if data_dir is not None else ""
            raise DataSourceError(
                f"{name}: tensorflow_datasets could not provide split {split!r}{where}: "
                f"{type(e).__name__}: {e}. {_offline_alternatives(name)}"
            ) from e
        what = f"tfds data source {name!r} split {split!r}"
        if images.ndim != 4 or images.dtype != np.uint8:
            raise DataSourceError(
                f"{name}: {what} must give uint8 images of shape (H, W, C), "
                f"got {images.dtype.name} {images.shape[1:]}"
            )
        _validate_split(name, what, images, labels, _NUM_CLASSES[name])
        arrays += [images, labels.astype(np.int32)]
    x_train, y_train, x_test, y_test = arrays
    return x_train, y_train, x_test, y_test


def _load_digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Loads scikit-learn's bundled 8x8 digits, split deterministically by ``seed``.

    Args:
      seed: Seed of the ``np.random.default_rng`` permutation; the first 1497
        permuted images are the train split, the last 300 the test split.

    Returns:
      ``(x_train, y_train, x_test, y_test)``: raw images in ``[0, 16]`` of shape
      ``(N, 8, 8, 1)`` and ``int32`` labels.

    Raises:
      DataSourceError: If scikit-learn cannot load the bundled data.
    """
    try:
        from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

        bunch = load_digits()
        images = np.asarray(bunch.images, dtype=np.float32)[..., None]
        labels = np.asarray(bunch.target, dtype=np.int32)
    except Exception as e:  # noqa: BLE001 - any sklearn failure becomes a DataSourceError.
        raise DataSourceError(
            f"digits: scikit-learn could not load its bundled digits: {type(e).__name__}: {e}"
        ) from e
    _validate_split("digits", "sklearn load_digits()", images, labels, _NUM_CLASSES["digits"])
    perm = np.random.default_rng(seed).permutation(images.shape[0])
    train, test = perm[:-_DIGITS_NUM_TEST], perm[-_DIGITS_NUM_TEST:]
    return images[train], labels[train], images[test], labels[test]


def _resolve_source(name: str, source: str, data_dir: str | None) -> str:
    """Picks the concrete source for ``source="auto"`` and checks the choice.

    Args:
      name: Data set name.
      source: ``"auto"`` or a concrete source.
      data_dir: The ``data_dir`` passed to :func:`load`.

    Returns:
      ``"sklearn"``, ``"idx"`` or ``"tfds"``.

    Raises:
      ValueError: If the name is unknown or the source is not offered for it.
    """
    if name not in _SOURCES:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(_SOURCES)}")
    if source == "auto":
        if name == "digits":
            return "sklearn"
        if name == "cifar10":
            return "tfds"
        if data_dir is not None:
            return "idx"
        if name == "fashion_mnist" and os.path.isdir(FASHION_MNIST_SYSTEM_DIR):
            return "idx"
        return "tfds"
    if source not in _SOURCES[name]:
        raise ValueError(
            f"data set {name!r} is not available from source {source!r}; "
            f"choose one of {('auto',) + _SOURCES[name]}"
        )
    return source


def _pad(images: np.ndarray, pad_to: int, name: str) -> np.ndarray:
    """Zero-pads images symmetrically to ``pad_to x pad_to``.

    Args:
      images: Raw images ``(N, H, W, C)``.
      pad_to: Target height and width; an odd surplus goes to the bottom/right.
      name: Data set name (for the error message).

    Returns:
      Images of shape ``(N, pad_to, pad_to, C)``.

    Raises:
      ValueError: If ``pad_to`` is smaller than the images.
    """
    _, h, w, _ = images.shape
    if pad_to < h or pad_to < w:
        raise ValueError(f"{name}: pad_to={pad_to} is smaller than the images ({h}x{w})")
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    widths = ((0, 0), (top, pad_to - h - top), (left, pad_to - w - left), (0, 0))
    return np.pad(images, widths, mode="constant", constant_values=0)


def _normalise(images: np.ndarray, name: str) -> np.ndarray:
    """Scales raw images to ``[0, 1]`` and normalises them per channel.

    Args:
      images: Raw images ``(N, H, W, C)`` in ``[0, pixel max]``.
      name: Data set name, selecting the pixel maximum and mean/std.

    Returns:
      ``float32`` array ``(images / max - mean) / std``, same shape.
    """
    mean, std = NORMALIZATION[name]
    x = images.astype(np.float32) / np.float32(_PIXEL_MAX[name])
    x -= np.asarray(mean, np.float32)
    x /= np.asarray(std, np.float32)
    return x


def load(
    name: str,
    *,
    source: str = "auto",
    data_dir: str | None = None,
    pad_to: int | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    eval_split: str = "test",
) -> Dataset:
    """Loads a data set as normalised ``float32`` NHWC arrays.

    Args:
      name: ``"digits"``, ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"``.
      source: ``"auto"``, ``"sklearn"`` (digits), ``"idx"`` (mnist,
        fashion_mnist) or ``"tfds"`` (mnist, fashion_mnist, cifar10). ``"auto"``
        picks sklearn for digits; idx for mnist/fashion_mnist when ``data_dir``
        is given or, for fashion_mnist, when ``FASHION_MNIST_SYSTEM_DIR``
        exists; tfds otherwise.
      data_dir: For ``"idx"``, the folder holding ``train-images-idx3-ubyte``,
        ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
        ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``); defaults to
        ``FASHION_MNIST_SYSTEM_DIR`` for fashion_mnist. For ``"tfds"``, the
        TFDS data folder (``None``: the TFDS default).
      pad_to: If given, zero-pad (in raw pixel space, before normalisation)
        every image symmetrically to ``pad_to x pad_to``, e.g. 28 -> 32.
      max_train: Keep only the first ``max_train`` train examples.
      max_test: Keep only the first ``max_test`` test examples.
      seed: Seed of the train/test split of ``"digits"`` (ignored otherwise).
      eval_split: ``"test"`` (default) evaluates on the test set; ``"heldout"``
        puts the training examples after the first ``max_train`` in place of
        the test set (then cut to ``max_test``): data the parents never saw,
        on which to choose methods and epsilons without touching the test set.

    Returns:
      The :class:`Dataset`, with ``x_*`` of shape ``(N, H, W, C)`` and
      ``y_*`` of shape ``(N,)``.

    Raises:
      DataSourceError: If the data cannot be obtained from the source or is
        invalid (missing or corrupt files, labels out of range, mismatched
        counts, empty splits, TFDS unavailable).
      ValueError: If an argument is invalid (unknown name, source not offered
        for the data set, ``pad_to`` smaller than the images, ``max_*`` < 1).
    """
    resolved = _resolve_source(name, source, data_dir)
    for arg, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and value < 1:
            raise ValueError(f"{arg} must be >= 1 or None, got {value}")
    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"eval_split must be one of {EVAL_SPLITS}, got {eval_split!r}")
    if eval_split == "heldout" and max_train is None:
        raise ValueError("eval_split='heldout' evaluates on the training examples after max_train: set max_train")
    if resolved == "sklearn":
        x_train, y_train, x_test, y_test = _load_digits(seed)
    elif resolved == "idx":
        if data_dir is None:
            if name != "fashion_mnist":
                raise DataSourceError(
                    f"{name}: source='idx' needs data_dir, a folder of IDX files. "
                    f"{_offline_alternatives(name)}"
                )
            data_dir = FASHION_MNIST_SYSTEM_DIR
        x_train, y_train, x_test, y_test = _load_idx(name, os.fspath(data_dir))
    else:
        x_train, y_train, x_test, y_test = _load_tfds(name, data_dir, None if eval_split == "heldout" else max_train, max_test)
    if eval_split == "heldout":
        if len(x_train) <= max_train:
            raise ValueError(
                f"eval_split='heldout': {name} has {len(x_train)} training examples, none after max_train={max_train}"
            )
        x_test, y_test = x_train[max_train:], y_train[max_train:]
    x_train, y_train = x_train[:max_train], y_train[:max_train]
    x_test, y_test = x_test[:max_test], y_test[:max_test]
    if pad_to is not None:
        x_train, x_test = _pad(x_train, pad_to, name), _pad(x_test, pad_to, name)
    return Dataset(
        name=name,
        source=resolved,
        x_train=_normalise(x_train, name),
        y_train=np.ascontiguousarray(y_train, dtype=np.int32),
        x_test=_normalise(x_test, name),
        y_test=np.ascontiguousarray(y_test, dtype=np.int32),
        num_classes=_NUM_CLASSES[name],
        eval_split=eval_split,
    )


def num_batches(n: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Number of batches :func:`batches` yields for ``n`` examples.

    Args:
      n: Number of examples (>= 0).
      batch_size: Examples per batch (>= 1).
      drop_remainder: Whether a final partial batch is dropped.

    Returns:
      ``n // batch_size`` if ``drop_remainder`` else ``ceil(n / batch_size)``.

    Raises:
      ValueError: If ``n < 0`` or ``batch_size < 1``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return n // batch_size if drop_remainder else -(-n // batch_size)


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int | None,
    drop_remainder: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Iterates once over ``(x, y)`` in batches (one epoch).

    Args:
      x: Inputs, shape ``(N, ...)``.
      y: Targets, shape ``(N, ...)``.
      batch_size: Examples per batch (>= 1).
      seed: ``None`` keeps the order; otherwise the examples are visited in the
        order of ``np.random.default_rng(seed).permutation(N)`` (pass e.g.
        ``seed + epoch`` for a new order every epoch).
      drop_remainder: Drop the final batch if it has fewer than ``batch_size``
        examples.

    Returns:
      An iterator of ``(x_batch, y_batch)`` with leading dimension
      ``batch_size`` (the last one possibly smaller), covering every example
      exactly once unless ``drop_remainder`` drops the tail;
      :func:`num_batches` gives their number.

    Raises:
      ValueError: If ``x`` and ``y`` differ in length or ``batch_size < 1``.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    count = num_batches(n, batch_size, drop_remainder)
    order = None if seed is None else np.random.default_rng(seed).permutation(n)
    return _iterate(x, y, batch_size, count, order)


def _iterate(
    x: np.ndarray, y: np.ndarray, batch_size: int, count: int, order: np.ndarray | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``count`` batches, in order (``order is None``) or by ``order``.

    Args:
      x: Inputs ``(N, ...)``.
      y: Targets ``(N, ...)``.
      batch_size: Examples per batch.
      count: Number of batches to yield.
      order: Permutation of ``range(N)``, or ``None``.

    Yields:
      ``(x_batch, y_batch)`` pairs.
    """
    for b in range(count):
        lo, hi = b * batch_size, (b + 1) * batch_size
        if order is None:
            yield x[lo:hi], y[lo:hi]
        else:
            idx = order[lo:hi]
            yield x[idx], y[idx]
