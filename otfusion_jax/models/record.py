"""Model records: each architecture described once.

A :class:`ModelRecord` is everything the library knows about one architecture:

* ``options``: a frozen dataclass whose fields are the model's options, with
  types and defaults; ``models.build(name, **options)`` and ``config.model``
  take exactly these fields;
* ``module(options, input_shape, num_classes)``: the Flax module;
* ``spec(options, input_shape)``: its alignment spec;
* ``torch``: optionally the original OTFusion's PyTorch layout
  (:class:`~otfusion_jax.models.torch_layout.TorchLayout`), for ``interop``;
* capabilities: ``has_batchnorm(options)``, ``has_bias(options)`` and
  ``scale_width(options, factor)`` (parents of different widths).

The module contract, which :func:`check_record` checks on abstract shapes
(``jax.eval_shape``: nothing is computed):

* ``module.init(key, x, train=False)`` with x (N, H, W, C) returns
  (N, num_classes) logits and exactly the spec's leaves in ``params`` (and
  ``batch_stats``), with consistent plan sizes;
* every plan of the spec is sown into both ``acts_pre`` and ``acts_post``
  under ``ACT_PREFIX + plan``, neurons on the last axis, and nothing else is
  (:func:`~otfusion_jax.models.common.sow_acts`);
* the module has a ``use_bias`` field (REPAIR rebuilds a bias-free model with
  biases); with BatchNorm, a ``bn_momentum`` field and a ``train=True`` mode
  that updates ``batch_stats`` (``recompute_batch_stats``);
* ``has_batchnorm`` / ``has_bias`` agree with the variables and the spec, and
  a torch layout's entries are exactly the module's leaves, with a ``detect``
  and an ``infer`` that recognise them.
"""

from __future__ import annotations

import dataclasses
import numbers
import typing
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from otfusion_jax import spec as spec_lib
from otfusion_jax.models.common import ACT_COLLECTIONS, ACT_PREFIX
from otfusion_jax.models.torch_layout import LayoutError, TorchLayout, flax_shape, torch_shape

__all__ = ["ModelRecord", "RecordError", "ConvNetOptions", "conv_net_record", "check_record", "never", "sown_activations"]


class RecordError(ValueError):
    """A model record breaks the module contract; the message names the model and the leaf or plan."""


def never(options: Any) -> bool:
    """The default capability: the model never has it."""
    del options
    return False


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """One architecture, described once (see the module docstring for the contract).

    Attributes:
      name: the registry name (``models.build(name, ...)``, ``config.model.name``).
      options: a frozen dataclass type; every field has a default and a type
        annotation (``bool``, ``int``, ``float``, ``str`` or ``tuple[T, ...]``
        are checked and converted, e.g. a JSON list to a tuple).
      module: ``module(options, input_shape, num_classes) -> nn.Module``.
      spec: ``spec(options, input_shape) -> AlignmentSpec``.
      has_batchnorm: ``has_batchnorm(options)``: the model has BatchNorm layers
        (a ``batch_stats`` collection).
      has_bias: ``has_bias(options)``: its layers have biases.
      scale_width: ``scale_width(options, factor)``: the options of the same
        model ``factor`` times as wide (``config.parent_widths``); None: the
        model has no width option.
      torch: the original OTFusion's PyTorch layout, or None (no interop).
      example_input_shape: (H, W, C) that :func:`check_record` builds with.
      examples: options instances :func:`check_record` checks; empty: the defaults.
    """

    name: str
    options: type
    module: Callable[[Any, tuple[int, int, int], int], nn.Module]
    spec: Callable[[Any, tuple[int, int, int]], spec_lib.AlignmentSpec]
    has_batchnorm: Callable[[Any], bool] = never
    has_bias: Callable[[Any], bool] = never
    scale_width: Callable[[Any, float], Any] | None = None
    torch: TorchLayout | None = None
    example_input_shape: tuple[int, int, int] = (8, 8, 1)
    examples: tuple[Any, ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise RecordError(f"a model record needs a non-empty name, got {self.name!r}")
        where = f"model {self.name!r}"
        if not (isinstance(self.options, type) and dataclasses.is_dataclass(self.options)):
            raise RecordError(f"{where}: options must be a dataclass type, got {self.options!r}")
        if not self.options.__dataclass_params__.frozen:
            raise RecordError(f"{where}: options {self.options.__name__} must be a frozen dataclass")
        no_default = [
            f.name for f in dataclasses.fields(self.options)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if no_default:
            raise RecordError(f"{where}: options field(s) {no_default} need a default")
        bad = [e for e in self.examples if not isinstance(e, self.options)]
        if bad:
            raise RecordError(f"{where}: examples must be {self.options.__name__} instances, got {bad[0]!r}")
        if self.torch is not None and not isinstance(self.torch, TorchLayout):
            raise RecordError(f"{where}: torch must be a TorchLayout, got {type(self.torch).__name__}")
        if len(tuple(self.example_input_shape)) != 3:
            raise RecordError(f"{where}: example_input_shape must be (H, W, C), got {self.example_input_shape}")

    @property
    def option_names(self) -> tuple[str, ...]:
        """The option fields, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(self.options))

    @property
    def option_types(self) -> dict[str, Any]:
        """Option name -> its (resolved) type annotation."""
        return typing.get_type_hints(self.options)

    def defaults(self) -> Any:
        """The default options."""
        return self.options()

    def make_options(self, **values: Any) -> Any:
        """The options instance for ``values`` (missing fields take their defaults).

        Raises:
          ValueError: naming the model and the option: an unknown option, a
            value of the wrong type, or one the options dataclass rejects.
        """
        where = f"model {self.name!r}"
        unknown = sorted(set(values) - set(self.option_names))
        if unknown:
            raise ValueError(
                f"{where}: unknown option(s) {', '.join(unknown)}; its options are {', '.join(self.option_names)}"
            )
        types = self.option_types
        converted = {k: _coerce(v, types.get(k, Any), f"{where}: option {k}") for k, v in values.items()}
        try:
            return self.options(**converted)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def options_dict(self, options: Any) -> dict[str, Any]:
        """The options as a JSON-friendly dict (tuples as lists), e.g. for checkpoint metadata."""
        return {name: _jsonable(getattr(options, name)) for name in self.option_names}

    def build(self, options: Any, input_shape: tuple[int, int, int], num_classes: int):
        """``(module, spec)`` for an options instance."""
        input_shape = tuple(int(x) for x in input_shape)
        return self.module(options, input_shape, int(num_classes)), self.spec(options, input_shape)


def _coerce(value: Any, hint: Any, what: str) -> Any:
    """Checks ``value`` against a simple type annotation and converts it (lists to tuples, ints to floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            return bool(value)
    elif hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple and isinstance(value, (tuple, list)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{what}[{i}]") for i, v in enumerate(value))
        if len(args) == len(value):
            return tuple(_coerce(v, a, f"{what}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    elif origin is not tuple:
        return value  # an annotation this check does not know: the dataclass checks the value
    raise ValueError(f"{what} must be {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {_type_name(args[0])}"
        return f"a tuple ({', '.join(_type_name(a) for a in args)})"
    return getattr(hint, "__name__", str(hint))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


# ----------------------------------------------------------------------------- the check


def sown_activations(collection: Mapping[str, Any]) -> dict[str, tuple[Any, ...]]:
    """Plan name -> the tensors sown for it, from one activation collection (nested dicts).

    Sown keys are ``ACT_PREFIX + plan``; the tensors of one plan sown by
    several submodules (a residual stream) are concatenated in call order.
    """
    out: dict[str, tuple] = {}
    for key, value in _sown_items(collection):
        plan = key.removeprefix(ACT_PREFIX)
        out[plan] = out.get(plan, ()) + value
    return out


def _sown_items(node: Mapping[str, Any]) -> list[tuple[str, tuple]]:
    """(key, sown tuple) pairs of a collection, depth first."""
    items = []
    for key, value in node.items():
        if isinstance(value, tuple):
            items.append((key, value))
        else:
            items.extend(_sown_items(value))
    return items


def check_record(
    record: ModelRecord,
    options: Any = None,
    *,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int = 3,
) -> None:
    """Checks that a record's module, spec, capabilities and torch layout agree (on abstract shapes).

    Args:
      record: the record.
      options: an options instance or a dict of options; None checks each of
        ``record.examples`` (the defaults if there are none).
      input_shape: (H, W, C); default ``record.example_input_shape``.
      num_classes: classes of the checked module.

    Raises:
      RecordError: naming the model and the leaf, plan or field that breaks
        the contract (see the module docstring).
    """
    if not isinstance(record, ModelRecord):
        raise RecordError(f"expected a ModelRecord, got {type(record).__name__}")
    if options is None:
        todo = record.examples or (record.defaults(),)
    elif isinstance(options, Mapping):
        todo = (record.make_options(**options),)
    else:
        todo = (options,)
    shape = tuple(int(x) for x in (input_shape or record.example_input_shape))
    for opts in todo:
        _check_one(record, opts, shape, int(num_classes))


def _check_one(record: ModelRecord, opts: Any, shape: tuple[int, int, int], num_classes: int) -> None:
    where = f"model {record.name!r} with {opts}"
    module = record.module(opts, shape, num_classes)
    spec = record.spec(opts, shape)
    if not isinstance(module, nn.Module):
        raise RecordError(f"{where}: module(...) returned a {type(module).__name__}, not a flax.linen.Module")
    if not isinstance(spec, spec_lib.AlignmentSpec):
        raise RecordError(f"{where}: spec(...) returned a {type(spec).__name__}, not an AlignmentSpec")
    x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
    try:
        logits, variables = jax.eval_shape(
            lambda x: module.init_with_output(jax.random.key(0), x, train=False), x
        )
    except TypeError as e:
        raise RecordError(f"{where}: module.init(key, x, train=False) failed ({e}); "
                          "__call__ must take (x, train: bool = False)") from e
    if tuple(getattr(logits, "shape", ())) != (2, num_classes):
        raise RecordError(f"{where}: the module returns {getattr(logits, 'shape', logits)} for 2 inputs, "
                          f"expected logits of shape (2, {num_classes})")
    state = {k: v for k, v in variables.items() if k not in ACT_COLLECTIONS.values()}
    try:
        sizes = spec.check_variables(state, what=f"{where}: the module's variables")
    except spec_lib.SpecError as e:
        raise RecordError(str(e)) from None
    for coll in ACT_COLLECTIONS.values():
        bare = [k for k, _ in _sown_items(variables.get(coll, {})) if not k.startswith(ACT_PREFIX)]
        if bare:
            raise RecordError(f"{where}: {coll!r} holds {', '.join(bare)} without ACT_PREFIX {ACT_PREFIX!r} "
                              "(sow under ACT_PREFIX + plan name: models.sow_acts)")
        _check_sown(where, coll, sown_activations(variables.get(coll, {})), spec, sizes)
    fields = {f.name for f in dataclasses.fields(module)}
    if "use_bias" not in fields:
        raise RecordError(f"{where}: the module needs a use_bias field (REPAIR rebuilds a bias-free model with biases)")
    has_bn = "batch_stats" in state
    if bool(record.has_batchnorm(opts)) != has_bn:
        raise RecordError(f"{where}: has_batchnorm(options) is {record.has_batchnorm(opts)} but the module "
                          f"{'has' if has_bn else 'has no'} batch_stats")
    if has_bn:
        if "bn_momentum" not in fields:
            raise RecordError(f"{where}: a module with BatchNorm needs a bn_momentum field "
                              "(recompute_batch_stats sets it to 0)")
        try:
            _, updated = jax.eval_shape(
                lambda x, v: module.clone(bn_momentum=0.0).apply(v, x, train=True, mutable=["batch_stats"]),
                x, state,
            )
        except Exception as e:  # noqa: BLE001 - any failure of the train-mode pass breaks the contract
            raise RecordError(f"{where}: the train=True pass that updates batch_stats failed: {e}") from e
        paths = spec_lib.flatten_paths(state["batch_stats"]).keys()
        if spec_lib.flatten_paths(updated.get("batch_stats", {})).keys() != paths:
            raise RecordError(f"{where}: the train=True pass does not update every batch_stats leaf")
    has_bias = any(ls.role == "bias" for _, ls in spec.leaves)
    if bool(record.has_bias(opts)) != has_bias:
        raise RecordError(f"{where}: has_bias(options) is {record.has_bias(opts)} but the spec "
                          f"{'has' if has_bias else 'has no'} bias leaves")
    if record.torch is not None:
        _check_torch(record, where, opts, shape, num_classes, state)


def _check_sown(where: str, coll: str, sown: Mapping[str, tuple], spec: spec_lib.AlignmentSpec,
                sizes: Mapping[str, int]) -> None:
    missing = [p for p in spec.plans if p not in sown]
    if missing:
        raise RecordError(
            f"{where}: plan(s) {', '.join(missing)} not sown into {coll!r}: sow every tensor carrying a plan "
            f"under ACT_PREFIX + plan name into acts_pre and acts_post (models.sow_acts)"
        )
    extra = [p for p in sown if p not in spec.plans]
    if extra:
        raise RecordError(f"{where}: {coll!r} holds activations {', '.join(extra)} of no plan of the spec")
    for plan, tensors in sown.items():
        for t in tensors:
            if not t.shape or t.shape[-1] != sizes[plan]:
                raise RecordError(
                    f"{where}: {coll!r} sows plan {plan!r} with shape {tuple(t.shape)}; its last axis must be "
                    f"the plan's {sizes[plan]} neurons"
                )


def _check_torch(record: ModelRecord, where: str, opts: Any, shape, num_classes: int, state) -> None:
    layout = record.torch
    entries = layout.entries(opts, shape, num_classes)
    have = {p: tuple(s.shape) for p, s in spec_lib.flatten_paths(state).items()}
    want = {e.path: flax_shape(e) for e in entries if e.path is not None}
    if have != want:
        diff = sorted(p for p in set(have) | set(want) if have.get(p) != want.get(p))
        raise RecordError(f"{where}: the torch layout's entries do not match the module's leaves: " + ", ".join(
            f"{p}: module {have.get(p)} vs layout {want.get(p)}" for p in diff[:5]))
    shapes = {e.key: e.shape for e in entries}
    if not layout.detect(frozenset(shapes)):
        raise RecordError(f"{where}: the torch layout's detect() does not recognise its own entries' keys")
    reads = list(layout.reads(list(have)))
    missing = [p for p, _, required in reads if required and p not in have]
    if missing:
        raise RecordError(f"{where}: the torch layout's reads() needs leaves the module lacks: {missing[:5]}")
    for source, given in (("a state dict", shapes), ("variables", _read_shapes(reads, have))):
        try:
            inferred = layout.infer(given, shape)
        except LayoutError as e:
            raise RecordError(f"{where}: the torch layout cannot read back {source} of its own: {e}") from None
        if layout.entries(*inferred) != entries:
            raise RecordError(f"{where}: the torch layout reads {source} of its own as {inferred}")


def _read_shapes(reads, have: Mapping[str, tuple]) -> dict[str, tuple]:
    return {key: torch_shape(have[path]) for path, key, _ in reads if path in have}


@dataclasses.dataclass(frozen=True)
class ConvNetOptions:
    """Options shared by the conv nets (``vgg11``, ``resnet18``); each subclasses it with its own defaults.

    Attributes:
      bias: biases in every layer (the paper's models have none).
      norm: BatchNorm after each conv.
      width: channel multiplier (1.0: 64..512 channels).
    """

    bias: bool = False
    norm: bool = False
    width: float = 1.0
    model = "conv net"  # the model's name in messages (a class attribute, not an option)

    def __post_init__(self):
        if not self.width > 0:
            raise ValueError(f"{self.model} width must be > 0, got {self.width}")


def conv_net_record(
    name: str,
    options: type,
    module: type,
    spec: Callable[[Any, tuple[int, int, int]], spec_lib.AlignmentSpec],
    **fields: Any,
) -> ModelRecord:
    """The record of a conv net whose module takes ``num_classes, use_bias, use_norm, width`` and options
    ``bias, norm, width`` (:class:`ConvNetOptions`): BatchNorm iff ``norm``, biases iff ``bias``, the width
    multiplier scales. ``fields``: the rest of the record (torch layout, example shapes).
    """
    return ModelRecord(
        name=name,
        options=options,
        module=lambda o, input_shape, num_classes: module(
            num_classes=num_classes, use_bias=o.bias, use_norm=o.norm, width=o.width
        ),
        spec=spec,
        has_batchnorm=lambda o: o.norm,
        has_bias=lambda o: o.bias,
        scale_width=lambda o, factor: dataclasses.replace(o, width=o.width * factor),
        **fields,
    )
