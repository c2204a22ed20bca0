"""Least-squares refit of a fused model: each layer regressed onto what the parents' plans ask of it.

>>> fused, aux = otf.fuse(parents, spec, aligner, activations=acts)
>>> targets = refit.moved_mean_activations([(module, v) for v in parents], aux.plans, x)
>>> fused = refit.refit(module, fused, spec, x, targets)

Averaging aligned parents loses more than each neuron's scale and offset (what REPAIR restores): the mean of two
weight matrices that read slightly different features is not the layer that maps the fused model's features to
the parents' outputs. Refit recomputes every layer's weights, in forward order, as the ridge regression of the
parents' pre-activations (moved by the plans) on the fused model's own inputs to that layer:

    W_l = argmin_W |A_l W - Y_l|^2 + lambda_l |W - W0_l|^2,    Y_l = sum_k w_k Z_kl T_kl,

with ``A_l`` the fused model's inputs to layer l on S unlabelled training samples (a conv layer's patches: one
row per sample and output position; a column of ones for a bias), ``Z_kl`` parent k's pre-activations, ``T_kl``
its plan's output side (a permutation: the aligned parent's own pre-activations; the target parent: none), ``W0_l``
the averaged weights and ``lambda_l = ridge * trace(A^T A) / d``: where the samples say little, the average
stays. ``A_l`` is read from the layers already refitted below l, so each layer also absorbs its inputs' errors;
the class layer is refitted too, onto the parents' mean logits.

It is the second step of PLeaS (Nasery et al., CVPR 2025, "Merging Models with Permutations and Least Squares").
Differences from it, on purpose: any alignment feeds it (OT plans exact or soft, CCA Merge's maps, weight
matching), not only partial permutations; the regression is pulled towards the averaged weights (ridge), not
solved plain; models keep their widths. On the held-out images of the Fashion MLPNet pair (parents' mean 88.34%)
it takes OT by weights with Sinkhorn to 88.32% (with REPAIR 87.90%) and weight matching to 87.04% (85.06%);
docs/RESULTS.md, "Least-squares refit".

Residual streams (ResNets): a stream's plan is sown after every sum, ``tap_i = skip_i + sum_j A_j
W_j``. Each sum is one regression over the layers it adds (a block's last conv and its projection shortcut,
jointly), onto ``Y_i - skip_i``: the skip connection as the fused model carries it, the sum's layers made to add
what is missing. Which layers each sum adds is found by probing (``repair.stream_sums``); sums and layers are
refitted in the order the model calls them.

BatchNorm (eval mode, ``y = s z + t`` per channel) is folded: the layer and its BatchNorm are regressed as one
affine map, written back into the kernel (divided by ``s``) and the BatchNorm's shift; its scale and running
statistics stay as they are.

Scope: Dense and Conv layers (bias optional, BatchNorm optional) whose outputs, alone or summed into a stream, are
the plans' sown pre-activations: MLPs, VGGs and ResNets. :func:`check_spec` refuses LayerNorm, attention heads and
embeddings by name.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import linear as flax_linear

from otfusion_jax import engine, models, repair
from otfusion_jax import spec as spec_lib
from otfusion_jax.engine import FusionError

__all__ = ["RefitConfig", "Layer", "Unit", "check_spec", "units", "moved_mean_activations", "refit", "design_rows"]

Variables = Mapping[str, Any]
MIN_RIDGE = 1e-6  # ridge 0 is read as this: plain least squares where the samples reach, the average elsewhere
# Full float32 products: the skip connection is a difference of two large terms and the Gram matrices feed a solve;
# TF32 (the default for float32 matmuls on recent GPUs) would lose both.
_EXACT = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class RefitConfig:
    """Options of the least-squares refit (``config.refit``).

    Attributes:
      ridge: lambda as a fraction of the mean eigenvalue of ``A^T A`` (0: plain least squares, read as
        ``MIN_RIDGE`` so that directions no sample reaches keep the averaged weights). 0.01 was chosen on held-out
        images (docs/RESULTS.md, "Least-squares refit").
      num_samples: training inputs the regressions are fitted on (fuse.py draws them with
        ``experiment.sample_seed``). A Dense layer of d inputs wants well over d of them; a conv layer gets one row
        per output position as well.
      batch_size: samples per pass when accumulating ``A^T A`` and ``A^T Y`` (memory, not results; the targets
        themselves are captured on all ``num_samples`` at once, every parent's pre-activations at every layer).
    """

    ridge: float = 0.01
    num_samples: int = 1000
    batch_size: int = 250

    def __post_init__(self):
        r = self.ridge
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0.0 <= float(r) < float("inf"):
            raise FusionError(f"refit.ridge must be a number >= 0, got {r!r}")
        for name in ("num_samples", "batch_size"):
            n = getattr(self, name)
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise FusionError(f"refit.{name} must be an integer >= 1, got {n!r}")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One Dense or Conv layer: its Flax module path and its leaves, and the BatchNorm that follows it, if any."""

    path: tuple[str, ...]  # the Flax module path, e.g. ("conv3",)
    kernel: str  # the kernel's leaf path, e.g. "params/conv3/kernel"
    bias: str | None
    norm: str | None = None  # the BatchNorm's module path below params/ and batch_stats/, e.g. "bn3"
    eps: float = 0.0  # its epsilon
    rows: tuple = ("dense",)  # how its input becomes rows (:func:`_rows_of`): ("dense",) or ("conv", ...)

    def affine(self, flat: Mapping[str, Any]) -> tuple[jax.Array, jax.Array] | None:
        """The BatchNorm in eval mode as ``y = s * z + t`` per channel (None without one)."""
        if self.norm is None:
            return None
        gamma, beta = flat[f"params/{self.norm}/scale"], flat[f"params/{self.norm}/bias"]
        mean, var = flat[f"batch_stats/{self.norm}/mean"], flat[f"batch_stats/{self.norm}/var"]
        s = (gamma / jnp.sqrt(var + self.eps)).astype(jnp.float32)
        return s, (beta - mean * s).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One regression: the layers whose outputs (summed) are tensor ``tap`` of ``plan``'s sown pre-activations."""

    plan: str
    tap: int
    layers: tuple[Layer, ...]


def check_spec(spec: spec_lib.AlignmentSpec) -> dict[str, tuple[Layer, ...]]:
    """Plan name -> the layers producing it (several: a residual stream; their BatchNorms are attached by
    :func:`units`); FusionError for what the refit cannot regress: attention heads, LayerNorm (a norm without
    running statistics), embeddings, a bias without its kernel, leaves outside ``params/``."""
    if spec.heads:
        raise FusionError(f"refit: the spec has attention heads ({', '.join(g.plans[0] for g in spec.heads)})")
    if spec.taps or spec.permutation_only:
        raise FusionError("refit: the spec's streams pass through LayerNorm (a transformer); use REPAIR or none")
    for path, ls in spec.leaves:
        if ls.role == "additive":
            raise FusionError(f"refit: leaf {path} is a tensor added into a stream (an embedding); not a layer")
    _norms(spec)
    out = {}
    for plan in spec.plans:
        kernels = spec.producers(plan, ("weight",))
        biases = {b.rsplit("/", 1)[0]: b for b in spec.producers(plan, ("bias",))}
        if not kernels:
            raise FusionError(f"refit: plan {plan!r} has no producing kernel")
        layers = []
        for kernel in kernels:
            module_path = kernel.rsplit("/", 1)[0]
            parts = tuple(module_path.split("/"))
            if parts[0] != "params" or len(parts) < 2:
                raise FusionError(f"refit: kernel {kernel} is not under 'params/'")
            layers.append(Layer(parts[1:], kernel, biases.pop(module_path, None)))
        if biases:
            raise FusionError(f"refit: plan {plan!r} has biases without their kernels: {sorted(biases.values())}")
        out[plan] = tuple(layers)
    return out


_NORM_LEAVES = ("params/{}/scale", "params/{}/bias", "batch_stats/{}/mean", "batch_stats/{}/var")


def _norms(spec: spec_lib.AlignmentSpec) -> dict[str, list[str]]:
    """Plan name -> the BatchNorm module paths on it; FusionError for a norm without all four leaves (LayerNorm)."""
    lm = spec.leaf_map
    found: dict[str, str] = {}
    for path, ls in spec.leaves:
        if ls.role in ("norm", "stat"):
            found.setdefault(path.split("/", 1)[1].rsplit("/", 1)[0], ls.axes[-1])
    out: dict[str, list[str]] = {}
    for name, plan in found.items():
        missing = [leaf.format(name) for leaf in _NORM_LEAVES if leaf.format(name) not in lm]
        if missing:
            raise FusionError(
                f"refit: the normalisation layer {name!r} has no {', '.join(missing)}: the refit folds BatchNorm "
                "with scale, bias and running statistics only (not LayerNorm, nor BatchNorm without scale or bias)"
            )
        out.setdefault(plan, []).append(name)
    return out


class _Call(NamedTuple):
    at: int  # the position of the module's first call in the forward pass
    module: nn.Module
    rows: tuple | None  # a Dense or Conv layer's :func:`_rows_of`; None for any other module


def _calls(module: nn.Module, variables: Variables, x: jax.Array) -> dict[tuple[str, ...], _Call]:
    """Module path -> its first call in one forward pass (traced, nothing computed)."""
    calls: dict[tuple[str, ...], _Call] = {}

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__" and tuple(m.path) not in calls:
            rows = _rows_of(m, args[0].ndim - 2) if isinstance(m, (nn.Dense, nn.Conv)) else None
            calls[tuple(m.path)] = _Call(len(calls), m, rows)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, xx: module.apply(v, xx, train=False), dict(variables), x[:1])
    return calls


def _with_norms(
    plan: str, layers: Sequence[Layer], norms: Sequence[str], calls: Mapping[tuple[str, ...], _Call]
) -> tuple[Layer, ...]:
    """Each BatchNorm of ``plan`` attached to the layer called just before it."""
    out = list(layers)
    for name in norms:
        path = tuple(name.split("/"))
        if path not in calls or not isinstance(calls[path].module, nn.BatchNorm):
            raise FusionError(f"refit: {name!r} on plan {plan!r} is not a BatchNorm the model calls")
        at = calls[path].at
        before = [i for i, layer in enumerate(out) if calls[layer.path].at < at]
        if not before:
            raise FusionError(f"refit: the BatchNorm {name!r} on plan {plan!r} follows none of its layers")
        i = max(before, key=lambda j: calls[out[j].path].at)
        if out[i].norm is not None:
            raise FusionError(f"refit: layer {'/'.join(out[i].path)} is followed by two BatchNorms ({out[i].norm}, {name})")
        out[i] = dataclasses.replace(out[i], norm=name, eps=float(calls[path].module.epsilon))
    return tuple(out)


def units(
    module: nn.Module, variables: Variables, spec: spec_lib.AlignmentSpec, x: jax.Array
) -> list[Unit]:
    """The regressions of :func:`refit`, in the order the model calls their layers.

    A plan produced by one layer is one unit; a residual stream (several producers) is one unit per sum, with
    the layers added there (``repair.stream_sums``: probed on a few of the samples ``x``).
    """
    layers = check_spec(spec)
    norms = _norms(spec)
    calls = _calls(module, variables, x)
    missing = sorted("/".join(layer.path) for ls in layers.values() for layer in ls if layer.path not in calls)
    if missing:
        raise FusionError(f"refit: the model never calls the layers {missing}")
    out = []
    for plan, ls in layers.items():
        for layer in ls:
            if calls[layer.path].rows is None:
                what = type(calls[layer.path].module).__name__
                raise FusionError(f"refit: layer {'/'.join(layer.path)} is a {what}, not Dense or Conv")
        ls = tuple(dataclasses.replace(layer, rows=calls[layer.path].rows) for layer in ls)
        ls = _with_norms(plan, ls, norms.get(plan, ()), calls)
        if len(ls) == 1:
            out.append(Unit(plan, 0, ls))
            continue
        by_kernel = {layer.kernel: layer for layer in ls}
        try:
            sums = repair.stream_sums(module, variables, spec, plan, x[:16])
        except ValueError as e:
            raise FusionError(str(e).replace("REPAIR:", "refit:")) from None
        out += [Unit(plan, i, tuple(by_kernel[k] for k in kernels)) for i, kernels in enumerate(sums) if kernels]
    return sorted(out, key=lambda u: max(calls[layer.path].at for layer in u.layers))


def moved_mean_activations(
    parents: Sequence[tuple[nn.Module, Variables]],
    plans: Sequence[Mapping[str, Any] | None],
    x: jax.Array,
    *,
    weights: Sequence[float] | None = None,
) -> dict[str, tuple[jax.Array, ...]]:
    """The regression targets: ``sum_k w_k Z_k T_k`` per plan, each parent's pre-activations moved by its plan
    (``repair.moved_pre_activations``).

    Args:
      parents: K ``(module, variables)`` pairs, each parent's own architecture.
      plans: per parent, plan name -> plan (an (n_parent, n_target) matrix as in ``engine.FusionAux.plans``, a
        ``plans.Permutation`` or the output side of a ``plans.Linear``); None: the target, as it is.
      x: (S, ...) samples.
      weights: (K,) averaging weights (None: 1/K; normalised as ``engine.fuse`` does).

    Returns:
      plan name -> per sown tensor (one per layer; a residual stream: one per sum) an (S, ..., n_target) array.
    """
    w = [float(v) for v in np.asarray(engine.averaging_weights(len(parents), weights))]
    out: dict[str, tuple[jax.Array, ...]] = {}
    for wk, (module, variables), moves in zip(w, parents, plans):
        for name, tensors in repair.moved_pre_activations(module, variables, moves, x).items():
            moved = tuple(wk * z for z in tensors)
            out[name] = tuple(a + b for a, b in zip(out[name], moved)) if name in out else moved
    return out


def _rank_tuple(value: Any, rank: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * rank
    if isinstance(value, int):
        return (value,) * rank
    return tuple(value)


def _rows_of(layer: nn.Module, rank: int) -> tuple:
    """A static description of how a Dense or Conv layer's input becomes rows (hashable: a jit static argument)."""
    where = "/".join(layer.path)
    if isinstance(layer, nn.Dense):
        return ("dense",)
    if not isinstance(layer, nn.Conv):
        raise FusionError(f"refit: layer {where} is a {type(layer).__name__}, not Dense or Conv")
    padding = flax_linear.canonicalize_padding(layer.padding, rank)
    if layer.feature_group_count != 1 or (isinstance(padding, str) and padding not in ("SAME", "VALID")):
        raise FusionError(f"refit: conv {where} has feature groups or {layer.padding!r} padding; not supported")
    if not 1 <= rank <= 3:
        raise FusionError(f"refit: conv {where} has {rank} spatial axes; 1 to 3 are supported")
    padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
    return (
        "conv",
        tuple(layer.kernel_size),
        _rank_tuple(layer.strides, rank, 1),
        padding,
        _rank_tuple(layer.input_dilation, rank, 1),
        _rank_tuple(layer.kernel_dilation, rank, 1),
    )


def _design(rows: tuple, x: jax.Array) -> jax.Array:
    """The rows ``A`` of input ``x`` for a layer described by ``rows`` (:func:`_rows_of`)."""
    if rows[0] == "dense":
        return x.reshape(-1, x.shape[-1])
    _, window, strides, padding, lhs_dilation, rhs_dilation = rows
    letters = "DHW"[-(x.ndim - 2):]
    patches = jax.lax.conv_general_dilated_patches(
        x, window, strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"), precision=_EXACT,
    )
    return patches.reshape(-1, patches.shape[-1])


def design_rows(layer: nn.Module, x: jax.Array) -> jax.Array:
    """The rows ``A`` with ``layer(x) = A @ kernel_rows (+ bias)``: a Dense layer's inputs, a Conv layer's patches.

    A Conv kernel ``(*window, C, n)`` is read as rows ordered ``(C, *window)``: :func:`_kernel_rows`.
    """
    return _design(_rows_of(layer, x.ndim - 2), x)


def _kernel_rows(kernel: jax.Array) -> jax.Array:
    """A kernel as (d, n) rows in :func:`design_rows`' order: a conv's ``(*window, C, n)`` as ``(C, *window)``."""
    if kernel.ndim == 2:
        return kernel
    return jnp.moveaxis(kernel, -2, 0).reshape(-1, kernel.shape[-1])


def _rows_kernel(rows: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of :func:`_kernel_rows`."""
    if len(shape) == 2:
        return rows.reshape(shape)
    c_first = (shape[-2],) + tuple(shape[:-2]) + (shape[-1],)
    return jnp.moveaxis(rows.reshape(c_first), 0, -2)


def _effective(layer: Layer, flat: Mapping[str, Any]) -> tuple[jax.Array, jax.Array | None]:
    """The layer (and its BatchNorm) as rows and a bias, ``out = A @ w + b``: with a BatchNorm ``y = s z + t``,
    ``w = K s`` and ``b = s (bias or 0) + t``; without one, the kernel's rows and the bias (None: none)."""
    w = _kernel_rows(flat[layer.kernel]).astype(jnp.float32)
    b = None if layer.bias is None else flat[layer.bias].reshape(-1).astype(jnp.float32)
    affine = layer.affine(flat)
    if affine is None:
        return w, b
    s, t = affine
    return w * s, (0.0 if b is None else b * s) + t


def _set_effective(layer: Layer, flat: dict[str, Any], w: jax.Array, b: jax.Array | None) -> None:
    """Writes rows ``w`` and bias ``b`` back (:func:`_effective` inverted): a BatchNorm keeps its scale and running
    statistics; its shift takes the new bias and the kernel the rows divided by its scale (a channel whose scale
    is 0 keeps its kernel)."""
    kernel = flat[layer.kernel]
    affine = layer.affine(flat)
    if affine is None:
        flat[layer.kernel] = _rows_kernel(w, kernel.shape).astype(kernel.dtype)
        if layer.bias is not None:
            flat[layer.bias] = b.reshape(flat[layer.bias].shape).astype(flat[layer.bias].dtype)
        return
    s, t = affine
    live = jnp.abs(s) > jnp.finfo(jnp.float32).tiny
    rows = jnp.where(live, w / jnp.where(live, s, 1.0), _kernel_rows(kernel).astype(jnp.float32))
    flat[layer.kernel] = _rows_kernel(rows, kernel.shape).astype(kernel.dtype)
    conv_bias = 0.0 if layer.bias is None else flat[layer.bias].reshape(-1).astype(jnp.float32) * s
    beta = f"params/{layer.norm}/bias"
    # y = s z + t with t = beta - mean s: the new shift b - s bias is reached by moving beta by as much.
    flat[beta] = (flat[beta] + (b - conv_bias - t)).astype(flat[beta].dtype)


@functools.partial(jax.jit, static_argnames=("module", "paths"))
def _forward(variables, x, *, module: nn.Module, paths: tuple[tuple[str, ...], ...]):
    """One forward pass: the inputs of the layers at ``paths`` and every sown pre-activation (one program for the
    whole refit: only the variables change from unit to unit)."""
    wanted, got = set(paths), {}

    def interceptor(next_fun, args, kwargs, context):
        path = tuple(context.module.path)
        if context.method_name == "__call__" and path in wanted and path not in got:
            got[path] = args[0]
        return next_fun(*args, **kwargs)

    coll = models.ACT_COLLECTIONS["pre"]
    with nn.intercept_methods(interceptor):
        _, state = module.apply(variables, x, train=False, mutable=[coll])
    return got, models.sown_activations(state[coll])


@functools.partial(jax.jit, static_argnames=("rows",))
def _unit_grams(inputs, effective, sown, y, *, rows: tuple):
    """``(A^T A, A^T (Y - skip))`` of one unit: ``A`` holds its layers' rows side by side (each with a column of
    ones for its bias), ``skip`` is what its sown tensor holds beyond their outputs (a residual sum's skip
    connection; zero for a plain layer)."""
    blocks, branch = [], 0.0
    for x, (w, b), how in zip(inputs, effective, rows):
        a = _design(how, x).astype(jnp.float32)
        out = jnp.matmul(a, w, precision=_EXACT)
        if b is not None:
            out = out + b.reshape(1, -1)
            a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
        blocks.append(a)
        branch = branch + out
    a = jnp.concatenate(blocks, axis=1)
    n = a.shape[0]
    target = y.reshape(n, -1).astype(jnp.float32) - (sown.reshape(n, -1).astype(jnp.float32) - branch)
    return jnp.matmul(a.T, a, precision=_EXACT), jnp.matmul(a.T, target, precision=_EXACT)


def refit(
    module: nn.Module,
    fused: Variables,
    spec: spec_lib.AlignmentSpec,
    x: jax.Array,
    targets: Mapping[str, Sequence[jax.Array]],
    config: RefitConfig = RefitConfig(),
) -> dict[str, Any]:
    """The fused model with every layer refitted by ridge regression, in forward order (module docstring).

    Args:
      module: the fused model's module (the target's architecture).
      fused: its variables (the aligned parents' average).
      spec: its alignment spec (:func:`check_spec`).
      x: (S, ...) samples, the same the targets were computed on.
      targets: plan name -> per sown tensor the (S, ..., n) pre-activations the plans ask for
        (:func:`moved_mean_activations`).
      config: ridge and batch size (``config.num_samples`` is the caller's: it draws ``x``).

    Returns:
      The refitted variables (the other collections as they were).
    """
    todo = units(module, fused, spec, x)
    for unit in todo:
        if unit.plan not in targets or len(targets[unit.plan]) <= unit.tap:
            raise FusionError(f"refit: no target activations for plan {unit.plan!r} (tensor {unit.tap})")
        if targets[unit.plan][unit.tap].shape[0] != x.shape[0]:
            raise FusionError(
                f"refit: the targets of plan {unit.plan!r} are on {targets[unit.plan][unit.tap].shape[0]} samples, "
                f"x has {x.shape[0]}"
            )
    flat = dict(spec_lib.flatten_paths(dict(fused)))
    step = config.batch_size
    paths = tuple(sorted({layer.path for unit in todo for layer in unit.layers}))
    for unit in todo:
        variables = spec_lib.unflatten_paths(flat)
        effective = tuple(_effective(layer, flat) for layer in unit.layers)
        w0 = jnp.concatenate([w if b is None else jnp.concatenate([w, b.reshape(1, -1)]) for w, b in effective])
        y = targets[unit.plan][unit.tap]
        g = c = 0.0
        for start in range(0, x.shape[0], step):
            inputs, sown = _forward(variables, x[start : start + step], module=module, paths=paths)
            want = sown[unit.plan][unit.tap].shape
            if y.shape[1:] != want[1:]:
                raise FusionError(
                    f"refit: the targets of plan {unit.plan!r} (tensor {unit.tap}) have shape {tuple(y.shape)}; the "
                    f"fused model sows {(y.shape[0],) + tuple(want[1:])} there"
                )
            gi, ci = _unit_grams(
                tuple(inputs[layer.path] for layer in unit.layers), effective, sown[unit.plan][unit.tap],
                y[start : start + step], rows=tuple(layer.rows for layer in unit.layers),
            )
            g, c = g + gi, c + ci
        d = g.shape[0]
        # Directions no sample reaches (a conv tap that only ever sees padding) keep the averaged weights.
        lam = max(config.ridge, MIN_RIDGE) * jnp.trace(g) / d + jnp.finfo(jnp.float32).tiny
        w = jnp.linalg.solve(g + lam * jnp.eye(d, dtype=g.dtype), c + lam * w0)  # LU: robust where float32 rounding breaks Cholesky
        row = 0
        for layer in unit.layers:
            k = _kernel_rows(flat[layer.kernel]).shape[0]
            has_b = layer.bias is not None or layer.norm is not None
            _set_effective(layer, flat, w[row : row + k], w[row + k] if has_b else None)
            row += k + has_b
    return spec_lib.unflatten_paths(flat)
