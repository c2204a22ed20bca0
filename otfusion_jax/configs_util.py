"""Glue between experiment configs (``configs/*.py``) and the library.

The library takes plain arguments and frozen dataclasses; this module turns a
config (an ``ml_collections.ConfigDict`` or the equivalent nested dict) into
them, so that ``train.py`` and ``fuse.py`` stay thin. Config layout, one section per concern::

    seed, num_parents, workdir, parents_dir, parent_widths
    model:      name, bias, norm, width, widths (each model takes its record's options)
    data:       name, source, data_dir, pad_to, max_train, max_test, seed
    train:      the TrainConfig fields except seed (parent k uses seed + k)
    fusion:     OTFusion's options: exactly the FusionConfig fields except mode (the method picks it)
    matching:   weight matching's options (WeightMatching fields; backend: fusion.exact_backend) and its seed
    experiment: the driver's options (ExperimentConfig: methods, groups, REPAIR, fine-tuning, plots, ...)

:func:`validate` checks every field against :data:`FIELDS` (one rule per field: type,
range or choices, meaning) and the combinations between fields, before any work;
:func:`settings_from` gives the typed ``experiment.Settings`` of a config.
Checkpoints keep the config they were made with as a record only: nothing here reads it back.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn

from otfusion_jax import data as data_lib
from otfusion_jax import cca, experiment, fusion, matching, models, ot, refit
from otfusion_jax import spec as spec_lib
from otfusion_jax import training

__all__ = [
    "SCHEMA",
    "MODEL_OPTIONS",
    "to_dict",
    "FIELDS",
    "Field",
    "validate",
    "field_error",
    "FUSION_FIELDS",
    "MATCHING_FIELDS",
    "EXPERIMENT_FIELDS",
    "fusion_groups",
    "check_options_for_model",
    "train_config_from",
    "fusion_config_from",
    "matching_from",
    "experiment_config_from",
    "settings_from",
    "model_options_from",
    "model_from",
    "model_from_metadata",
    "data_kwargs_from",
    "load_data",
    "parent_seed",
    "parent_dir",
    "parents_dir",
]

# config.train: the parents' recipe, every TrainConfig field but the seed (config.seed + k) and distillation
# (a fine-tune's: config.experiment.finetune_distill / finetune_temperature).
_TRAIN_FIELDS = tuple(
    f.name for f in dataclasses.fields(training.TrainConfig) if f.name not in ("seed", "distill", "distill_temperature")
)
# config.fusion: every FusionConfig field but mode (ot-weights / ot-acts pick it), read from the dataclass.
FUSION_FIELDS = tuple(f.name for f in dataclasses.fields(fusion.FusionConfig) if f.name != "mode")
# config.matching: weight matching's own seed, then the WeightMatching fields worth a command-line flag. Not
# configured: soft (wm-soft picks it), backend (config.fusion.exact_backend: one exact solver for every method),
# roles (which leaves enter the objective: a property of the method, not of a run).
MATCHING_FIELDS = (
    "seed",
    "restarts",
    "start",
    "max_sweeps",
    "tol",
    "epsilon",
    "soft_tol",
    "sinkhorn_threshold",
    "sinkhorn_max_iterations",
    "align_output",
)
# config.cca: CCA Merge's fields, read from the dataclass.
CCA_FIELDS = tuple(f.name for f in dataclasses.fields(cca.CCAMerge))
# config.refit: the least-squares refit's fields, read from the dataclass.
REFIT_FIELDS = tuple(f.name for f in dataclasses.fields(refit.RefitConfig))
# config.experiment: the ExperimentConfig fields, read from the dataclass.
EXPERIMENT_FIELDS = tuple(f.name for f in dataclasses.fields(experiment.ExperimentConfig))

# Allowed keys of each section (None: the top level).
SCHEMA: dict[str | None, tuple[str, ...]] = {
    None: (
        "seed", "num_parents", "workdir", "parents_dir", "parent_widths",
        "model", "data", "train", "fusion", "matching", "cca", "refit", "experiment",
    ),
    "model": ("name", "bias", "norm", "width", "widths", "depth", "embed_dim", "num_heads", "mlp_dim", "patch_size", "layer_norm_eps"),
    "data": ("name", "source", "data_dir", "pad_to", "max_train", "max_test", "seed", "eval_split"),
    "train": _TRAIN_FIELDS,
    "fusion": FUSION_FIELDS,
    "matching": MATCHING_FIELDS,
    "cca": CCA_FIELDS,
    "refit": REFIT_FIELDS,
    "experiment": EXPERIMENT_FIELDS,
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


_UNSET = object()


@dataclasses.dataclass(frozen=True)
class Field:
    """The rule of one config field: its type, its allowed values and what it is (a row of :data:`FIELDS`).

    Attributes:
      kind: "int", "float" (finite), "bool", "str" or "tuple".
      what: what the field is, in a few words.
      low: smallest allowed number (the value's, or each tuple item's); None: no bound.
      high: largest allowed number; None: no bound.
      low_open: ``low`` itself is not allowed.
      high_open: ``high`` itself is not allowed.
      choices: the allowed values, or a callable returning them (read from the library when checked).
      optional: None is allowed; on the command line the text ``None`` sets an optional text field to None.
      nonempty: text: the empty string is not allowed.
      item: tuples: the kind of every item ("int", "float", "str" or "group", a comma list of parent indices).
      min_len: tuples: the fewest items.
      increasing: tuples: the items are strictly increasing.
      neutral: model fields: the value a model that does not take the field must keep (unset: any value).
      check: for a value of the right type and range, a callable raising ValueError with what is wrong.
    """

    kind: str
    what: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    optional: bool = False
    nonempty: bool = False
    item: str | None = None
    min_len: int = 0
    increasing: bool = False
    neutral: Any = _UNSET
    check: Callable[[Any], None] | None = None

    def allowed(self) -> str:
        """The allowed values in words, e.g. ``"an integer >= 1"`` or ``"None or one of 'l1', 'l2'"``."""
        if self.choices is not None:
            base = "one of " + ", ".join(repr(c) for c in self.choice_values())
        elif self.kind == "bool":
            base = "True or False"
        elif self.kind == "str":
            base = "a non-empty text" if self.nonempty else "a text"
        elif self.kind == "tuple":
            items = {
                "int": "integers",
                "float": "numbers",
                "str": "texts",
                "group": 'comma lists of >= 2 distinct parent indices ("0,1")',
            }[self.item]
            bound = self._bounds()
            order = "strictly increasing " if self.increasing else ""
            size = f"a tuple of >= {self.min_len} " if self.min_len > 1 else ("a non-empty tuple of " if self.min_len else "a tuple of ")
            base = f"{size}{order}{items}{' ' + bound if bound else ''}"
        else:
            bound = self._bounds()
            base = ("an integer" if self.kind == "int" else "a finite number") + (f" {bound}" if bound else "")
        return f"None or {base}" if self.optional else base

    def choice_values(self) -> tuple[Any, ...]:
        """The allowed values of a choice field."""
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def _bounds(self) -> str:
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f"in {'(' if self.low_open else '['}{lo:g}, {hi:g}{')' if self.high_open else ']'}"
        if lo is not None:
            return f"{'>' if self.low_open else '>='} {lo:g}"
        if hi is not None:
            return f"{'<' if self.high_open else '<='} {hi:g}"
        return ""

    def _number_ok(self, value: Any, kind: str) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if kind == "int" else numbers.Real):
            return False
        if kind == "float" and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def error(self, value: Any) -> str | None:
        """What is wrong with ``value`` (``"must be ..."``), or None if it is allowed."""
        if value is None:
            return None if self.optional else f"must be {self.allowed()}"
        if self.choices is not None:
            ok = isinstance(value, str) and value in self.choice_values()
        elif self.kind == "bool":
            ok = isinstance(value, bool)
        elif self.kind == "str":
            ok = isinstance(value, str) and not (self.nonempty and not value)
        elif self.kind == "tuple":
            ok = isinstance(value, (tuple, list)) and len(value) >= self.min_len and all(self._item_ok(v) for v in value)
            if ok and self.increasing:
                ok = all(a < b for a, b in zip(value, value[1:]))
        else:
            ok = self._number_ok(value, self.kind)
        if not ok:
            return f"must be {self.allowed()}"
        if self.check is not None:
            try:
                self.check(value)
            except ValueError as e:
                return str(e)
        return None

    def _item_ok(self, value: Any) -> bool:
        if self.item == "str":
            return isinstance(value, str)
        if self.item == "group":
            try:
                _parse_group(value)
            except ValueError:
                return False
            return True
        return self._number_ok(value, self.item)


def _parse_group(group: Any) -> list[int]:
    """``"0,1"`` (or a sequence of ints) -> [0, 1]; ValueError unless >= 2 distinct indices >= 0."""
    if isinstance(group, str):
        try:
            idx = [int(i) for i in group.split(",")]
        except ValueError:
            raise ValueError(f"{group!r} is not a comma list of parent indices") from None
    elif isinstance(group, (tuple, list)) and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in group):
        idx = [int(i) for i in group]
    else:
        raise ValueError(f"{group!r} is not a comma list of parent indices")
    if len(idx) < 2 or len(set(idx)) != len(idx) or min(idx) < 0:
        raise ValueError(f"{group!r} needs >= 2 distinct parent indices >= 0")
    return idx


def _check_methods(method: str) -> None:
    experiment.parse_methods(method)  # raises ValueError("experiment.method: unknown ...")


def _data_sources() -> dict[str, tuple[str, ...]]:
    """Data set name -> the sources ``data.load`` offers for it (besides "auto")."""
    return dict(data_lib._SOURCES)  # noqa: SLF001 - TODO: a public data.SOURCES


def _int(what: str, low: int | None = None, **kw: Any) -> Field:
    return Field("int", what, low=low, **kw)


def _float(what: str, low: float | None = None, high: float | None = None, **kw: Any) -> Field:
    return Field("float", what, low=low, high=high, **kw)


def _bool(what: str, **kw: Any) -> Field:
    return Field("bool", what, **kw)


def _choice(what: str, choices: Sequence[Any] | Callable[[], Sequence[Any]], **kw: Any) -> Field:
    return Field("str", what, choices=choices, **kw)


def _path(what: str, **kw: Any) -> Field:
    return Field("str", what, nonempty=True, **kw)


# One rule per field of configs/default.py, by dotted path under ``config``. Choices are read from the
# library when checked (fusion.EXACT_BACKENDS, ot.METRICS, ...); the fields whose choices only their
# dataclass knows (fusion.solver, relative_epsilon, importance; matching.start) are text here and checked
# by building the dataclasses at the end of validate(), as are TrainConfig's own checks.
FIELDS: dict[str, Field] = {
    "seed": _int("parent k's seed is seed + k", 0),
    "num_parents": _int("number of parents trained (and fused)", 1),
    "workdir": _path("parents and results folder"),
    "parents_dir": _path("where the parents are (None: <workdir>/parents)", optional=True),
    "parent_widths": Field("tuple", "width factor of parent k", item="float", low=0, low_open=True),
    "model.name": _choice("registered model", models.available),
    "model.bias": _bool("biases in every layer"),
    "model.norm": _bool("BatchNorm after each conv", neutral=False),
    "model.width": _float("channel multiplier", 0, low_open=True, neutral=1.0),
    "model.widths": Field("tuple", "hidden layer widths", item="int", low=1, min_len=1),
    "model.depth": _int("transformer blocks (vit)", 1),
    "model.embed_dim": _int("embedding width (vit)", 1),
    "model.num_heads": _int("attention heads (vit)", 1),
    "model.mlp_dim": _int("MLP hidden width (vit)", 1),
    "model.patch_size": _int("patch size (vit)", 1),
    "model.layer_norm_eps": _float("LayerNorm epsilon (vit)", 0, low_open=True),
    "data.name": _choice("data set", lambda: tuple(_data_sources())),
    "data.source": _choice(
        "where the data comes from", lambda: ("auto", *sorted({s for v in _data_sources().values() for s in v}))
    ),
    "data.data_dir": _path("IDX folder or TFDS data dir", optional=True),
    "data.pad_to": _int("zero-pad images to pad_to x pad_to", 1, optional=True),
    "data.max_train": _int("train examples kept", 1, optional=True),
    "data.max_test": _int("test examples kept", 1, optional=True),
    "data.seed": _int("train/test split of digits", 0),
    "data.eval_split": _choice("evaluate on the test set or the held-out training images", data_lib.EVAL_SPLITS),
    "train.epochs": _int("passes over the training set", 0),
    "train.batch_size": _int("examples per SGD step", 1),
    "train.lr": _float("base learning rate", 0, low_open=True),
    "train.momentum": _float("heavy-ball momentum", 0, 1, high_open=True),
    "train.nesterov": _bool("Nesterov momentum (needs momentum > 0)"),
    "train.weight_decay": _float("coupled L2", 0),
    "train.schedule": _choice("learning rate schedule", lambda: training.SCHEDULES),
    "train.step_every": _int('"step": epochs between decays', 1),
    "train.gamma": _float("lr multiplier at each decay", 0, 1, low_open=True),
    "train.milestones": Field("tuple", '"multistep": decay epochs', item="int", low=1, increasing=True),
    "train.label_smoothing": _float("label smoothing", 0, 1, high_open=True),
    "train.drop_remainder": _bool("drop each epoch's last partial batch"),
    "train.eval_batch_size": _int("batch size of the test evaluation", 1),
    "train.optimizer": _choice("optimiser", lambda: training.OPTIMIZERS),
    "train.warmup_epochs": _float("linear warm-up epochs", 0),
    "train.augment": _choice("training-image augmentation", lambda: training.AUGMENTATIONS),
    "fusion.solver": Field("str", "OT solver (choices: FusionConfig)"),
    "fusion.exact_backend": _choice("exact assignment solver (every method)", lambda: fusion.EXACT_BACKENDS),
    "fusion.auction_bidders": _int("auction: rows bidding per round", 1, optional=True),
    "fusion.ground_metric": _choice("ground metric", lambda: ot.METRICS),
    "fusion.squared": _bool("squared euclidean"),
    "fusion.normalize_cost": _choice("cost normalisation", lambda: ot.COST_NORMS),
    "fusion.unit_norm_rows": _bool("weight mode: unit-norm rows"),
    "fusion.bias_in_cost": _bool("weight mode: biases in the cost"),
    "fusion.epsilon": _float("Sinkhorn regularisation", 0, low_open=True),
    "fusion.relative_epsilon": Field("str", "epsilon relative to the cost (choices: FusionConfig)", optional=True),
    "fusion.sinkhorn_threshold": _float("Sinkhorn stopping threshold", 0, low_open=True),
    "fusion.sinkhorn_max_iterations": _int("Sinkhorn iteration cap", 1),
    "fusion.implicit_diff": _bool("implicit differentiation"),
    "fusion.tau": _float("unbalanced Sinkhorn relaxation", 0, 1, low_open=True),
    "fusion.correction": _bool("barycentric correction"),
    "fusion.proper_marginals": _bool("correction by actual column sums"),
    "fusion.past_correction": _bool("fuse input-aligned weights"),
    "fusion.importance": Field("str", "importance marginals (choices: FusionConfig)", optional=True),
    "fusion.align_output": _bool("a plan for the class layer"),
    "fusion.symmetry": _choice("transformers: permutation or orthogonal stream/head plans", lambda: fusion.SYMMETRIES),
    "fusion.stream_policy": _choice(
        "transformers: one residual-stream plan, or transformer-fusion's per-sum mean rule", lambda: fusion.STREAM_POLICIES
    ),
    "matching.seed": _int("weight matching's key (the sweep orders of its restarts)", 0),
    "matching.restarts": _int("descents from as many sweep orders; the best objective wins", 1),
    "matching.start": Field("str", "starting plans (choices: WeightMatching)"),
    "matching.max_sweeps": _int("coordinate-descent sweeps at most", 0),
    "matching.tol": _float("relative gain a new permutation must bring", 0),
    "matching.epsilon": _float("wm-soft: Sinkhorn regularisation", 0, low_open=True),
    "matching.soft_tol": _float("wm-soft: entry change that counts as a change", 0),
    "matching.sinkhorn_threshold": _float("wm-soft: Sinkhorn stopping threshold", 0, low_open=True),
    "matching.sinkhorn_max_iterations": _int("wm-soft: Sinkhorn iteration cap", 1),
    "matching.align_output": _bool("also match the class layer"),
    "experiment.method": Field("str", "comma list of fusion methods", check=_check_methods),
    "cca.regularization": _float("CCA Merge: covariance shrinkage in [0, 1]", 0, high=1.0),
    "cca.acts_kind": _choice("CCA Merge: activations before or after the ReLU", lambda: tuple(models.ACT_COLLECTIONS)),
    "cca.num_samples": _int("CCA Merge: training inputs its activations are captured on (None: experiment's)", 1, optional=True),
    "refit.ridge": _float("least-squares refit: ridge, a fraction of the mean eigenvalue of A^T A", 0),
    "refit.num_samples": _int("least-squares refit: training inputs the regressions are fitted on", 1),
    "refit.batch_size": _int("least-squares refit: samples per pass (memory only)", 1),
    "experiment.repair": _bool("also REPAIR each fused model"),
    "experiment.repair_output": _bool("REPAIR the logits too"),
    "experiment.refit": _bool("also refit each fused model by least squares (config.refit)"),
    "experiment.learn_steps": _int('"learned": Adam steps', 1),
    "experiment.learn_weights": _bool('"learned": also fit mixing weights'),
    "experiment.num_samples": _int("training samples for activations / BatchNorm / REPAIR", 1),
    "experiment.acts_kind": _choice("activations before or after the ReLU", lambda: tuple(models.ACT_COLLECTIONS)),
    "experiment.sample_seed": _int("which training samples", 0),
    "experiment.bn_stats": _choice("BatchNorm statistics after fusion", lambda: experiment.BN_STATS),
    "experiment.groups": Field("tuple", "tables to make", item="group"),
    "experiment.finetune_epochs": _int("fine-tuning epochs of each fused model", 0),
    "experiment.finetune_lr": _float("fine-tuning lr (None: config.train.lr)", 0, low_open=True, optional=True),
    "experiment.finetune_distill": _float("fine-tuning: weight of distillation from the parents", 0, 1),
    "experiment.finetune_temperature": _float("fine-tuning: distillation temperature", 0, low_open=True),
    "experiment.plots": _bool("PNG plots next to results.json"),
    "experiment.weights": Field("tuple", "per-parent averaging weights", item="float", low=0, optional=True),
    "experiment.ensemble_step": _float("2 parents: the target's weight", 0, 1, optional=True),
    "experiment.target": _int("index of the target parent in each group"),
    "experiment.many_method": Field("str", 'method added to tables of > 2 parents ("": none)', check=lambda m: m and experiment.parse_methods(m, "experiment.many_method")),
    "experiment.barycenter_iterations": _int("iterative barycentre: at most this many rounds", 1),
    "experiment.wm_rank": _choice("how weight matching ranks its restarts", lambda: experiment.WM_RANKS),
    "experiment.rank_samples": _int("training images ranking weight matching's restarts", 1),
}


def field_error(path: str, value: Any, problem: str) -> ValueError:
    """``ValueError("config.<path>=<value>: <problem>")``, the one-line error of a bad field."""
    if problem.startswith(path):  # the library already names the field ("experiment.method: unknown ...")
        return ValueError(f"config.{problem}")
    return ValueError(f"config.{path}={value!r}: {problem}")


def _get(cfg: Mapping[str, Any], path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = node[part]
    return node


def _set(cfg: dict[str, Any], path: str, value: Any) -> None:
    *head, last = path.split(".")
    node = cfg
    for part in head:
        node = node[part]
    node[last] = value


def fusion_groups(groups: Sequence[Any], num_parents: int) -> list[list[int]]:
    """The parent index lists of ``config.experiment.groups`` (``()``: one table with every parent).

    Args:
      groups: The groups, e.g. ``("0,1", "0,1,2,3")`` (comma lists, or sequences of indices).
      num_parents: How many parents there are.

    Returns:
      One list of parent indices per table.

    Raises:
      ValueError: For a group that is not >= 2 distinct indices in ``0..num_parents - 1``.
    """
    groups = tuple(groups or ())
    if not groups:
        return [list(range(num_parents))]
    out = []
    for g in groups:
        try:
            idx = _parse_group(g)
        except ValueError as e:
            raise field_error("experiment.groups", groups, str(e)) from None
        if max(idx) >= num_parents:
            raise field_error(
                "experiment.groups", groups, f"{g!r} needs >= 2 parent indices in 0..{num_parents - 1} ({num_parents} parents)"
            )
        out.append(idx)
    return out


def check_options_for_model(config: Any, name: str, has_batchnorm: bool, where: str) -> None:
    """The options that depend on the model: BatchNorm statistics only for models with BatchNorm, the per-sum
    stream policy only for models whose spec declares residual streams (transformers).

    Args:
      config: The experiment config (its ``experiment.bn_stats``).
      name: The model's name (for the message).
      has_batchnorm: Whether the model has BatchNorm layers.
      where: Where the model comes from, e.g. ``"config.model"`` or a checkpoint path.

    Raises:
      ValueError: Naming the field, the model and the allowed value.
    """
    cfg = to_dict(config)
    if cfg["experiment"]["bn_stats"] == "recompute" and not has_batchnorm:
        raise field_error(
            "experiment.bn_stats", "recompute", f"the model ({name}, from {where}) has no BatchNorm; allowed: 'align'"
        )
    if cfg["fusion"]["stream_policy"] != "shared" and not _has_streams(name):
        raise field_error(
            "fusion.stream_policy", cfg["fusion"]["stream_policy"],
            f"the model ({name}, from {where}) declares no residual-stream sums (only transformers do); allowed: 'shared'",
        )


def _has_streams(name: str) -> bool:
    """Whether model ``name``'s spec declares residual-stream sums (``spec.streams``), from its default options."""
    record = models.get(name)
    return bool(record.spec(record.make_options(), record.example_input_shape).streams)


def _has_batchnorm(name: str, options: Mapping[str, Any]) -> bool:
    """Whether model ``name`` built with ``options`` has BatchNorm layers (its registry record says)."""
    record = models.get(name)
    return bool(record.has_batchnorm(record.make_options(**options)))


def _check_combinations(cfg: dict[str, Any], num_parents: int, model_from_config: bool) -> None:
    """Checks between fields (each field alone is already valid)."""
    train, exp, data = cfg["train"], cfg["experiment"], cfg["data"]
    if train["nesterov"] and train["momentum"] == 0:
        raise field_error("train.nesterov", True, "needs config.train.momentum > 0")
    if len(cfg["parent_widths"]) > cfg["num_parents"]:
        raise field_error(
            "parent_widths", tuple(cfg["parent_widths"]),
            f"has {len(cfg['parent_widths'])} entries for config.num_parents={cfg['num_parents']} parents",
        )
    offered = ("auto", *_data_sources()[data["name"]])
    if data["source"] not in offered:
        raise field_error("data.source", data["source"], f"data set {data['name']!r} is offered by {', '.join(map(repr, offered))}")
    if data["eval_split"] == "heldout" and data["max_train"] is None:
        raise field_error("data.eval_split", "heldout", "evaluates on the training images after data.max_train: set it")
    name, options = model_options_from(cfg)
    for key in SCHEMA["model"]:
        rule = FIELDS[f"model.{key}"]
        if key == "name" or key in options or rule.neutral is _UNSET or cfg["model"][key] == rule.neutral:
            continue
        raise field_error(
            f"model.{key}", cfg["model"][key],
            f"{name} does not take {key} (its options: {', '.join(sorted(options)) or 'none'}); must be {rule.neutral!r}",
        )
    if model_from_config:
        check_options_for_model(cfg, name, _has_batchnorm(name, options), "config.model")
    groups = fusion_groups(exp["groups"], num_parents)
    sizes = sorted({len(g) for g in groups})
    weights = exp["weights"]
    if weights:
        if any(len(weights) != n for n in sizes):
            raise field_error(
                "experiment.weights", tuple(weights),
                f"has {len(weights)} entries, but the tables fuse {' and '.join(map(str, sizes))} parents",
            )
        if not sum(weights) > 0:
            raise field_error("experiment.weights", tuple(weights), "needs a positive sum")
    if exp["ensemble_step"] is not None and sizes != [2]:
        raise field_error(
            "experiment.ensemble_step", exp["ensemble_step"],
            f"is for tables of 2 parents, but they fuse {' and '.join(map(str, sizes))}; use config.experiment.weights",
        )
    if not -sizes[0] <= exp["target"] < sizes[0]:
        raise field_error(
            "experiment.target", exp["target"], f"must be in -{sizes[0]}..{sizes[0] - 1} (tables of {sizes[0]} parents)"
        )


def validate(config: Any, *, num_parents: int | None = None, model_from_config: bool = True) -> dict[str, Any]:
    """Checks every field of a config and the combinations of fields, before any work.

    Args:
      config: The experiment config.
      num_parents: How many parents will be fused, when not ``config.num_parents``
        (fuse.py --parents=PATH,...): the range of ``experiment.groups``, the length of ``experiment.weights``.
      model_from_config: Whether ``config.model`` describes the parents; False when
        their architecture comes from checkpoints, which then have to be checked
        with :func:`check_options_for_model`.

    Returns:
      The config as plain dicts, with the text ``None`` of optional text fields as None.

    Raises:
      ValueError: One line naming the field with its full path (``config.experiment.num_samples``),
        its value and the allowed values; or every missing / unknown key.
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
    for path, rule in FIELDS.items():
        value = _get(cfg, path)
        if rule.optional and rule.kind == "str" and value == "None":
            _set(cfg, path, None)
            value = None
        problem = rule.error(value)
        if problem:
            raise field_error(path, value, problem)
    _check_combinations(cfg, cfg["num_parents"] if num_parents is None else num_parents, model_from_config)
    try:
        fusion_config_from(cfg, "activations")
    except ValueError as e:
        raise ValueError(str(e).replace("FusionConfig.", "config.fusion.")) from None
    try:
        matching_from(cfg)
    except ValueError as e:
        raise ValueError(str(e).replace("WeightMatching.", "config.matching.")) from None
    try:
        cca_from(cfg)
    except ValueError as e:
        raise ValueError(str(e).replace("CCAMerge.", "config.cca.")) from None
    try:
        refit_from(cfg)
    except ValueError as e:
        raise ValueError(str(e).replace("refit.", "config.refit.", 1)) from None
    settings = settings_from(cfg)
    try:
        settings.finetune  # noqa: B018 - builds the fine-tuning TrainConfig, which checks it
    except ValueError as e:
        exp = cfg["experiment"]
        field = "finetune_distill" if "distill" in str(e) else "finetune_lr"
        raise field_error(f"experiment.{field}", exp[field], str(e)) from None
    return cfg


def fusion_config_from(config: Any, mode: str = "weights") -> fusion.FusionConfig:
    """The :class:`~otfusion_jax.fusion.FusionConfig` of ``config.fusion`` for ``mode``.

    Raises:
      ValueError: ``FusionError`` naming the bad field (``FusionConfig.<field>=...``).
    """
    section = to_dict(config)["fusion"]
    return fusion.FusionConfig(mode=mode, **{k: section[k] for k in FUSION_FIELDS})


def matching_from(config: Any) -> tuple[matching.WeightMatching, int]:
    """Weight matching's options and seed: ``config.matching``, with ``config.fusion.exact_backend`` as its backend.

    Returns:
      ``(WeightMatching(...), seed)``; the wm methods set ``soft`` themselves.
    """
    cfg = to_dict(config)
    section = dict(cfg["matching"])
    seed = section.pop("seed")
    return matching.WeightMatching(backend=cfg["fusion"]["exact_backend"], **section), int(seed)


def cca_from(config: Any) -> cca.CCAMerge:
    """CCA Merge's options: ``config.cca``."""
    section = to_dict(config)["cca"]
    return cca.CCAMerge(**{k: section[k] for k in CCA_FIELDS})


def refit_from(config: Any) -> refit.RefitConfig:
    """The least-squares refit's options: ``config.refit``."""
    section = to_dict(config)["refit"]
    return refit.RefitConfig(**{k: section[k] for k in REFIT_FIELDS})


def experiment_config_from(config: Any) -> experiment.ExperimentConfig:
    """The :class:`~otfusion_jax.experiment.ExperimentConfig` of ``config.experiment``."""
    section = to_dict(config)["experiment"]
    return experiment.ExperimentConfig(**{k: section[k] for k in EXPERIMENT_FIELDS})


def settings_from(config: Any) -> experiment.Settings:
    """The typed options of a fusion run (``experiment.Settings``): experiment, fusion, matching, train sections.

    Args:
      config: A config (validate it first for one-line errors naming the field).

    Returns:
      ``Settings(experiment, fusion (mode "weights"), matching, matching_seed, train)``; ``train`` (the parents'
      recipe, seed ``config.seed``) is what fine-tuning starts from.
    """
    wm, seed = matching_from(config)
    return experiment.Settings(
        experiment=experiment_config_from(config),
        fusion=fusion_config_from(config, "weights"),
        matching=wm,
        matching_seed=seed,
        cca=cca_from(config),
        refit=refit_from(config),
        train=train_config_from(config),
    )


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
        "eval_split": d["eval_split"],
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
