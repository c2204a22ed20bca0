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
solved plain; models keep their widths. On the held-out images of the Fashion MLPNet pair it took every alignment
to within half a point of the parents (docs/RESULTS.md, "Least-squares refit").

Scope: models in which every plan is produced by one Dense or Conv layer (bias optional) whose output is the
plan's sown pre-activation: MLPs and VGGs without BatchNorm. :func:`check_spec` refuses norms, attention heads
and residual sums by name.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import linear as flax_linear

from otfusion_jax import engine, models
from otfusion_jax import plans as plans_lib
from otfusion_jax import spec as spec_lib
from otfusion_jax.engine import FusionError

__all__ = ["RefitConfig", "Layer", "check_spec", "moved_mean_activations", "refit", "design_rows"]

Variables = Mapping[str, Any]
MIN_RIDGE = 1e-6  # ridge 0 is read as this: plain least squares where the samples reach, the average elsewhere


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
      batch_size: samples per pass when accumulating ``A^T A`` and ``A^T Y`` (memory, not results).
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
    """One refitted layer: the plan it produces, its module path and its leaves."""

    plan: str
    path: tuple[str, ...]  # the Flax module path, e.g. ("conv3",)
    kernel: str  # the kernel's leaf path, e.g. "params/conv3/kernel"
    bias: str | None


def check_spec(spec: spec_lib.AlignmentSpec) -> list[Layer]:
    """The layers to refit, in the spec's plan order; FusionError for what the refit cannot regress.

    Every plan needs exactly one producing kernel (and at most one bias, of the same layer); norms, attention
    heads, embeddings and residual sums are refused, naming the leaf or plan.
    """
    if spec.heads:
        raise FusionError(f"refit: the spec has attention heads ({', '.join(g.plans[0] for g in spec.heads)})")
    if spec.streams or spec.taps or spec.permutation_only:
        raise FusionError("refit: the spec has residual streams; a sum of several layers is not one regression")
    what = {
        "norm": "a normalisation layer's scale or bias",
        "stat": "a BatchNorm running statistic",
        "additive": "a tensor added into a stream (an embedding)",
    }
    for path, ls in spec.leaves:
        if ls.role in what:
            raise FusionError(
                f"refit: leaf {path} is {what[ls.role]}; the refit regresses Dense and Conv layers without "
                "normalisation (use REPAIR for models with BatchNorm)"
            )
    layers = []
    for plan in spec.plans:
        kernels = spec.producers(plan, ("weight",))
        biases = spec.producers(plan, ("bias",))
        if len(kernels) != 1 or len(biases) > 1:
            raise FusionError(
                f"refit: plan {plan!r} is produced by {len(kernels)} kernels {kernels}"
                + (" (a residual stream: the sum of several layers is not one regression)" if len(kernels) > 1 else "")
                + "; the refit needs one layer per plan"
            )
        module_path = kernels[0].rsplit("/", 1)[0]
        if biases and biases[0].rsplit("/", 1)[0] != module_path:
            raise FusionError(f"refit: plan {plan!r}'s bias {biases[0]} is not in the layer of {kernels[0]}")
        parts = tuple(module_path.split("/"))
        if parts[0] != "params" or len(parts) < 2:
            raise FusionError(f"refit: kernel {kernels[0]} is not under 'params/'")
        layers.append(Layer(plan, parts[1:], kernels[0], biases[0] if biases else None))
    return layers


def moved_mean_activations(
    parents: Sequence[tuple[nn.Module, Variables]],
    plans: Sequence[Mapping[str, Any] | None],
    x: jax.Array,
    *,
    weights: Sequence[float] | None = None,
) -> dict[str, jax.Array]:
    """The regression targets: ``sum_k w_k Z_k T_k`` per plan, each parent's pre-activations moved by its plan.

    Args:
      parents: K ``(module, variables)`` pairs, each parent's own architecture.
      plans: per parent, plan name -> plan (an (n_parent, n_target) matrix as in ``engine.FusionAux.plans``, a
        ``plans.Permutation`` or the output side of a ``plans.Linear``); None: the target, as it is.
      x: (S, ...) samples.
      weights: (K,) averaging weights (None: 1/K; normalised as ``engine.fuse`` does).

    Returns:
      plan name -> (S, ..., n_target) array (a plan's first sown tensor: its layer's pre-activation).
    """
    w = [float(v) for v in np.asarray(engine.averaging_weights(len(parents), weights))]
    out: dict[str, jax.Array] = {}
    for wk, (module, variables), moves in zip(w, parents, plans):
        acts = models.capture_activations(module, dict(variables), x, "pre")
        for name, tensors in acts.items():
            z = tensors[0]
            if moves is not None and name in moves:
                z = z @ plans_lib.as_matrix(moves[name]).astype(z.dtype)
            out[name] = out[name] + wk * z if name in out else wk * z
    return out


def _rank_tuple(value: Any, rank: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * rank
    if isinstance(value, int):
        return (value,) * rank
    return tuple(value)


def design_rows(layer: nn.Module, x: jax.Array) -> jax.Array:
    """The rows ``A`` with ``layer(x) = A @ kernel_rows (+ bias)``: a Dense layer's inputs, a Conv layer's patches.

    A Conv kernel ``(*window, C, n)`` is read as rows ordered ``(C, *window)``: :func:`_kernel_rows`.
    """
    if isinstance(layer, nn.Dense):
        return x.reshape(-1, x.shape[-1])
    if not isinstance(layer, nn.Conv):
        raise FusionError(f"refit: layer {'/'.join(layer.path)} is a {type(layer).__name__}, not Dense or Conv")
    rank = x.ndim - 2
    padding = flax_linear.canonicalize_padding(layer.padding, rank)
    if layer.feature_group_count != 1 or (isinstance(padding, str) and padding not in ("SAME", "VALID")):
        raise FusionError(
            f"refit: conv {'/'.join(layer.path)} has feature groups or {layer.padding!r} padding; not supported"
        )
    letters = "DHW"[-rank:] if rank <= 3 else None
    if letters is None:
        raise FusionError(f"refit: conv {'/'.join(layer.path)} has {rank} spatial axes; at most 3 are supported")
    patches = jax.lax.conv_general_dilated_patches(
        x,
        tuple(layer.kernel_size),
        _rank_tuple(layer.strides, rank, 1),
        padding,
        lhs_dilation=_rank_tuple(layer.input_dilation, rank, 1),
        rhs_dilation=_rank_tuple(layer.kernel_dilation, rank, 1),
        dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"),
    )
    return patches.reshape(-1, patches.shape[-1])


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


def _layer_modules(module: nn.Module, variables: Variables, x: jax.Array, paths: Sequence[tuple[str, ...]]):
    """The bound layer modules at ``paths`` (their kernel size, strides, ...), from one traced call."""
    found: dict[tuple[str, ...], nn.Module] = {}
    wanted = set(paths)

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and tuple(context.module.path) in wanted:
            found.setdefault(tuple(context.module.path), context.module)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, xx: module.apply(v, xx, train=False), dict(variables), x[:1])
    missing = [p for p in paths if p not in found]
    if missing:
        raise FusionError(f"refit: the model never calls the layers {['/'.join(p) for p in missing]}")
    return found


@functools.partial(jax.jit, static_argnames=("module", "where", "has_bias"))
def _grams(variables, x, y, *, module: nn.Module, where: tuple[str, ...], has_bias: bool):
    """``(A^T A, A^T Y)`` of the layer at ``where`` in the model ``variables`` on samples ``x`` (targets ``y``)."""
    got = {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and tuple(context.module.path) == where and "a" not in got:
            got["a"] = design_rows(context.module, args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        module.apply(variables, x, train=False)
    a = got["a"].astype(jnp.float32)
    if has_bias:
        a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
    yy = y.reshape(a.shape[0], -1).astype(jnp.float32)
    return a.T @ a, a.T @ yy


def refit(
    module: nn.Module,
    fused: Variables,
    spec: spec_lib.AlignmentSpec,
    x: jax.Array,
    targets: Mapping[str, jax.Array],
    config: RefitConfig = RefitConfig(),
) -> dict[str, Any]:
    """The fused model with every layer refitted by ridge regression, in forward order (module docstring).

    Args:
      module: the fused model's module (the target's architecture).
      fused: its variables (the aligned parents' average).
      spec: its alignment spec (:func:`check_spec`).
      x: (S, ...) samples, the same the targets were computed on.
      targets: plan name -> (S, ..., n) pre-activations the plans ask for (:func:`moved_mean_activations`).
      config: ridge and batch size (``config.num_samples`` is the caller's: it draws ``x``).

    Returns:
      The refitted variables (the other collections as they were).
    """
    layers = check_spec(spec)
    for layer in layers:
        if layer.plan not in targets:
            raise FusionError(f"refit: no target activations for plan {layer.plan!r}")
        if targets[layer.plan].shape[0] != x.shape[0]:
            raise FusionError(
                f"refit: the targets of plan {layer.plan!r} are on {targets[layer.plan].shape[0]} samples, x has {x.shape[0]}"
            )
    flat = dict(spec_lib.flatten_paths(dict(fused)))
    _layer_modules(module, spec_lib.unflatten_paths(flat), x, [layer.path for layer in layers])
    step = config.batch_size
    for layer in layers:
        kernel = flat[layer.kernel]
        w0 = _kernel_rows(kernel).astype(jnp.float32)
        if layer.bias is not None:
            w0 = jnp.concatenate([w0, flat[layer.bias].reshape(1, -1).astype(jnp.float32)], axis=0)
        variables = spec_lib.unflatten_paths(flat)
        g = c = 0.0
        for start in range(0, x.shape[0], step):
            gi, ci = _grams(
                variables, x[start : start + step], targets[layer.plan][start : start + step],
                module=module, where=layer.path, has_bias=layer.bias is not None,
            )
            g, c = g + gi, c + ci
        d = g.shape[0]
        # Directions no sample reaches (a conv tap that only ever sees padding) keep the averaged weights.
        lam = max(config.ridge, MIN_RIDGE) * jnp.trace(g) / d + jnp.finfo(jnp.float32).tiny
        w = jax.scipy.linalg.solve(g + lam * jnp.eye(d, dtype=g.dtype), c + lam * w0, assume_a="pos")
        if layer.bias is not None:
            flat[layer.bias] = w[-1].reshape(flat[layer.bias].shape).astype(flat[layer.bias].dtype)
            w = w[:-1]
        flat[layer.kernel] = _rows_kernel(w, kernel.shape).astype(kernel.dtype)
    return spec_lib.unflatten_paths(flat)
