"""Read and write the original OTFusion's PyTorch checkpoints (MLPNet, VGG11, ResNet18).

The original (sidak/otfusion) saves ``torch.save({"args": vars(args), "epoch": ...,
"test_accuracy": <percent>, "model_state_dict": model.state_dict()}, path)``
(files such as ``model_0/final.checkpoint``). :func:`load_torch_checkpoint`
reads such a file (or a bare state dict; also a timm or Hugging Face ViT's, ``interop.timm_vit``,
``interop.hf_vit``), recognises the architecture from the
state dict's keys, infers its widths and converts the weights to our Flax
variables; :func:`save_torch_checkpoint` writes the exact inverse.

The architecture comes from the model registry: each
:class:`~otfusion_jax.models.ModelRecord` with a ``torch`` layout
(:class:`~otfusion_jax.models.TorchLayout`) says which state dicts are its own,
every key with the Flax leaf it becomes (e.g. MLPNet ``fc{i}.weight`` (out, in)
-> ``params/fc{i}/kernel`` (in, out); the key correspondence of each model is in
its module's docstring: ``otfusion_jax/models/mlp.py``, ``vgg.py``,
``resnet.py``), and how to read its options back from the shapes. BatchNorm:
``weight`` -> ``params/.../scale``, ``bias`` -> ``params/.../bias``,
``running_mean`` / ``running_var`` -> ``batch_stats/.../mean`` / ``var``;
``num_batches_tracked`` is kept only in the metadata (for the round trip).
This module holds no model-specific code.

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
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from otfusion_jax import io_utils, models
from otfusion_jax import spec as spec_lib
from otfusion_jax.interop import hf_vit, layouts, timm_vit
from otfusion_jax.models import torch_layout as tl

__all__ = [
    "TorchCheckpointError",
    "supported_models",
    "is_torch_checkpoint",
    "detect_model",
    "load_torch_checkpoint",
    "save_torch_checkpoint",
    "variables_from_state_dict",
    "state_dict_from_variables",
]

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
    """The registered architecture a state dict's keys belong to (its layout's ``detect``), or None.

    Args:
      keys: State-dict keys (without a ``module.`` prefix).

    Returns:
      A name in :func:`supported_models`, e.g. "mlpnet" (only
      ``fc{i}.weight|bias``), "vgg11" (``features.*`` and
      ``classifier.weight``), "resnet18" (``conv1.weight``, ``layer1.*`` and
      ``linear.weight``), or None.
    """
    keys = frozenset(keys)
    return next((name for name, layout in _layouts().items() if layout.detect(keys)), None)


def supported_models() -> tuple[str, ...]:
    """The registered models that have a PyTorch layout (``models.get(name).torch``)."""
    return tuple(_layouts())


def __getattr__(name: str) -> Any:
    """``SUPPORTED_MODELS``, the former constant, now :func:`supported_models` (it follows the registry)."""
    if name == "SUPPORTED_MODELS":
        return supported_models()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _layouts() -> dict[str, models.TorchLayout]:
    return {r.name: r.torch for r in models.records() if r.torch is not None}


def _record(name: str, where: str) -> models.ModelRecord:
    """The record of a model with a torch layout."""
    layouts_ = _layouts()
    if name not in layouts_:
        raise TorchCheckpointError(f"{where}: unknown model {name!r}; supported: {tuple(layouts_)}")
    return models.get(name)


# ----------------------------------------------------------------------------- inference (the record's layout)


def _describe(record: models.ModelRecord, options: Any, input_shape, num_classes) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in sorted(record.options_dict(options).items()))
    return f"{record.name}({opts}; input {tuple(input_shape)}, {num_classes} classes)"


def _input_shape(input_shape, where: str) -> tuple[int, int, int]:
    shape = tuple(int(x) for x in input_shape)
    if len(shape) != 3:
        raise TorchCheckpointError(f"{where}: input_shape must be (H, W, C), got {shape}")
    return shape


def _infer(
    record: models.ModelRecord, shapes: Mapping[str, tuple[int, ...]], where: str, input_shape, num_classes
) -> tuple[Any, tuple[int, int, int], int]:
    """Options, input shape and class count implied by a state dict's torch shapes (the layout's ``infer``)."""
    if input_shape is not None:
        input_shape = _input_shape(input_shape, where)
    try:
        options, input_shape, classes = record.torch.infer(shapes, input_shape)
    except tl.LayoutError as e:
        raise TorchCheckpointError(f"{where}: {e}") from None
    input_shape = _input_shape(input_shape, where)
    if num_classes is not None and int(num_classes) != classes:
        raise TorchCheckpointError(
            f"{where}: the last layer has {classes} outputs but num_classes={num_classes} was asked for"
        )
    return options, input_shape, int(classes)


def _infer_from_variables(
    record: models.ModelRecord, flat: Mapping[str, Any], where: str, input_shape
) -> tuple[Any, tuple[int, int, int], int]:
    """Like :func:`_infer`, from Flax variables (via the torch shapes of the leaves the layout reads)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, key, required in record.torch.reads(list(flat)):
        if path in flat:
            shapes[key] = tl.torch_shape(np.shape(flat[path]))
        elif required:
            raise TorchCheckpointError(f"{where}: variables do not match {record.name}; missing leaves: {path}")
    return _infer(record, shapes, where, input_shape, None)


# ----------------------------------------------------------------------------- conversion


def _check_floating(key: str, arr: np.ndarray, where: str) -> None:
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
        raise TorchCheckpointError(f"{where}: key {key!r} has dtype {arr.dtype.name}, expected a float dtype")


# entry kind -> (Flax -> torch, torch -> Flax); "vector" entries keep their layout.
_CONVERT = {
    "dense": (layouts.dense_to_torch, layouts.dense_from_torch),
    "conv": (layouts.conv_to_torch, layouts.conv_from_torch),
    "flatten_dense": (layouts.flatten_dense_to_torch, layouts.flatten_dense_from_torch),
}


def _convert(e: tl.TorchEntry, arr: np.ndarray, to_torch: bool) -> np.ndarray:
    pair = _CONVERT.get(e.kind)
    if pair is None:
        return arr
    fn = pair[0 if to_torch else 1]
    return fn(arr, e.hw) if e.kind == "flatten_dense" else fn(arr)


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
      model: a registered model with a torch layout ("mlpnet", "vgg11",
        "resnet18"); None detects it from the keys.
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
            f"{where}: unknown architecture: the state dict's keys ({tl.preview(state_dict)}) match none of "
            f"{supported_models()} as written by the original OTFusion"
        )
    record = _record(name, where)
    shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    options, input_shape, classes = _infer(record, shapes, where, input_shape, num_classes)
    plan = record.torch.entries(options, input_shape, classes)
    desc = _describe(record, options, input_shape, classes)
    want = {e.key for e in plan}
    optional = {e.key for e in plan if e.kind == "count"}
    missing = [e.key for e in plan if e.key not in state_dict and e.key not in optional]
    extra = [k for k in state_dict if k not in want]
    if missing or extra:
        raise TorchCheckpointError(
            f"{where}: state dict does not match {desc}"
            + (f"; missing keys: {tl.preview(missing, 5)}" if missing else "")
            + (f"; unexpected keys: {tl.preview(extra, 5)}" if extra else "")
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
        flat[e.path] = np.array(_convert(e, arr, to_torch=False), order="C", copy=True)
    info = {
        "name": name,
        "options": record.options_dict(options),
        "input_shape": list(input_shape),
        "num_classes": classes,
    }
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
      model_name: a registered model with a torch layout ("mlpnet", "vgg11", "resnet18").
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
    record = _record(model_name, where)
    flat = {p: np.asarray(jax.device_get(v)) for p, v in spec_lib.flatten_paths(dict(variables)).items()}
    options, input_shape, classes = _infer_from_variables(record, flat, where, input_shape)
    plan = record.torch.entries(options, input_shape, classes)
    desc = _describe(record, options, input_shape, classes)
    want = {e.path for e in plan if e.path is not None}
    missing = [e.path for e in plan if e.path is not None and e.path not in flat]
    extra = [p for p in flat if p not in want]
    if missing or extra:
        raise TorchCheckpointError(
            f"{where}: variables do not match {desc}"
            + (f"; missing leaves: {tl.preview(missing, 5)}" if missing else "")
            + (f"; unexpected leaves: {tl.preview(extra, 5)}" if extra else "")
        )
    counts = dict(num_batches_tracked or {})
    out: collections.OrderedDict = collections.OrderedDict()
    for e in plan:
        if e.kind == "count":
            out[e.key] = np.array(int(counts.get(e.key, 0)), np.int64)
            continue
        arr = flat[e.path]
        _check_floating(e.path, arr, where)
        expected = tl.flax_shape(e)
        if arr.shape != expected:
            raise TorchCheckpointError(
                f"{where}: leaf {e.path!r} has shape {arr.shape}, expected {expected} for {desc}"
            )
        out[e.key] = np.array(_convert(e, arr, to_torch=True), order="C", copy=True)
    return out


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
      model: a model with a torch layout ("mlpnet", "vgg11", "resnet18"); None detects it from the keys.
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
            f"found entries {tl.preview(obj)}"
        )
    if not raw_sd:
        raise TorchCheckpointError(f"{where}: the state dict is empty")
    bad = [k for k in raw_sd if not isinstance(k, str)]
    if bad:
        raise TorchCheckpointError(f"{where}: state-dict key {bad[0]!r} is not a string")
    prefix = _PREFIX if all(k.startswith(_PREFIX) for k in raw_sd) else ""
    sd = {k[len(prefix):]: _tensor_to_numpy(torch, k, v, where) for k, v in raw_sd.items()}

    if model in (None, "vit") and (timm_vit.is_timm_vit(sd) or hf_vit.is_hf_vit(sd)):
        return _load_vit(sd, top, where, state_key, prefix, input_shape, num_classes)
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


def _hf_config(where: str, top: Mapping[str, Any]) -> dict[str, Any]:
    """A Hugging Face ViT's ``num_heads``, ``layer_norm_eps``, ``hidden_act``: entries of the file, else the
    ``config.json`` next to it (``hf_vit.read_config``), else Hugging Face's defaults."""
    found = dict(hf_vit.read_config(where))
    for key in ("num_heads", "layer_norm_eps", "hidden_act"):
        if key in top:
            found[key] = _plain(top[key])
    return found


def _load_vit(sd, top, where, state_key, prefix, input_shape, num_classes):
    """A timm or Hugging Face ViT state dict (``interop.timm_vit``, ``interop.hf_vit``).

    The heads: the file's ``num_heads`` entry, else (Hugging Face) the ``config.json`` beside the file, else
    ``timm_vit.TIMM_HEADS`` of the width; Hugging Face's ``layer_norm_eps`` likewise (default 1e-12).
    """
    hf = hf_vit.is_hf_vit(sd)
    try:
        if hf:
            options, shape, classes, variables = hf_vit.from_config(sd, _hf_config(where, top), where)
        else:
            heads = top.get("num_heads")
            options, shape, classes, variables = timm_vit.vit_from_timm(
                sd, num_heads=None if heads is None else int(_plain(heads)), where=where
            )
    except (timm_vit.TimmLayoutError, hf_vit.HfLayoutError) as e:
        raise TorchCheckpointError(str(e)) from None
    if input_shape is not None and tuple(input_shape) != shape:
        raise TorchCheckpointError(f"{where}: the ViT reads {shape} images (patch grid x patch size), not {tuple(input_shape)}")
    if num_classes is not None and num_classes != classes:
        raise TorchCheckpointError(f"{where}: the head has {classes} classes, not {num_classes}")
    info = {"name": "vit", "options": dataclasses.asdict(options), "input_shape": list(shape), "num_classes": classes}
    torch_meta = {"layout": "hf" if hf else "timm", "state_dict_key": state_key, "key_prefix": prefix,
                  "extra": {k: _plain(v) for k, v in top.items() if _is_scalar_like(v)}}
    metadata = {"kind": "torch_import", "source": where, "model": info, "torch": torch_meta}
    return "vit", dict(info["options"]), variables, metadata


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
      model_name: a model with a torch layout ("mlpnet", "vgg11", "resnet18").
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
