"""Read and write the original OTFusion's PyTorch checkpoints (MLPNet, VGG11, ResNet18).

The original (sidak/otfusion) saves ``torch.save({"args": vars(args), "epoch": ...,
"test_accuracy": <percent>, "model_state_dict": model.state_dict()}, path)``
(files such as ``model_0/final.checkpoint``). :func:`load_torch_checkpoint`
reads such a file (or a bare state dict), recognises the architecture from the
state dict's keys, infers its widths and converts the weights to our Flax
variables; :func:`save_torch_checkpoint` writes the exact inverse.

Key correspondence (torch -> Flax, ``{"params": ..., "batch_stats": ...}``):

* MLPNet (``model.py``): ``fc{i}.weight`` (out, in) -> ``params/fc{i}/kernel``
  (in, out), ``fc{i}.bias`` -> ``params/fc{i}/bias``. The original flattens
  NCHW images as (C, H, W), ours NHWC images as (H, W, C): identical for
  1-channel images (MNIST), converted exactly otherwise.
* VGG11 (``cifar/models/vgg.py``): ``features.{j}`` conv (OIHW) ->
  ``params/conv{i}/kernel`` (HWIO); with BatchNorm, ``features.{j+1}`` ->
  ``bn{i}``; ``classifier`` -> ``fc`` (its input is the flattened last map,
  1x1 for 32x32 inputs; converted generally for larger inputs).
* ResNet18 (``cifar/models/resnet.py``): ``conv1``/``bn1``,
  ``layer{s}.{b}.conv1|bn1|conv2|bn2``, ``layer{s}.0.shortcut.0|1`` ->
  ``layer{s}_{b}/shortcut_conv|shortcut_bn``, ``linear`` -> ``fc``.
* BatchNorm: ``weight`` -> ``params/.../scale``, ``bias`` -> ``params/.../bias``,
  ``running_mean`` / ``running_var`` -> ``batch_stats/.../mean`` / ``var``;
  ``num_batches_tracked`` is kept only in the metadata (for the round trip).

All layout changes are transposes, so both directions are bit exact. The
conversion itself is NumPy only (:func:`variables_from_state_dict`,
:func:`state_dict_from_variables`); torch (the optional extra
``otfusion-jax[torch]``) is imported only inside the two file functions.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from otfusion_jax import io_utils, models
from otfusion_jax import spec as spec_lib
from otfusion_jax.interop import layouts
from otfusion_jax.models import resnet as resnet_lib
from otfusion_jax.models import vgg as vgg_lib

__all__ = [
    "TorchCheckpointError",
    "SUPPORTED_MODELS",
    "is_torch_checkpoint",
    "detect_model",
    "load_torch_checkpoint",
    "save_torch_checkpoint",
    "variables_from_state_dict",
    "state_dict_from_variables",
]

SUPPORTED_MODELS = ("mlpnet", "vgg11", "resnet18")

# torch.save's legacy (pre-1.6, non-zip) format starts with this pickled magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little") + b"."
_ZIP_MAGIC = b"PK\x03\x04"
_STATE_DICT_KEYS = ("model_state_dict", "state_dict")
_PREFIX = "module."  # added by nn.DataParallel
# Top-level entries of the original's checkpoint dict, in the order it writes them.
_TOP_ORDER = ("args", "epoch", "local_test_accuracy", "test_accuracy", "choice")


class TorchCheckpointError(ValueError):
    """A PyTorch checkpoint cannot be read, recognised or written. The message names the file."""


# ----------------------------------------------------------------------------- detection


def is_torch_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file written by ``torch.save`` (cheap: reads its first bytes).

    Recognises the zip format (torch >= 1.6: a zip archive holding
    ``<name>/data.pkl``) and the legacy pickle format (its magic number). Needs
    no torch; a directory (our own checkpoints) is never a torch checkpoint.

    Args:
      path: A file or directory.

    Returns:
      True for a torch checkpoint file, else False.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
    except OSError:
        return False
    if head.startswith(_LEGACY_MAGIC):
        return True
    if head.startswith(_ZIP_MAGIC):
        import zipfile  # pylint: disable=import-outside-toplevel

        try:
            with zipfile.ZipFile(path) as z:
                return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())
        except (zipfile.BadZipFile, OSError, ValueError):
            return True  # a damaged torch file still has the magic: let load report it
    return False


def detect_model(keys: Sequence[str]) -> str | None:
    """The architecture a state dict's keys belong to: a name in SUPPORTED_MODELS, or None.

    Args:
      keys: State-dict keys (without a ``module.`` prefix).

    Returns:
      "mlpnet" (only ``fc{i}.weight|bias``), "vgg11" (``features.*`` and
      ``classifier.weight``), "resnet18" (``conv1.weight``, ``layer1.*`` and
      ``linear.weight``), or None.
    """
    keys = set(keys)
    if "classifier.weight" in keys and any(k.startswith("features.") for k in keys):
        return "vgg11"
    if {"conv1.weight", "linear.weight"} <= keys and any(k.startswith("layer1.") for k in keys):
        return "resnet18"
    if keys and all(re.fullmatch(r"fc[1-9]\d*\.(weight|bias)", k) for k in keys):
        return "mlpnet"
    return None


# ----------------------------------------------------------------------------- key plans


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One state-dict entry: its torch key and shape, the Flax leaf and how to convert."""

    key: str
    path: str | None  # Flax leaf path; None for num_batches_tracked (metadata only)
    kind: str  # "dense" | "flatten_dense" | "conv" | "vector" | "count"
    shape: tuple[int, ...]  # torch shape
    hw: tuple[int, int] | None = None  # flatten_dense: spatial size of the flattened map


def _dense(out: list, key: str, name: str, n_in: int, n_out: int, bias: bool, hw=None) -> None:
    kind = "dense" if hw is None else "flatten_dense"
    out.append(_Entry(f"{key}.weight", f"params/{name}/kernel", kind, (n_out, n_in), hw))
    if bias:
        out.append(_Entry(f"{key}.bias", f"params/{name}/bias", "vector", (n_out,)))


def _conv(out: list, key: str, name: str, c_in: int, c_out: int, k: int, bias: bool) -> None:
    out.append(_Entry(f"{key}.weight", f"params/{name}/kernel", "conv", (c_out, c_in, k, k)))
    if bias:
        out.append(_Entry(f"{key}.bias", f"params/{name}/bias", "vector", (c_out,)))


def _bn(out: list, key: str, name: str, c: int) -> None:
    out.append(_Entry(f"{key}.weight", f"params/{name}/scale", "vector", (c,)))
    out.append(_Entry(f"{key}.bias", f"params/{name}/bias", "vector", (c,)))
    out.append(_Entry(f"{key}.running_mean", f"batch_stats/{name}/mean", "vector", (c,)))
    out.append(_Entry(f"{key}.running_var", f"batch_stats/{name}/var", "vector", (c,)))
    out.append(_Entry(f"{key}.num_batches_tracked", None, "count", ()))


def _scaled(c: int, width: float) -> int:
    """A standard width times the multiplier, rounded like the models do."""
    return max(1, int(round(c * width)))


def _plan(
    name: str, options: Mapping[str, Any], input_shape: tuple[int, int, int], num_classes: int
) -> list[_Entry]:
    """All state-dict entries of a model, in the order torch's ``state_dict()`` lists them."""
    out: list[_Entry] = []
    bias = bool(options.get("bias", False))
    h, w, c_in = input_shape
    if name == "mlpnet":
        widths = [int(x) for x in options.get("widths", (400, 200, 100))]
        n_in = h * w * c_in
        for i, n_out in enumerate([*widths, num_classes]):
            _dense(out, f"fc{i + 1}", f"fc{i + 1}", n_in, n_out, bias, hw=(h, w) if i == 0 else None)
            n_in = n_out
    elif name == "vgg11":
        width, norm = float(options.get("width", 1.0)), bool(options.get("norm", False))
        j = i = 0
        for item in vgg_lib.VGG11_CFG:
            if item == "M":
                j += 1  # MaxPool2d: no parameters
                continue
            i += 1
            c = _scaled(item, width)
            _conv(out, f"features.{j}", f"conv{i}", c_in, c, 3, bias)
            if norm:
                _bn(out, f"features.{j + 1}", f"bn{i}", c)
            j += 3 if norm else 2  # conv, [bn,] relu
            c_in = c
        hw = (h // 32, w // 32)
        _dense(out, "classifier", "fc", c_in * hw[0] * hw[1], num_classes, bias, hw=hw)
    elif name == "resnet18":
        width, norm = float(options.get("width", 1.0)), bool(options.get("norm", True))
        c0 = _scaled(resnet_lib.STAGES[0][0], width)
        _conv(out, "conv1", "conv1", c_in, c0, 3, bias)
        if norm:
            _bn(out, "bn1", "bn1", c0)
        c_in = c0
        for s, (features, _) in enumerate(resnet_lib.STAGES):
            c = _scaled(features, width)
            for b in range(resnet_lib.BLOCKS_PER_STAGE):
                key, block = f"layer{s + 1}.{b}", f"layer{s + 1}_{b}"
                _conv(out, f"{key}.conv1", f"{block}/conv1", c_in, c, 3, bias)
                if norm:
                    _bn(out, f"{key}.bn1", f"{block}/bn1", c)
                _conv(out, f"{key}.conv2", f"{block}/conv2", c, c, 3, bias)
                if norm:
                    _bn(out, f"{key}.bn2", f"{block}/bn2", c)
                if b == 0 and s > 0:  # projection shortcut (the models' _needs_projection)
                    _conv(out, f"{key}.shortcut.0", f"{block}/shortcut_conv", c_in, c, 1, bias)
                    if norm:
                        _bn(out, f"{key}.shortcut.1", f"{block}/shortcut_bn", c)
                c_in = c
        _dense(out, "linear", "fc", c_in, num_classes, bias)
    else:
        raise ValueError(f"unknown model {name!r}; supported: {SUPPORTED_MODELS}")
    return out


def _describe(name: str, options: Mapping[str, Any], input_shape, num_classes) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{name}({opts}; input {tuple(input_shape)}, {num_classes} classes)"


# ----------------------------------------------------------------------------- inference


def _get(sd: Mapping[str, Any], key: str, ndim: int, where: str, model: str) -> tuple[int, ...]:
    """The shape of ``sd[key]``, which must exist with ``ndim`` axes."""
    if key not in sd:
        raise TorchCheckpointError(
            f"{where}: missing key {key!r} for {model} (found keys: {_preview(sd)})"
        )
    shape = tuple(np.shape(sd[key]))
    if len(shape) != ndim:
        raise TorchCheckpointError(
            f"{where}: key {key!r} has shape {shape}, expected {ndim} axes for {model}"
        )
    return shape


def _preview(keys, n: int = 8) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _width(c0: int, standard: int, key: str, where: str, model: str) -> float:
    width = c0 / standard
    if _scaled(standard, width) != c0:
        raise TorchCheckpointError(f"{where}: key {key!r}: {c0} channels is not a width multiple for {model}")
    return width


def _infer(
    name: str, sd: Mapping[str, Any], where: str, input_shape, num_classes
) -> tuple[dict[str, Any], tuple[int, int, int], int]:
    """Model options, input shape and class count implied by a (torch-layout) state dict."""
    if name == "mlpnet":
        found = [re.fullmatch(r"fc([1-9]\d*)\.(?:weight|bias)", k) for k in sd]
        n = max([int(m.group(1)) for m in found if m] or [1])
        shapes = [_get(sd, f"fc{i}.weight", 2, where, name) for i in range(1, n + 1)]
        options = {"bias": "fc1.bias" in sd, "widths": [s[0] for s in shapes[:-1]]}
        n_in, classes = shapes[0][1], shapes[-1][0]
        if input_shape is None:
            input_shape = {784: (28, 28, 1), 3072: (32, 32, 3)}.get(n_in, (1, 1, n_in))
        elif math.prod(input_shape) != n_in:
            raise TorchCheckpointError(
                f"{where}: key 'fc1.weight' reads {n_in} inputs but input_shape {tuple(input_shape)} has "
                f"{math.prod(input_shape)}"
            )
    elif name == "vgg11":
        convs = [k for k in sd if re.fullmatch(r"features\.\d+\.weight", k) and np.ndim(sd[k]) == 4]
        if len(convs) != 8:
            raise TorchCheckpointError(
                f"{where}: a VGG with {len(convs)} conv layers; only VGG11 (8 convs) is supported"
            )
        c0, c_in = _get(sd, "features.0.weight", 4, where, name)[:2]
        width = _width(c0, vgg_lib.VGG11_CFG[0], "features.0.weight", where, name)
        norm = "features.1.running_mean" in sd or "features.1.weight" in sd
        options = {"bias": "features.0.bias" in sd, "norm": norm, "width": width}
        classes, n_in = _get(sd, "classifier.weight", 2, where, name)
        c_last = _scaled(512, width)
        if input_shape is None:
            k = n_in // c_last if n_in % c_last == 0 else 0
            s = math.isqrt(k)
            if s * s != k or k == 0:
                raise TorchCheckpointError(
                    f"{where}: key 'classifier.weight' reads {n_in} inputs, not {c_last} channels times a "
                    "square map; pass input_shape"
                )
            input_shape = (32 * s, 32 * s, c_in)
    elif name == "resnet18":
        c0, c_in = _get(sd, "conv1.weight", 4, where, name)[:2]
        width = _width(c0, resnet_lib.STAGES[0][0], "conv1.weight", where, name)
        norm = "bn1.weight" in sd or "bn1.running_mean" in sd
        options = {"bias": "conv1.bias" in sd, "norm": norm, "width": width}
        classes = _get(sd, "linear.weight", 2, where, name)[0]
        if input_shape is None:
            input_shape = (32, 32, c_in)
    else:
        raise TorchCheckpointError(f"{where}: unknown model {name!r}; supported: {SUPPORTED_MODELS}")
    input_shape = tuple(int(x) for x in input_shape)
    if len(input_shape) != 3:
        raise TorchCheckpointError(f"{where}: input_shape must be (H, W, C), got {input_shape}")
    if name in ("vgg11", "resnet18") and input_shape[2] != c_in:
        raise TorchCheckpointError(
            f"{where}: the first conv reads {c_in} channels but input_shape {input_shape} "
            f"has {input_shape[2]}"
        )
    if name == "vgg11" and (input_shape[0] % 32 or input_shape[1] % 32):
        raise TorchCheckpointError(
            f"{where}: vgg11 needs H and W divisible by 32, got input_shape {input_shape}"
        )
    if num_classes is not None and int(num_classes) != classes:
        raise TorchCheckpointError(
            f"{where}: the last layer has {classes} outputs but num_classes={num_classes} was asked for"
        )
    return options, input_shape, int(classes)


def _infer_from_variables(
    name: str, flat: Mapping[str, Any], where: str, input_shape
) -> tuple[dict[str, Any], tuple[int, int, int], int]:
    """Like :func:`_infer`, from Flax variables (via the torch shapes of the leaves it reads)."""
    proxy: dict[str, Any] = {}

    def put(path: str, key: str, convert, required: bool = True):
        if path in flat:
            proxy[key] = np.empty(convert(np.shape(flat[path])), np.float32)
        elif required:
            raise TorchCheckpointError(f"{where}: variables do not match {name}; missing leaves: {path}")

    dense = lambda s: s[::-1]  # noqa: E731
    conv = lambda s: (s[3], s[2], s[0], s[1]) if len(s) == 4 else s  # noqa: E731
    if name == "mlpnet":
        found = [re.fullmatch(r"params/fc([1-9]\d*)/(?:kernel|bias)", p) for p in flat]
        for i in range(1, max([int(m.group(1)) for m in found if m] or [1]) + 1):
            put(f"params/fc{i}/kernel", f"fc{i}.weight", dense)
        put("params/fc1/bias", "fc1.bias", tuple, required=False)
    elif name == "vgg11":
        j = i = 0
        norm = "params/bn1/scale" in flat
        for item in vgg_lib.VGG11_CFG:
            if item == "M":
                j += 1
                continue
            i += 1
            put(f"params/conv{i}/kernel", f"features.{j}.weight", conv)
            j += 3 if norm else 2
        put("params/conv1/bias", "features.0.bias", tuple, required=False)
        put("params/bn1/scale", "features.1.weight", tuple, required=False)
        put("params/fc/kernel", "classifier.weight", dense)
    elif name == "resnet18":
        put("params/conv1/kernel", "conv1.weight", conv)
        put("params/conv1/bias", "conv1.bias", tuple, required=False)
        put("params/bn1/scale", "bn1.weight", tuple, required=False)
        put("params/fc/kernel", "linear.weight", dense)
    else:
        raise TorchCheckpointError(f"{where}: unknown model {name!r}; supported: {SUPPORTED_MODELS}")
    return _infer(name, proxy, where, input_shape, None)


# ----------------------------------------------------------------------------- conversion


def _check_floating(key: str, arr: np.ndarray, where: str) -> None:
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
        raise TorchCheckpointError(f"{where}: key {key!r} has dtype {arr.dtype.name}, expected a float dtype")


def variables_from_state_dict(
    state_dict: Mapping[str, Any],
    *,
    model: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    where: str = "<state dict>",
) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Converts a torch-layout state dict of NumPy arrays to our Flax variables (no torch needed).

    Args:
      state_dict: key -> array in torch layouts (keys without a ``module.`` prefix).
      model: "mlpnet", "vgg11" or "resnet18"; None detects it from the keys.
      input_shape: (H, W, C) of one input; None infers it (MLPNet: 784 ->
        (28, 28, 1), 3072 -> (32, 32, 3); conv nets: 32x32 with the first
        conv's channels, VGG11 larger if its classifier reads a larger map).
      num_classes: if given, checked against the last layer.
      where: how to name the source in error messages.

    Returns:
      ``(model_name, model_info, variables, counts)``: ``model_info`` is
      ``{"name", "options", "input_shape", "num_classes"}`` (``options`` for
      ``models.build``), ``variables`` ``{"params": ..., ["batch_stats": ...]}``
      as nested dicts of NumPy arrays with the file's dtypes, ``counts`` the
      BatchNorm ``num_batches_tracked`` values by torch key.

    Raises:
      TorchCheckpointError: unknown architecture, missing or unexpected keys,
        wrong shapes, non-float dtypes (the message names ``where`` and the key).
    """
    name = model if model is not None else detect_model(list(state_dict))
    if name is None:
        raise TorchCheckpointError(
            f"{where}: unknown architecture: the state dict's keys ({_preview(state_dict)}) match none of "
            f"{SUPPORTED_MODELS} as written by the original OTFusion"
        )
    if name not in SUPPORTED_MODELS:
        raise TorchCheckpointError(f"{where}: unknown model {name!r}; supported: {SUPPORTED_MODELS}")
    options, input_shape, classes = _infer(name, state_dict, where, input_shape, num_classes)
    plan = _plan(name, options, input_shape, classes)
    desc = _describe(name, options, input_shape, classes)
    want = {e.key for e in plan}
    optional = {e.key for e in plan if e.kind == "count"}
    missing = [e.key for e in plan if e.key not in state_dict and e.key not in optional]
    extra = [k for k in state_dict if k not in want]
    if missing or extra:
        raise TorchCheckpointError(
            f"{where}: state dict does not match {desc}"
            + (f"; missing keys: {_preview(missing, 5)}" if missing else "")
            + (f"; unexpected keys: {_preview(extra, 5)}" if extra else "")
        )
    flat: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for e in plan:
        if e.key not in state_dict:
            continue
        arr = np.asarray(state_dict[e.key])
        if e.kind == "count":
            if arr.shape != () or not np.issubdtype(arr.dtype, np.integer):
                raise TorchCheckpointError(
                    f"{where}: key {e.key!r} is {arr.dtype.name}{arr.shape}, expected an integer scalar"
                )
            counts[e.key] = int(arr)
            continue
        if arr.shape != e.shape:
            raise TorchCheckpointError(
                f"{where}: key {e.key!r} has shape {arr.shape}, expected {e.shape} for {desc}"
            )
        _check_floating(e.key, arr, where)
        if e.kind == "dense":
            arr = layouts.dense_from_torch(arr)
        elif e.kind == "flatten_dense":
            arr = layouts.flatten_dense_from_torch(arr, e.hw)
        elif e.kind == "conv":
            arr = layouts.conv_from_torch(arr)
        flat[e.path] = np.array(arr, order="C", copy=True)
    info = {"name": name, "options": options, "input_shape": list(input_shape), "num_classes": classes}
    return name, info, spec_lib.unflatten_paths(flat), counts


def state_dict_from_variables(
    model_name: str,
    variables: Mapping[str, Any],
    *,
    input_shape: tuple[int, int, int] | None = None,
    num_batches_tracked: Mapping[str, int] | None = None,
    where: str = "<variables>",
) -> collections.OrderedDict:
    """Converts our Flax variables to the original's state dict (NumPy arrays; no torch needed).

    Args:
      model_name: "mlpnet", "vgg11" or "resnet18".
      variables: ``{"params": ..., ["batch_stats": ...]}`` of that model.
      input_shape: (H, W, C) of one input (needed for an MLPNet on
        multi-channel images or a VGG11 on inputs larger than 32x32); None
        infers it as :func:`variables_from_state_dict` does.
      num_batches_tracked: BatchNorm counters by torch key (default 0).
      where: how to name the destination in error messages.

    Returns:
      An OrderedDict key -> NumPy array in the order of torch's ``state_dict()``
      (``num_batches_tracked`` as an int64 scalar).

    Raises:
      TorchCheckpointError: unknown model, missing or extra leaves, wrong
        shapes or non-float dtypes.
    """
    if model_name not in SUPPORTED_MODELS:
        raise TorchCheckpointError(f"{where}: unknown model {model_name!r}; supported: {SUPPORTED_MODELS}")
    flat = {p: np.asarray(jax.device_get(v)) for p, v in spec_lib.flatten_paths(dict(variables)).items()}
    options, input_shape, classes = _infer_from_variables(model_name, flat, where, input_shape)
    plan = _plan(model_name, options, input_shape, classes)
    desc = _describe(model_name, options, input_shape, classes)
    want = {e.path for e in plan if e.path is not None}
    missing = [e.path for e in plan if e.path is not None and e.path not in flat]
    extra = [p for p in flat if p not in want]
    if missing or extra:
        raise TorchCheckpointError(
            f"{where}: variables do not match {desc}"
            + (f"; missing leaves: {_preview(missing, 5)}" if missing else "")
            + (f"; unexpected leaves: {_preview(extra, 5)}" if extra else "")
        )
    counts = dict(num_batches_tracked or {})
    out: collections.OrderedDict = collections.OrderedDict()
    for e in plan:
        if e.kind == "count":
            out[e.key] = np.array(int(counts.get(e.key, 0)), np.int64)
            continue
        arr = flat[e.path]
        _check_floating(e.path, arr, where)
        expected = _flax_shape(e)
        if arr.shape != expected:
            raise TorchCheckpointError(
                f"{where}: leaf {e.path!r} has shape {arr.shape}, expected {expected} for {desc}"
            )
        if e.kind == "dense":
            arr = layouts.dense_to_torch(arr)
        elif e.kind == "flatten_dense":
            arr = layouts.flatten_dense_to_torch(arr, e.hw)
        elif e.kind == "conv":
            arr = layouts.conv_to_torch(arr)
        out[e.key] = np.array(arr, order="C", copy=True)
    return out


def _flax_shape(e: _Entry) -> tuple[int, ...]:
    """The Flax shape of a plan entry's leaf."""
    if e.kind in ("dense", "flatten_dense"):
        return e.shape[::-1]
    if e.kind == "conv":
        o, i, kh, kw = e.shape
        return (kh, kw, i, o)
    return e.shape


def _check_against_model(info: Mapping[str, Any], variables: Mapping[str, Any], where: str) -> None:
    """Checks the converted variables against the shapes our Flax model initialises (no compute)."""
    module, _ = models.build(
        info["name"],
        input_shape=tuple(info["input_shape"]),
        num_classes=info["num_classes"],
        **info["options"],
    )
    shapes = jax.eval_shape(lambda: models.init(module, jax.random.key(0), tuple(info["input_shape"])))
    want = {p: tuple(s.shape) for p, s in spec_lib.flatten_paths(shapes).items()}
    have = {p: tuple(np.shape(v)) for p, v in spec_lib.flatten_paths(variables).items()}
    if want != have:
        diff = sorted(p for p in set(want) | set(have) if want.get(p) != have.get(p))
        raise TorchCheckpointError(
            f"{where}: converted variables do not fit {info['name']}: " + ", ".join(
                f"{p}: {have.get(p)} vs model {want.get(p)}" for p in diff[:5]
            )
        )


# ----------------------------------------------------------------------------- torch I/O


def _import_torch(where: str):
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(
            f"reading or writing PyTorch checkpoints ({where}) needs torch: "
            "pip install 'otfusion-jax[torch]' (or pip install torch)"
        ) from e
    return torch


def _tensor_to_numpy(torch, key: str, value: Any, where: str) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        raise TorchCheckpointError(f"{where}: key {key!r} holds a {type(value).__name__}, not a tensor")
    t = value.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes  # pylint: disable=import-outside-toplevel

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    try:
        return t.contiguous().numpy().copy()
    except (TypeError, RuntimeError) as e:
        raise TorchCheckpointError(f"{where}: key {key!r} has dtype {t.dtype}, expected a float dtype") from e


def _numpy_to_tensor(torch, arr: np.ndarray):
    arr = np.array(arr, order="C", copy=True)  # keeps 0-d arrays 0-d (ascontiguousarray does not)
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _plain(value: Any) -> Any:
    """A weights_only-loaded value as JSON-friendly Python (tensors -> numbers/lists, Namespace -> dict)."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if hasattr(value, "detach") and hasattr(value, "tolist"):  # a torch tensor
        return value.detach().cpu().tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    try:
        return io_utils.to_jsonable(value)
    except TypeError:
        return repr(value)


def _is_scalar_like(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool, numbers.Number))


def load_torch_checkpoint(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    trusted: bool = False,
) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Reads an original-OTFusion PyTorch checkpoint and converts it to our Flax variables.

    Args:
      path: A file written by ``torch.save``: the original's dict with
        ``model_state_dict`` (``test_accuracy``, ``args``, ``epoch`` ... are
        kept in the metadata), or a bare state dict. Keys may carry the
        ``module.`` prefix of ``nn.DataParallel``.
      model: "mlpnet", "vgg11" or "resnet18"; None detects it from the keys.
      input_shape: (H, W, C) of one input; None infers it (see
        :func:`variables_from_state_dict`).
      num_classes: if given, checked against the last layer.
      trusted: load with ``weights_only=False`` (runs arbitrary pickled code:
        only for files from a trusted source whose extra entries the safe
        loader refuses). Default: ``torch.load(..., weights_only=True)``.

    Returns:
      ``(model_name, model_options, variables, metadata)``: options for
      ``models.build(model_name, input_shape=..., num_classes=..., **options)``;
      variables ``{"params": ..., ["batch_stats": ...]}`` (NumPy, the file's
      float dtypes); metadata ``{"kind": "torch_import", "source", "model":
      {"name", "options", "input_shape", "num_classes"}, ["test_accuracy"]
      (a fraction; the original writes percentages), "torch": {...}}`` where
      ``torch`` keeps what :func:`save_torch_checkpoint` needs to write the
      file back exactly. ``metadata["model"]`` is what
      ``configs_util.model_from_metadata`` reads.

    Raises:
      TorchCheckpointError: not found, not a torch file, truncated or corrupt,
        unknown architecture, missing/unexpected keys, wrong shapes or
        non-float dtypes; the message names the file (and key).
      ImportError: torch is not installed.
    """
    where = os.path.abspath(os.fspath(path))
    if not os.path.exists(where):
        raise TorchCheckpointError(f"{where}: no such file")
    if not os.path.isfile(where):
        raise TorchCheckpointError(f"{where}: not a PyTorch checkpoint (not a file)")
    if not is_torch_checkpoint(where):
        raise TorchCheckpointError(
            f"{where}: not a PyTorch checkpoint "
            "(neither torch.save's zip format nor its legacy pickle format)"
        )
    torch = _import_torch(where)
    try:
        if trusted:
            obj = torch.load(where, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(where, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
        message = " ".join(str(e).split())
        if "Unsupported global" in message:
            found = re.search(r"GLOBAL (\S+)", message)
            raise TorchCheckpointError(
                f"{where}: holds Python objects that the safe loader (weights_only=True) refuses"
                + (f" ({found.group(1)})" if found else "")
                + "; if you trust the file, pass trusted=True"
            ) from e
        raise TorchCheckpointError(
            f"{where}: truncated or corrupt PyTorch checkpoint: {type(e).__name__}: {message[:300]}"
        ) from e

    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TorchCheckpointError(
            f"{where}: holds a {type(obj).__name__}, not a checkpoint dict or state dict"
        )
    state_key = next((k for k in _STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
    if state_key is not None:
        raw_sd, top = obj[state_key], {k: v for k, v in obj.items() if k != state_key}
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raw_sd, top = obj, {}
    else:
        raise TorchCheckpointError(
            f"{where}: no state dict: expected a 'model_state_dict' entry or a bare state dict, "
            f"found entries {_preview(obj)}"
        )
    if not raw_sd:
        raise TorchCheckpointError(f"{where}: the state dict is empty")
    bad = [k for k in raw_sd if not isinstance(k, str)]
    if bad:
        raise TorchCheckpointError(f"{where}: state-dict key {bad[0]!r} is not a string")
    prefix = _PREFIX if all(k.startswith(_PREFIX) for k in raw_sd) else ""
    sd = {k[len(prefix):]: _tensor_to_numpy(torch, k, v, where) for k, v in raw_sd.items()}

    name, info, variables, counts = variables_from_state_dict(
        sd, model=model, input_shape=input_shape, num_classes=num_classes, where=where
    )
    _check_against_model(info, variables, where)

    torch_meta: dict[str, Any] = {
        "layout": "checkpoint" if state_key else "state_dict",
        "state_dict_key": state_key,
        "key_prefix": prefix,
        "num_batches_tracked": counts,
        "extra": {},
        "dropped": [],
    }
    metadata: dict[str, Any] = {"kind": "torch_import", "source": where, "model": info}
    for key, value in top.items():
        if key == "args":
            torch_meta["args"] = _plain(value)
        elif key == "test_accuracy":
            acc = _plain(value)
            torch_meta["test_accuracy"] = acc
            if isinstance(acc, numbers.Real) and not isinstance(acc, bool):
                metadata["test_accuracy"] = acc / 100.0
        elif isinstance(key, str) and (_is_scalar_like(value) or getattr(value, "ndim", None) == 0):
            torch_meta["extra"][key] = _plain(value)
        else:
            torch_meta["dropped"].append(str(key))
    metadata["torch"] = torch_meta
    return name, dict(info["options"]), variables, metadata


def save_torch_checkpoint(
    path: str | os.PathLike,
    model_name: str,
    variables: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    *,
    input_shape: tuple[int, int, int] | None = None,
) -> str:
    """Writes variables as the original OTFusion's PyTorch checkpoint (atomically).

    The file is ``torch.save({"args": ..., ["epoch": ...,] "test_accuracy":
    ..., "model_state_dict": state_dict})`` with the original's keys and
    layouts, loadable by its ``get_pretrained_model``; a file read by
    :func:`load_torch_checkpoint` is written back exactly (same keys, tensors,
    ``args``, ``test_accuracy``, BatchNorm counters, ``module.`` prefix, bare
    state dict or not). Entries the loader dropped (e.g. an optimizer state)
    are not written.

    Args:
      path: Destination file (parents are created; an existing file is replaced).
      model_name: "mlpnet", "vgg11" or "resnet18".
      variables: ``{"params": ..., ["batch_stats": ...]}`` of that model.
      metadata: the loader's metadata (its ``"torch"`` section is replayed) or
        ours (``test_accuracy`` as a fraction is written as a percentage;
        ``model`` gives ``input_shape``); None writes minimal ``args``.
      input_shape: (H, W, C); default ``metadata["model"]["input_shape"]`` or
        inferred.

    Returns:
      The absolute path written.

    Raises:
      TorchCheckpointError: the variables do not fit the model (names the file and leaf).
      ImportError: torch is not installed.
    """
    where = os.path.abspath(os.fspath(path))
    metadata = dict(metadata or {})
    torch_meta = dict(metadata.get("torch") or {})
    model_info = metadata.get("model") if isinstance(metadata.get("model"), Mapping) else {}
    if input_shape is None and model_info.get("input_shape") is not None:
        input_shape = tuple(model_info["input_shape"])
    sd_np = state_dict_from_variables(
        model_name,
        variables,
        input_shape=input_shape,
        num_batches_tracked=torch_meta.get("num_batches_tracked"),
        where=where,
    )
    torch = _import_torch(where)
    prefix = torch_meta.get("key_prefix") or ""
    sd = collections.OrderedDict((prefix + k, _numpy_to_tensor(torch, v)) for k, v in sd_np.items())

    if torch_meta.get("layout") == "state_dict":
        obj: Any = sd
    else:
        if "args" in torch_meta:
            args = torch_meta["args"]
        else:
            args = {"model_name": model_name, **io_utils.to_jsonable(dict(model_info.get("options") or {}))}
        top: dict[str, Any] = {"args": args, **dict(torch_meta.get("extra") or {})}
        if "test_accuracy" in torch_meta:
            top["test_accuracy"] = torch_meta["test_accuracy"]
        elif isinstance(metadata.get("test_accuracy"), numbers.Real) and not isinstance(
            metadata["test_accuracy"], bool
        ):
            top["test_accuracy"] = float(metadata["test_accuracy"]) * 100.0
        ordered = {k: top[k] for k in _TOP_ORDER if k in top}
        ordered.update({k: v for k, v in top.items() if k not in ordered})
        ordered[torch_meta.get("state_dict_key") or "model_state_dict"] = sd
        obj = ordered

    folder = os.path.dirname(where)
    os.makedirs(folder, exist_ok=True)
    tmp = io_utils.temp_name(where)
    try:
        torch.save(obj, tmp)
        with contextlib.suppress(OSError):
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, where)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    io_utils.fsync_dir(folder)
    return where
