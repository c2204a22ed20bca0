"""Loading the parents of a fusion run from checkpoints, with every check done before any work.

Only a checkpoint's ``model`` entry (name, options, input shape, classes) and its variables are read: the
config stored in its metadata is a record of how it was made, in whatever layout the config had then.

``fuse.py`` calls :func:`load_parents`; each problem of a checkpoint (missing or extra leaf, wrong shape
or dtype, NaN/Inf, an architecture other than parent 0's, metadata describing no model) is a
``ValueError`` whose message names the checkpoint and the leaf. :func:`check_config_matches` compares
the parents with ``config.model`` when the config is supposed to describe them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

import otfusion_jax as otf
from otfusion_jax import checkpoints, configs_util, experiment, models
from otfusion_jax import spec as spec_lib

__all__ = [
    "load_parents",
    "check_leaves_fit_model",
    "check_config_matches",
    "check_parent_matches",
    "check_model_overrides",
    "check_data_matches",
    "check_heldout_unseen",
    "describe_model",
]


def load_parents(
    paths: Sequence[str], fmt: str = "auto"
) -> tuple[list[experiment.Parent], spec_lib.AlignmentSpec, list[dict[str, Any]]]:
    """Loads and checks parent checkpoints.

    Args:
      paths: One checkpoint per parent: our orbax folders, the original OTFusion's PyTorch files (also timm and
        Hugging Face ViT state dicts), or Hugging Face ViTs' ``model.safetensors``.
      fmt: "auto" (detect PyTorch files from their content), "ours" or "torch".

    Returns:
      ``(parents, spec, metas)``: the parents (name, module, variables), their shared alignment spec,
      and per parent ``{"path", "test_accuracy_at_training", "model", "dataset", "has_batchnorm"}``
      (``dataset``: the metadata's record of the training data, None for imported files).

    Raises:
      ValueError: Naming the checkpoint (and leaf) for any problem; ``checkpoints.CheckpointError``
        for unreadable files; ImportError when a PyTorch file needs torch.
    """
    from otfusion_jax.interop import hf_vit, is_torch_checkpoint, load_torch_checkpoint  # pylint: disable=import-outside-toplevel

    parents, metas, spec = [], [], None
    for k, path in enumerate(paths):
        if fmt == "auto" and os.fspath(path).endswith(".safetensors"):  # save_pretrained's file
            _, _, variables, meta = hf_vit.load_safetensors(path)
        elif fmt == "torch" or (fmt == "auto" and is_torch_checkpoint(path)):
            _, _, variables, meta = load_torch_checkpoint(path)
        else:
            variables, meta = checkpoints.load(path)
        module, pspec = configs_util.model_from_metadata(meta)
        try:
            pspec.check_variables(variables, what=f"checkpoint {path}")
        except spec_lib.SpecError as e:
            raise ValueError(str(e)) from None
        check_leaves_fit_model(path, module, meta, variables)
        if spec is not None and {p for p, _ in pspec.leaves} != {p for p, _ in spec.leaves}:
            raise ValueError(
                f"checkpoint {path}: architecture {meta['model']['name']} {meta['model']['options']} "
                f"differs from parent 0's ({metas[0]['model']['name']} {metas[0]['model']['options']})"
            )
        spec = spec or pspec
        acc = meta.get("test_accuracy")
        parents.append(experiment.Parent(f"parent {k}" + (f" (seed {meta['seed']})" if "seed" in meta else ""), module, variables))
        metas.append(
            {
                "path": os.path.abspath(path),
                "test_accuracy_at_training": acc,
                "model": meta.get("model"),
                "dataset": meta.get("dataset"),
                "has_batchnorm": "batch_stats" in variables,
            }
        )
    return parents, spec, metas


def check_leaves_fit_model(path: str, module: Any, meta: Mapping[str, Any], variables: Mapping[str, Any]) -> None:
    """Every leaf has the shape and dtype the model of the metadata creates, and is finite.

    Raises:
      ValueError: Naming the checkpoint and the leaf.
    """
    try:
        want = jax.eval_shape(lambda: models.init(module, jax.random.key(0), tuple(meta["model"]["input_shape"])))
    except Exception as e:  # noqa: BLE001 - flax raises many types for a bad model description.
        raise ValueError(f"checkpoint {path}: its metadata describes no buildable model: {type(e).__name__}: {e}") from None
    want, have = spec_lib.flatten_paths(want), spec_lib.flatten_paths(variables)
    for leaf, w in want.items():
        h = have.get(leaf)
        if h is None:
            raise ValueError(f"checkpoint {path}: leaf {leaf} is missing (the model of its metadata has it)")
        if tuple(h.shape) != tuple(w.shape) or h.dtype != w.dtype:
            raise ValueError(
                f"checkpoint {path}: leaf {leaf} is {h.dtype}{tuple(h.shape)} but the model of its metadata "
                f"({meta['model']['name']} {meta['model']['options']}) expects {w.dtype}{tuple(w.shape)}"
            )
    extra = sorted(set(have) - set(want))
    if extra:
        raise ValueError(f"checkpoint {path}: leaf {extra[0]} is not part of the model of its metadata")
    try:
        otf.check_finite([variables])
    except otf.FusionError as e:
        raise ValueError(f"checkpoint {path}: {str(e).removeprefix('parent 0: ')}") from None


def _plain(value: Any) -> Any:
    """JSON-equal form (tuples as lists) for comparing config values with checkpoint metadata."""
    return json.loads(json.dumps(value))


def check_config_matches(config: Mapping[str, Any], metas: Sequence[Mapping[str, Any]]) -> None:
    """``config.model`` (with ``config.parent_widths``) describes every parent, as train.py made them.

    Args:
      config: The validated config (plain dicts).
      metas: The ``metas`` of :func:`load_parents`, parent k at index k.

    Raises:
      ValueError: For the first field that contradicts a checkpoint, naming both values.
    """
    for k, meta in enumerate(metas):
        check_parent_matches(config, k, meta["path"], meta.get("model"))


def check_parent_matches(config: Mapping[str, Any], k: int, path: str, model: Mapping[str, Any] | None) -> None:
    """``config.model`` (with ``config.parent_widths[k]``) describes parent k's checkpoint.

    Args:
      config: The validated config (plain dicts).
      k: The parent's index.
      path: Its checkpoint (for the message).
      model: The ``model`` entry of its metadata (``{"name", "options", ...}``).

    Raises:
      ValueError: Naming the config field, its value and the checkpoint's.
    """
    model = model or {}
    name, options = configs_util.model_options_from(config, k)
    advice = "pass the config the parents were trained with, or drop the override"
    if model.get("name") != name:
        raise configs_util.field_error(
            "model.name", config["model"]["name"],
            f"contradicts checkpoint {path} (parent {k}), a {model.get('name')!r}; {advice}",
        )
    factor = tuple(config.get("parent_widths") or ())[k : k + 1]
    theirs = model.get("options") or {}
    for key, mine in options.items():
        if key in theirs and _plain(theirs[key]) != _plain(mine):
            scaled = ""
            if key in ("widths", "width") and factor and factor[0] != 1:
                scaled = f"(x config.parent_widths[{k}]={factor[0]}: {_plain(mine)}) "
            raise configs_util.field_error(
                f"model.{key}", config["model"][key],
                f"{scaled}contradicts checkpoint {path} (parent {k}), which has {key}={_plain(theirs[key])!r}; {advice}",
            )


def check_model_overrides(config: Mapping[str, Any], keys: Sequence[str], metas: Sequence[Mapping[str, Any]]) -> None:
    """``config.model`` fields given on the command line agree with parents whose architecture is their own.

    With ``fuse.py --parents`` the checkpoints define the architecture and ``config.model`` is not used;
    a field the user set explicitly that says otherwise is a contradiction, not something to ignore.

    Args:
      config: The validated config (plain dicts).
      keys: The ``config.model`` fields overridden on the command line.
      metas: The ``metas`` of :func:`load_parents`.

    Raises:
      ValueError: Naming the field, its value and the checkpoint's.
    """
    for key in keys:
        mine = config["model"].get(key)
        for k, meta in enumerate(metas):
            model = meta.get("model") or {}
            options = model.get("options") or {}
            if key == "name":
                theirs, ok = model.get("name"), model.get("name") == mine
            elif key in options:
                theirs, ok = options[key], _plain(options[key]) == _plain(mine)
            else:
                neutral = configs_util.FIELDS[f"model.{key}"].neutral
                theirs, ok = f"no {key} option", mine == neutral
            if not ok:
                shown = theirs if isinstance(theirs, str) and key != "name" else f"{key}={_plain(theirs)!r}"
                raise configs_util.field_error(
                    f"model.{key}", mine,
                    f"given on the command line, but with --parents the architecture is the checkpoints', and "
                    f"checkpoint {meta['path']} (parent {k}, {model.get('name')}) has {shown}; drop the override",
                )


def check_data_matches(metas: Sequence[Mapping[str, Any]], dataset: Any) -> None:
    """Every parent was trained on inputs of the data set's shape and number of classes.

    Args:
      metas: The ``metas`` of :func:`load_parents`.
      dataset: The ``data.Dataset`` the run evaluates on.

    Raises:
      ValueError: Naming the checkpoint, both shapes and class counts.
    """
    for m in metas:
        model = m.get("model") or {}
        if tuple(model.get("input_shape") or ()) != tuple(dataset.input_shape) or model.get("num_classes") != dataset.num_classes:
            raise ValueError(
                f"checkpoint {m['path']}: trained on inputs {tuple(model.get('input_shape') or ())} with "
                f"{model.get('num_classes')} classes, but data {dataset.name} has {tuple(dataset.input_shape)} "
                f"with {dataset.num_classes} classes (pick the config the parents were trained with)"
            )


def check_heldout_unseen(metas: Sequence[Mapping[str, Any]], dataset: Any, data: Mapping[str, Any]) -> None:
    """With ``data.eval_split="heldout"``, no parent may have trained on the held-out images.

    Each parent's metadata must record training on the same data (name, resolved source, and for digits the
    split's seed: otherwise the "held-out" tail holds other images) and on at most ``data.max_train`` of its
    images; a parent without that record (an imported file) cannot be vouched for. All are errors.

    Args:
      metas: The ``metas`` of :func:`load_parents`.
      dataset: The loaded ``data.Dataset``.
      data: ``config.data`` (plain dict).

    Raises:
      ValueError: Naming the checkpoint and what differs.
    """
    if getattr(dataset, "eval_split", "test") != "heldout":
        return
    for m in metas:
        rec = m.get("dataset") or {}
        if rec.get("num_train") is None:
            raise ValueError(
                f"checkpoint {m['path']}: no record of how many training images it saw, so data.eval_split=heldout "
                "cannot vouch that it never saw the held-out ones; evaluate on the test set"
            )
        mine = {"name": dataset.name, "source": dataset.source}
        if dataset.name == "digits":
            mine["seed"] = data["seed"]
        for key, value in mine.items():
            if rec.get(key) != value:
                raise ValueError(
                    f"checkpoint {m['path']}: trained on data with {key}={rec.get(key)!r}, evaluated with "
                    f"{key}={value!r}: its held-out images are not these; data.eval_split=heldout needs the same data"
                )
        if int(rec["num_train"]) > int(data["max_train"]):
            raise ValueError(
                f"checkpoint {m['path']}: trained on {rec['num_train']} images, more than data.max_train="
                f"{data['max_train']}: the held-out images are part of its training set; set data.max_train to at "
                "least that many"
            )


def describe_model(model: Mapping[str, Any] | None) -> str:
    """``mlpnet bias=False widths=[128, 64, 32]`` from checkpoint metadata's ``model`` entry."""
    model = model or {}
    options = " ".join(f"{k}={v}" for k, v in sorted((model.get("options") or {}).items()))
    return f"{model.get('name')} {options}".strip()
