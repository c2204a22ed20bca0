"""REPAIR (Jordan et al., 2023, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair").

Averaging two aligned networks shrinks the variance of the hidden units'
pre-activations ("variance collapse"), which is a large part of the accuracy a
one-shot fusion loses. REPAIR measures, on a few samples ``x``, each hidden
neuron's pre-activation mean and standard deviation in every aligned parent,
interpolates them like the weights, and rescales and shifts the fused model's
neurons so that its own pre-activation statistics on ``x`` equal those targets:

    target_mean = sum_k w_k * mean_k     (w: the fusion's averaging weights, 1/K by default)
    target_std  = sum_k w_k * std_k
    pre'        = (pre - mean_fused) * target_std / std_fused + target_mean

>>> aligned, aux = otf.align_parents([a, b], spec, cfg)
>>> fused = otf.engine.weighted_sum(aligned, aux.weights)
>>> repaired = repair(model, fused, aligned, spec, x_train[:500], weights=aux.weights)

Two cases, chosen from the variables:

* **No BatchNorm** (no ``batch_stats``): the affine correction is folded into
  the layer producing the plan: its kernel's output columns are multiplied by
  ``s = target_std / std_fused`` and its bias becomes
  ``(bias - mean_fused) * s + target_mean``. This needs a bias on every
  corrected layer: REPAIR of a bias-free model needs that model rebuilt with
  ``bias=True`` (``models.build(name, bias=True, ...)`` gives the module and
  spec) and its variables given zero biases (``add_zero_biases``), which
  computes the same function. Layers are corrected in the spec's
  (topological) order, each from the fused model's statistics *after* the
  corrections upstream of it; a correction never changes the statistics of
  the layers before it, so all corrected layers end up matching their targets.
  **Residual streams** (a ResNet without BatchNorm: a plan produced by several
  layers, the model sowing the stream after each sum) are ours, not the
  paper's: sum by sum, the layers added at that sum (found by
  :func:`stream_sums`) are scaled by the per-channel ``a > 0`` for which the
  sum (skip connection + branch) gets the target std, and shifted to its mean
  (``_repair_sum``, in the order of ``_repair_order``); each tap's target is that tap's statistics.
* **BatchNorm models**: REPAIR amounts to resetting the running statistics
  on ``x`` (``models.recompute_batch_stats``): each BatchNorm then
  standardises its input over ``x`` and applies the fused (interpolated)
  scale and bias, so its output's mean and std on ``x`` are the interpolated
  parents' bias and |scale|: the parents' own statistics when their running
  statistics describe ``x``. The parents are not needed in this case, unless
  ``include_output``: the logits are then corrected as in the first case,
  after the reset (the class layer needs a bias).

The output (class) layer is left alone unless ``include_output`` (Jordan et
al. correct hidden units only; the logits' correction is ours: on held-out
images it lowers the loss of soft-plan fusions by half, docs/RESULTS.md). Transformers
(specs with permutation-only streams and attention head groups): only the MLP
hidden units are corrected; LayerNorm renormalises the stream for every
reader, and queries/keys/values are left as they are (``_corrected_plans``). Stds are
biased (over the S samples, and space for conv layers); ``eps`` floors the
fused std in the ratio. Identical parents and fused model are a fixed point
(scale exactly 1, shift exactly 0 up to float rounding).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from otfusion_jax import engine, models
from otfusion_jax import plans as plans_lib
from otfusion_jax import spec as spec_lib

__all__ = [
    "repair",
    "preactivation_stats",
    "target_stats",
    "moved_target_stats",
    "add_zero_biases",
    "check_repairable",
    "stream_sums",
]

Variables = Mapping[str, Any]


def _stats(acts: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per-neuron mean and std over every axis but the last: ``(n,)`` each for one tensor; for several (the taps
    of a residual stream, one after each sum) ``(T, n)`` each, one row per tensor."""
    if len(acts) > 1:
        per = [_stats([a]) for a in acts]
        return jnp.stack([m for m, _ in per]), jnp.stack([sd for _, sd in per])
    x = acts[0].reshape(-1, acts[0].shape[-1]).astype(jnp.float32)
    return jnp.mean(x, axis=0), jnp.std(x, axis=0)


def preactivation_stats(module: nn.Module, variables: Variables, x: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Per-plan, per-neuron pre-activation (mean, std) of a model on samples ``x`` (eval mode).

    Args:
      module: a registered model (sows "pre" activations per plan).
      variables: its variables.
      x: (S, H, W, C) samples.

    Returns:
      plan name -> ((n,) mean, (n,) std), pooled over samples and space (biased
      std); a plan sown as T tensors (a residual stream's taps, one per sum): ((T, n), (T, n)).
    """
    return _preactivation_stats(dict(variables), x, module=module)


@functools.partial(jax.jit, static_argnames=("module",))
def _preactivation_stats(variables, x, *, module):
    acts = models.capture_activations(module, variables, x, "pre")
    return {name: _stats(a) for name, a in acts.items()}


def target_stats(
    module: nn.Module,
    parents_aligned: Sequence[Variables],
    x: jax.Array,
    *,
    weights: Sequence[float] | None = None,
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """The interpolated statistics REPAIR aims for: ``sum_k w_k * stats_k``.

    Args:
      module: the model (parents aligned into the fused model's shapes).
      parents_aligned: K aligned parents' variables.
      x: (S, H, W, C) samples.
      weights: (K,) interpolation weights (normalised by
        ``engine.averaging_weights``, as the fusion's): default 1/K.

    Returns:
      plan name -> ((n,) target mean, (n,) target std).
    """
    w = [float(v) for v in np.asarray(engine.averaging_weights(len(parents_aligned), weights))]
    per = [preactivation_stats(module, p, x) for p in parents_aligned]
    return {
        name: (
            sum(wk * s[name][0] for wk, s in zip(w, per)),
            sum(wk * s[name][1] for wk, s in zip(w, per)),
        )
        for name in per[0]
    }


def moved_pre_activations(
    module: nn.Module, variables: Variables, moves: Mapping[str, Any] | None, x: jax.Array
) -> dict[str, tuple[jax.Array, ...]]:
    """A parent's sown pre-activations on ``x``, each plan's tensors moved by its plan's output side (``x @ T``).

    ``moves``: plan name -> plan (an (n_parent, n_target) matrix, a ``plans.Permutation``, a ``plans.Linear``);
    None: the target, as it is. Shared by REPAIR's :func:`moved_target_stats` and the least-squares refit.
    """
    acts = models.capture_activations(module, dict(variables), x, "pre")
    if moves is None:
        return acts
    mats = {n: plans_lib.as_matrix(p) for n, p in moves.items()}
    return {n: tuple(a @ mats[n].astype(a.dtype) for a in t) if n in mats else t for n, t in acts.items()}


def moved_target_stats(
    parents: Sequence[tuple[nn.Module, Variables]],
    plans: Sequence[Mapping[str, jax.Array] | None],
    x: jax.Array,
    *,
    weights: Sequence[float] | None = None,
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """REPAIR's targets from the parents as they are, their pre-activations moved by the plans: ``sum_k w_k * stats(Z_k T_k)``.

    For permutations this is :func:`target_stats` of the aligned parents (a permuted parent computes its own
    pre-activations, permuted). For plans that are not (CCA Merge's linear maps, soft plans) an aligned parent is
    not the same function as the parent: its pre-activations past the first layer drift, and the statistics of
    ``Z_k T_k`` (each neuron's mean and std of what the plan asks of it) are the ones to restore. On held-out
    images this turns REPAIR of CCA Merge from a loss (87.20% -> 86.18% on the Fashion MLPNet pair) into a gain
    (docs/RESULTS.md, "CCA Merge").

    Args:
      parents: K ``(module, variables)`` pairs, each parent's own architecture.
      plans: per parent, plan name -> plan (an (n_parent, n_target) matrix as in ``engine.FusionAux.plans``, or a
        ``plans.Permutation`` / ``plans.Linear``: its output side); None: the target, taken as it is.
      x: (S, H, W, C) samples.
      weights: (K,) interpolation weights (as :func:`target_stats`).

    Returns:
      plan name -> ((n,) target mean, (n,) target std), the target's widths.
    """
    w = [float(v) for v in np.asarray(engine.averaging_weights(len(parents), weights))]
    per = []
    for (module, variables), moves in zip(parents, plans):
        acts = moved_pre_activations(module, variables, moves, x)
        per.append({name: _stats(a) for name, a in acts.items()})
    return {
        name: (sum(wk * s[name][0] for wk, s in zip(w, per)), sum(wk * s[name][1] for wk, s in zip(w, per)))
        for name in per[0]
    }


def _corrected_plans(spec: spec_lib.AlignmentSpec, include_output: bool) -> list[str]:
    """The plans REPAIR corrects: all but the output plan, and for transformers all but the stream and the heads.

    A permutation-only plan is a residual stream read through LayerNorm: every
    reader renormalises it, so its collapsed scale is restored where it is
    used (LayerNorm-aware REPAIR leaves it alone). Attention's head groups are
    left alone too: rescaling queries and keys would change the softmax's
    temperature, not restore a unit's statistics. That leaves the MLP hidden units.
    """
    skip = set(spec.permutation_only) | {p for g in spec.heads for p in g.plans}
    return [p for p in spec.plans if (include_output or p != spec.output_plan) and p not in skip]


def check_repairable(
    spec: spec_lib.AlignmentSpec,
    variables: Variables,
    include_output: bool = False,
    plans: Sequence[str] | None = None,
) -> dict[str, tuple[tuple[str, str], ...]]:
    """Checks that REPAIR can fold its correction into the layers (no-BatchNorm case, or the logits).

    Args:
      spec: the model's alignment spec.
      variables: the fused variables.
      include_output: also correct the output plan.
      plans: the plans to check instead (None: every plan REPAIR corrects, ``include_output`` included).

    Returns:
      plan name -> the ``(kernel path, bias path)`` of every layer producing it (several for a residual stream).

    Raises:
      ValueError: a producing layer without a bias (the message says what to do), or a plan no layer produces.
    """
    flat = spec_lib.flatten_paths(variables)
    layers = {}
    for plan in _corrected_plans(spec, include_output) if plans is None else plans:
        pairs = []
        for kernel in spec.producers(plan, ("weight",)):
            bias = kernel.rsplit("/", 1)[0] + "/bias"
            if bias not in flat or spec.leaf_map.get(bias) is None:
                raise ValueError(
                    f"REPAIR (without BatchNorm, or of the logits) needs a bias on the layer producing plan {plan!r} "
                    f"({kernel}): rebuild the model with bias=True (models.build(..., bias=True)) "
                    "and give its variables zero biases with repair.add_zero_biases(variables, spec)"
                )
            pairs.append((kernel, bias))
        if not pairs:
            raise ValueError(f"REPAIR: no layer produces plan {plan!r}")
        layers[plan] = tuple(pairs)
    return layers


def _zeroed(variables: Variables, paths: Sequence[str]) -> dict[str, Any]:
    """``variables`` with the leaves at ``paths`` set to zero."""
    flat = dict(spec_lib.flatten_paths(variables))
    for path in paths:
        flat[path] = jnp.zeros_like(flat[path])
    return spec_lib.unflatten_paths(flat)


def _reach(
    module: nn.Module, variables: Variables, x: jax.Array, kernels: Sequence[str]
) -> tuple[dict[str, int], dict[str, frozenset[tuple[str, int]]]]:
    """Probes the model: each kernel set to zero in turn, the sown pre-activation tensors ``(plan, i)`` that change.

    Eager (not traceable): one forward pass per kernel. Returns ``(taps per plan, kernel -> the tensors it reaches)``.
    """
    base = models.capture_activations(module, dict(variables), x, "pre")
    reach = {}
    for kernel in kernels:
        probe = models.capture_activations(module, _zeroed(variables, (kernel,)), x, "pre")
        reach[kernel] = frozenset(
            (name, i) for name in base for i, (a, b) in enumerate(zip(base[name], probe[name]))
            if float(jnp.max(jnp.abs(a - b))) > 1e-6 * max(float(jnp.max(jnp.abs(a))), 1e-30)
        )
    return {name: len(t) for name, t in base.items()}, reach


def _sums_from(plan: str, taps: int, kernels: Sequence[str], reach: Mapping[str, frozenset]) -> tuple[tuple[str, ...], ...]:
    """:func:`stream_sums` from a probe (:func:`_reach`): each kernel at the first of the stream's taps it reaches."""
    sums: list[list[str]] = [[] for _ in range(taps)]
    for kernel in kernels:
        changed = sorted(i for name, i in reach[kernel] if name == plan)
        if not changed:
            raise ValueError(f"REPAIR: layer {kernel} changes no tap of stream {plan!r} on the samples")
        sums[changed[0]].append(kernel)
    return tuple(tuple(k) for k in sums)


def stream_sums(
    module: nn.Module, variables: Variables, spec: spec_lib.AlignmentSpec, plan: str, x: jax.Array
) -> tuple[tuple[str, ...], ...]:
    """The kernels added into a residual stream at each of its sums, found by probing the model.

    The model sows the stream's pre-activation after every sum (its taps, in the order it computes them). A
    producer of ``plan`` is added at the first tap that changes when its kernel is set to zero. Eager (not
    traceable): the answer decides how :func:`repair` corrects the stream.

    Returns:
      Per tap, the kernel paths added there (a ResNet stage's first sum: the block's last conv and its projection
      shortcut; then one block's last conv per sum).

    Raises:
      ValueError: a producer that changes no tap (its output never reaches the stream on ``x``).
    """
    kernels = spec.producers(plan, ("weight",))
    taps, reach = _reach(module, variables, x, kernels)
    return _sums_from(plan, taps[plan], kernels, reach)


def _bias_shape(kernel: Any, n: int) -> tuple[int, ...]:
    """A layer's bias shape: the shortest trailing axes of its kernel holding its ``n`` outputs (Flax's
    ``DenseGeneral`` attention kernels ``(embed, heads, head_dim)`` have ``(heads, head_dim)`` biases); ``(n,)``."""
    if kernel is not None:
        for k in range(len(kernel.shape) - 1, -1, -1):
            if math.prod(kernel.shape[k:]) == n:
                return tuple(kernel.shape[k:])
    return (n,)


def add_zero_biases(variables: Variables, spec: spec_lib.AlignmentSpec) -> dict[str, Any]:
    """Adds the zero biases a bias-free model's variables lack for ``spec`` (a with-bias spec).

    The variables then compute the same function with the module built with
    ``bias=True``, and REPAIR can shift their neurons.

    Args:
      variables: variables of the bias-free model.
      spec: the alignment spec of the same model built with ``bias=True``.

    Returns:
      Variables with every leaf of ``spec`` (added biases are zeros).

    Raises:
      ValueError: a missing leaf that is not a bias, or a plan whose size
        cannot be read from the present leaves.
    """
    flat = dict(spec_lib.flatten_paths(variables))
    sizes: dict[str, tuple[int, Any]] = {}
    lm = spec.leaf_map
    for path, leaf in flat.items():
        ls = lm.get(path)
        if ls is None:
            continue
        view = spec_lib.view_shape(ls, leaf.shape, path)
        for ax, name in enumerate(ls.axes):
            if name is not None:
                sizes.setdefault(name, (view[ax], leaf.dtype))
    for path, ls in spec.leaves:
        if path in flat:
            continue
        if ls.role != "bias":
            raise ValueError(f"add_zero_biases: leaf {path} is missing and is not a bias")
        name = ls.axes[-1]
        if name not in sizes:
            raise ValueError(f"add_zero_biases: no present leaf tells the size of plan {name!r} for {path}")
        n, dtype = sizes[name]
        flat[path] = jnp.zeros(_bias_shape(flat.get(path.rsplit("/", 1)[0] + "/kernel"), n), dtype)
    try:
        spec.check_variables(flat)
    except spec_lib.SpecError as e:
        raise ValueError(str(e)) from None
    return spec_lib.unflatten_paths(flat)


@functools.partial(jax.jit, static_argnames=("module", "spec", "plans", "eps", "sums"))
def _repair_layers(fused, targets, x, *, module, spec, plans, eps, sums=()):
    """Corrects ``plans`` in order; a plan in ``sums`` (a residual stream) is one entry per sum: ``plans`` then holds
    ``(plan, i)`` for its sum i, in the forward order of ``_repair_order``."""
    layers = check_repairable(spec, fused, plans=tuple(dict.fromkeys(u[0] if isinstance(u, tuple) else u for u in plans)))
    sums = dict(sums)
    current = dict(fused)
    for unit in plans:
        if isinstance(unit, tuple):
            plan, i = unit
            bias_of = dict(layers[plan])
            added = tuple((k, bias_of[k]) for k in sums[plan][i])
            current = _repair_sum(current, targets[plan], x, module, plan, i, added, eps)
            continue
        plan = unit
        ((kernel_path, bias_path),) = layers[plan]
        acts = models.capture_activations(module, current, x, "pre")[plan]
        if len(acts) != 1:
            raise ValueError(f"REPAIR: plan {plan!r} has {len(acts)} pre-activation tensors, expected one")
        mean_f, std_f = _stats(acts)
        mean_t, std_t = targets[plan]
        scale = std_t / jnp.maximum(std_f, eps)
        flat = dict(spec_lib.flatten_paths(current))
        kernel, bias = flat[kernel_path], flat[bias_path]
        flat[kernel_path] = (kernel * scale.astype(kernel.dtype)).astype(kernel.dtype)
        flat[bias_path] = ((bias - mean_f) * scale + mean_t).astype(bias.dtype)
        current = spec_lib.unflatten_paths(flat)
    return current


def _repair_order(
    plans: Sequence[str], sums: Mapping[str, Sequence[Sequence[str]]], layers: Mapping[str, Any], reach: Mapping[str, frozenset]
) -> tuple[Any, ...]:
    """The order in which to correct ``plans`` when some are residual streams (``sums``: :func:`stream_sums`).

    A stream's sums interleave with the layers inside its blocks, so neither the spec's order nor plan by plan
    works. Each unit (a plan, or a stream's sum ``(plan, i)``) reaches the tensors its layers reach when zeroed
    (the probe :func:`_reach`); units are sorted by how many (everything downstream changes too: an upstream unit
    always reaches more), ties in the spec's order.
    """
    units: list[tuple[Any, Sequence[str]]] = []
    for plan in plans:
        if plan in sums:
            units += [((plan, i), kernels) for i, kernels in enumerate(sums[plan]) if kernels]
        else:
            units.append((plan, [k for k, _ in layers[plan]]))
    size = [len(frozenset().union(*(reach[k] for k in kernels))) for _, kernels in units]
    order = sorted(range(len(units)), key=lambda j: -size[j])  # stable: ties keep the spec's order
    return tuple(units[j][0] for j in order)


def _repair_sum(current, target, x, module, plan, i, added, eps):
    """Sum i of a residual stream without BatchNorm: its tap is ``x_i + c_i``, where ``c_i`` is what the layers added
    at that sum (``added``: their (kernel, bias) paths) produce and ``x_i`` what the skip connection carries. Those layers' outputs become ``a c_i + b``
    per channel, with a > 0 solving ``var(x_i + a c_i) = target var`` (``a^2 var(c) + 2 a cov(x, c) + var(x) = v``)
    and b giving the target mean (of two positive roots, the one closer to 1). Where no positive a reaches the
    target (e.g. the skip connection alone carries more variance than the target and does not anticorrelate
    with the branch), a stays 1 and only the mean moves.
    """
    flat = dict(spec_lib.flatten_paths(current))
    tap = models.capture_activations(module, current, x, "pre")[plan][i]
    n = tap.shape[-1]
    mean_t, std_t = (jnp.reshape(t, (-1, n)) for t in target)  # (taps, n): a stream sown once has (n,) targets
    skip = models.capture_activations(module, _zeroed(current, [p for pair in added for p in pair]), x, "pre")[plan][i]
    xs = skip.reshape(-1, n).astype(jnp.float32)
    cs = (tap - skip).reshape(-1, n).astype(jnp.float32)
    mx, mc = jnp.mean(xs, 0), jnp.mean(cs, 0)
    vx, vc = jnp.var(xs, 0), jnp.var(cs, 0)
    cov = jnp.mean((xs - mx) * (cs - mc), 0)
    disc = cov**2 - vc * (vx - std_t[i] ** 2)
    sq = jnp.sqrt(jnp.maximum(disc, 0.0))
    hi, lo = ((-cov + sq) / jnp.maximum(vc, eps**2), (-cov - sq) / jnp.maximum(vc, eps**2))
    # Of the positive roots, the one closer to 1: the smaller change to the fused weights.
    root = jnp.where((lo > 0) & (jnp.abs(lo - 1.0) < jnp.abs(hi - 1.0)), lo, hi)
    a = jnp.where((disc >= 0) & (root > 0) & (vc > eps**2), root, 1.0)
    b = mean_t[i] - a * mc - mx
    for j, (k, bias_path) in enumerate(added):
        kernel, bias = flat[k], flat[bias_path]
        flat[k] = (kernel * a.astype(kernel.dtype)).astype(kernel.dtype)
        flat[bias_path] = (bias * a + (b if j == 0 else 0.0)).astype(bias.dtype)
    return spec_lib.unflatten_paths(flat)


def repair(
    module: nn.Module,
    fused: Variables,
    parents_aligned: Sequence[Variables],
    spec: spec_lib.AlignmentSpec,
    x: jax.Array,
    *,
    weights: Sequence[float] | None = None,
    eps: float = 1e-6,
    include_output: bool = False,
    targets: Mapping[str, tuple[jax.Array, jax.Array]] | None = None,
) -> dict[str, Any]:
    """REPAIR of a fused model: its pre-activation statistics on ``x`` become the parents' interpolation.

    Args:
      module: the (fused) model; the aligned parents share its shapes.
      fused: the fused variables (e.g. ``fusion.fuse`` or
        ``matching.fuse_weight_matching`` output).
      parents_aligned: the K parents aligned onto the fused model's neuron
        order (the target parent as it is); unused with BatchNorm unless ``include_output``.
      spec: the model's alignment spec.
      x: (S, H, W, C) samples, e.g. a few hundred training images.
      weights: (K,) interpolation weights, the fusion's (``aux.weights``); default 1/K.
      eps: floor on the fused model's std (a dead neuron's scale stays finite).
      include_output: also correct the output (logit) layer.
      targets: the statistics to restore, plan name -> (mean, std), instead of the aligned parents'
        (e.g. :func:`moved_target_stats`); ``parents_aligned`` is then not read.

    Returns:
      The repaired variables, same structure as ``fused``.

    Raises:
      ValueError: a corrected layer (without BatchNorm: every one; with it and
        ``include_output``: the class layer) without bias (see ``check_repairable``), or a residual stream's
        layer that changes none of its taps on ``x`` (``stream_sums``).
    """
    fused = dict(fused)
    if "batch_stats" in fused:
        fused = models.recompute_batch_stats(module, fused, x)
        # The BatchNorms are reset; the logits (if asked for) are corrected as without BatchNorm, below.
        plans = (spec.output_plan,) if include_output and spec.output_plan else ()
        if not plans:
            return fused
    else:
        plans = tuple(_corrected_plans(spec, include_output))
    layers = check_repairable(spec, fused, plans=plans)
    if targets is None:
        if not parents_aligned:
            raise ValueError("REPAIR needs the aligned parents (at least one) or the targets")
        targets = target_stats(module, parents_aligned, x, weights=weights)
    sums = {}
    if any(len(layers[p]) > 1 for p in plans):  # residual streams: their sums interleave with the blocks' layers
        kernels = [k for p in plans for k, _ in layers[p]]
        taps, reach = _reach(module, fused, x, kernels)  # one probe serves the sums and their order
        sums = {p: _sums_from(p, taps[p], [k for k, _ in layers[p]], reach) for p in plans if len(layers[p]) > 1}
        plans = _repair_order(plans, sums, layers, reach)
    return _repair_layers(
        fused, targets, x, module=module, spec=spec, plans=plans, eps=float(eps), sums=tuple(sums.items())
    )
