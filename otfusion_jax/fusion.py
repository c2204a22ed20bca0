"""OTFusion as one pure function: align every parent onto a target, layer by layer, and average.

>>> model, spec = otf.models.build("mlpnet", bias=False)
>>> fused, aux = otf.fuse([vars_a, vars_b], spec, otf.FusionConfig(mode="weights", solver="exact"))

Per plan (in the spec's order) and per non-target parent A:

1. the producers of the plan (leaves whose output axis it is) are read with
   their input axes aligned by the plans already computed;
2. the ground cost between A's and the target's neurons: rows of those aligned
   weights (weight mode) or the neurons' activations on the same samples
   (activation mode);
3. a transport plan (exact or Sinkhorn), then the correction (each target
   neuron becomes a barycentre of A's neurons);
4. once all plans are known, every leaf of A is contracted with the corrected
   plan of each of its axes, so A lives in the target's neuron order and
   widths;
5. the aligned parents are averaged with weights (1/K, or given).

Where we differ from the original on purpose (documented in README/docs):

* skip connections: tensors added in one residual sum share one plan (the
  spec says which), instead of averaging plans guessed from kernel shapes;
* biases and BatchNorm parameters and statistics follow their layer's plan;
  biases are an extra cost feature (``bias_in_cost``);
* non-proper correction multiplies by the target width m (the original by n,
  only defined for n == m, where they agree);
* K > 2 parents are aligned onto one target in one call;
* the output (class) layer is not given a plan of its own by default
  (``align_output=False``): classes are not interchangeable neurons.
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from otfusion_jax import ot
from otfusion_jax import spec as spec_lib

__all__ = [
    "FusionConfig",
    "FusionAux",
    "FusionError",
    "fuse",
    "align",
    "apply_plans",
    "vanilla_average",
    "check_parents",
    "check_finite",
    "warn_unconverged",
]

Variables = Mapping[str, Any]
Activations = Mapping[str, Sequence[jax.Array]]


class FusionError(ValueError):
    """Parents, activations or options that cannot be fused; the message names the culprit."""


EXACT_BACKENDS = ("device", "auction", "host")


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """Options of the fusion pass (static under jit: frozen and hashable).

    Attributes:
      mode: "weights" (costs between incoming weights) or "activations" (costs
        between the neurons' activations on shared samples).
      solver: "exact" or "sinkhorn".
      exact_backend: square uniform problems (the rest always use the host's
        exact LP): "device" (optax Hungarian: jit/vmap-able, sequential),
        "auction" (``ot.exact_assignment_auction``: parallel rounds on device;
        optimal for the cost rounded to a grid of range / (2^26 / (n + 1)),
        i.e. within n grid steps of the optimum in total; the candidate for
        GPUs and vmap) or "host" (scipy assignment through a host callback;
        the fastest on a CPU backend).
      auction_bidders: "auction" only: free rows bidding per round (None: 16 on
        a CPU backend, all on accelerators).
      ground_metric: "euclidean" or "cosine".
      squared: squared euclidean distance (the original's default is squared;
        all its published commands use ``--not-squared``, i.e. False).
      normalize_cost: "none", "log", "max", "median" or "mean".
      unit_norm_rows: weight mode: scale each neuron's row to unit norm for the cost.
      bias_in_cost: weight mode: biases are an extra feature of each neuron's row.
      epsilon: Sinkhorn regularisation.
      relative_epsilon: None (absolute epsilon), "mean" or "std" (relative to the cost).
      sinkhorn_threshold: Sinkhorn stopping threshold on the marginal error.
      sinkhorn_max_iterations: Sinkhorn iteration cap.
      implicit_diff: gradients through Sinkhorn by implicit differentiation
        (True) or by unrolling (False: robust in float32, the default).
      tau: unbalanced Sinkhorn marginal relaxation (1.0 = balanced).
      correction: rescale plans so each target neuron is a barycentre.
      proper_marginals: correction divides by the plan's actual column sums.
      past_correction: fuse the input-aligned weights (all published commands);
        False reproduces the original's use of raw incoming weights.
      importance: None, "l1" or "l2": marginals from incoming-weight norms
        (not for the output plan).
      align_output: compute a plan for the output (class) layer like the
        original (True); False (default) keeps the classes in place and only
        aligns the layer's input. Class neurons have fixed meanings: a plan
        that is not the identity there permutes the predictions (on digits
        MLPNets, weight mode: 66% with it, 92% without).
      weights: per-parent averaging weights (normalised), or None for 1/K.
      ensemble_step: two parents only: weight s of the target, 1-s of the other
        (the original's ``--ensemble-step``); overrides ``weights``.
      target: index of the parent whose widths and neuron order the fused
        model takes (default the last, the original's model B).
    """

    mode: str = "weights"
    solver: str = "exact"
    exact_backend: str = "device"
    auction_bidders: int | None = None
    ground_metric: str = "euclidean"
    squared: bool = False
    normalize_cost: str = "none"
    unit_norm_rows: bool = False
    bias_in_cost: bool = True
    epsilon: float = 0.01
    relative_epsilon: str | None = None
    sinkhorn_threshold: float = 1e-3
    sinkhorn_max_iterations: int = 2000
    implicit_diff: bool = False
    tau: float = 1.0
    correction: bool = True
    proper_marginals: bool = False
    past_correction: bool = True
    importance: str | None = None
    align_output: bool = False
    weights: tuple[float, ...] | None = None
    ensemble_step: float | None = None
    target: int = -1

    def __post_init__(self):
        choices = {
            "mode": ("weights", "activations"),
            "solver": ("exact", "sinkhorn"),
            "exact_backend": EXACT_BACKENDS,
            "ground_metric": ot.METRICS,
            "normalize_cost": ot.COST_NORMS,
            "relative_epsilon": (None, "mean", "std"),
            "importance": (None, "l1", "l2"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise FusionError(f"FusionConfig.{name}={getattr(self, name)!r}; choose one of {allowed}")
        bidders = self.auction_bidders
        if bidders is not None:
            if isinstance(bidders, bool) or not isinstance(bidders, numbers.Integral) or bidders < 1:
                raise FusionError(f"FusionConfig.auction_bidders must be None or an int >= 1, got {bidders!r}")
            object.__setattr__(self, "auction_bidders", int(bidders))
        if not self.epsilon > 0:
            raise FusionError(f"FusionConfig.epsilon must be > 0, got {self.epsilon}")
        if not 0 < self.tau <= 1:
            raise FusionError(f"FusionConfig.tau must be in (0, 1], got {self.tau}")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))


class FusionAux(NamedTuple):
    """Side outputs of ``fuse``, one entry per parent (None for the target).

    Attributes:
      plans: per parent, plan name -> corrected plan (n_parent, n_target).
      info: per parent, plan name -> ot.PlanInfo (cost, converged, n_iters, error).
      weights: (K,) averaging weights used.
    """

    plans: tuple[dict[str, jax.Array] | None, ...]
    info: tuple[dict[str, ot.PlanInfo] | None, ...]
    weights: jax.Array


# ----------------------------------------------------------------------------- checks


def check_parents(
    parents: Sequence[Variables], spec: spec_lib.AlignmentSpec, target: int = -1
) -> list[dict[str, tuple[int, ...]]]:
    """Structural checks (static: shapes only). Raises FusionError naming the leaf.

    Every parent must have exactly the spec's leaves; sizes along plan axes may
    differ from the target's (different widths), all other axes must agree.

    Returns:
      Per parent, plan name -> size.
    """
    if len(parents) < 2:
        raise FusionError(f"fusion needs at least 2 parents, got {len(parents)}")
    if not -len(parents) <= target < len(parents):
        raise FusionError(f"target index {target} out of range for {len(parents)} parents")
    sizes = []
    for k, parent in enumerate(parents):
        try:
            sizes.append(spec.check_variables(parent, what=f"parent {k}"))
        except spec_lib.SpecError as e:
            raise FusionError(str(e)) from None
    t = target % len(parents)
    flat_t = spec_lib.flatten_paths(parents[t])
    for k, parent in enumerate(parents):
        flat = spec_lib.flatten_paths(parent)
        for path, ls in spec.leaves:
            a, b = flat[path].shape, flat_t[path].shape
            va, vb = spec_lib.view_shape(ls, a, path), spec_lib.view_shape(ls, b, path)
            for ax, name in enumerate(ls.axes):
                if name is None and va[ax] != vb[ax]:
                    raise FusionError(
                        f"parent {k}: leaf {path} has shape {tuple(a)} but the target has {tuple(b)}; "
                        f"axis {ax} carries no plan, so it must match"
                    )
            if flat[path].dtype != flat_t[path].dtype:
                raise FusionError(
                    f"parent {k}: leaf {path} has dtype {flat[path].dtype}, the target {flat_t[path].dtype}"
                )
    return sizes


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def check_finite(parents: Sequence[Variables]) -> None:
    """Raises FusionError naming the first parent and leaf holding NaN or Inf, or a non-float leaf.

    The check runs where the arrays live; only one flag per leaf comes to the host.
    """
    for k, parent in enumerate(parents):
        flat = spec_lib.flatten_paths(parent)
        for path, leaf in flat.items():
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                raise FusionError(f"parent {k}: leaf {path} has non-float dtype {jnp.result_type(leaf)}")
        flags = np.asarray(jax.device_get(_finite_flags(list(flat.values()))))
        if not flags.all():
            path = list(flat)[int(np.argmin(flags))]
            arr = np.asarray(flat[path])
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise FusionError(f"parent {k}: leaf {path} has {bad} NaN/Inf values")


def warn_unconverged(
    aux: FusionAux, threshold: float | None = None, *, config: FusionConfig | None = None
) -> list[str]:
    """Warns (and returns the messages) for every plan whose solver did not converge.

    That is Sinkhorn stopped by its iteration cap, or the auction
    (``exact_backend="auction"``) out of rounds. ``config`` picks the message;
    without it, a plan with marginal error 0 (exact solvers) is taken for the
    auction's.
    """
    messages = []
    for k, info in enumerate(aux.info):
        if info is None:
            continue
        for name, pi in info.items():
            conv = np.asarray(pi.converged)
            if not np.all(conv):
                err = float(np.max(np.asarray(pi.error)))
                auction = err == 0.0 if config is None else config.solver == "exact"
                if auction:
                    rounds = int(np.max(np.asarray(pi.n_iters)))
                    msg = (
                        f"the auction ran out of rounds for parent {k}, layer {name!r} after {rounds}: its plan is "
                        "a permutation but may not be optimal (use exact_backend='device' or 'host')"
                    )
                else:
                    msg = (
                        f"Sinkhorn did not converge for parent {k}, layer {name!r}: marginal error {err:.3g}"
                        + (f" > threshold {threshold:g}" if threshold is not None else "")
                        + " (raise sinkhorn_max_iterations or epsilon)"
                    )
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                messages.append(msg)
    return messages


def _is_concrete(tree: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------- plan algebra


def _contract(x: jax.Array, plan: jax.Array | ot.Permutation, axis: int) -> jax.Array:
    """Moves axis ``axis`` of x from source to target neurons: y[.., j, ..] = sum_i T[i, j] x[.., i, ..].

    A :class:`ot.Permutation` plan is applied as a gather.
    """
    if isinstance(plan, ot.Permutation):
        y = jnp.take(x, plan.index, axis=axis)
        return y if plan.scale == 1.0 else y * jnp.asarray(plan.scale, x.dtype)
    return jnp.moveaxis(jnp.tensordot(x, plan, axes=([axis], [0])), -1, axis)


def _aligned_leaf(
    leaf: jax.Array, ls: spec_lib.LeafSpec, plans: Mapping[str, jax.Array | ot.Permutation], axes: Sequence[int]
) -> jax.Array:
    """Contracts the given axes of a leaf (read through its view) with their plans.

    Returns the leaf in its viewed shape.
    """
    x = leaf.reshape(spec_lib.view_shape(ls, leaf.shape))
    for ax in axes:
        x = _contract(x, plans[ls.axes[ax]], ax)
    return x


def _rows(x: jax.Array) -> jax.Array:
    """(..., n) -> (n, features): one row per neuron of the last axis."""
    return jnp.moveaxis(x, -1, 0).reshape(x.shape[-1], -1)


def apply_plans(
    parent: Variables,
    spec: spec_lib.AlignmentSpec,
    plans: Mapping[str, jax.Array | ot.Permutation],
    *,
    incoming: bool = True,
) -> dict[str, Any]:
    """Moves a parent into the target's neuron order and widths with corrected plans.

    Args:
      parent: Flax variables of the parent.
      spec: its alignment spec.
      plans: plan name -> corrected plan (n_parent, n_target), or an
        ``ot.Permutation`` (applied as a gather).
      incoming: also align input axes (past correction); False aligns only
        each leaf's output axis, as the original does without past correction.

    Returns:
      Variables with the target's shapes.
    """
    flat = spec_lib.flatten_paths(parent)
    out = {}
    for path, ls in spec.leaves:
        leaf = flat[path]
        axes = [ax for ax, n in enumerate(ls.axes) if n is not None and (incoming or ax == len(ls.axes) - 1)]
        x = _aligned_leaf(leaf, ls, plans, axes)
        if ls.view:
            # A flat input axis (a dense kernel after a flatten) takes the target's
            # size: the plan inside the view may change the width (C_A -> C_B).
            lead = (-1,) if leaf.ndim == 2 else leaf.shape[:-1]
            x = x.reshape(lead + x.shape[-1:])
        out[path] = x
    return spec_lib.unflatten_paths(out)


# ----------------------------------------------------------------------------- the pass


def _neuron_rows(
    flat: Mapping[str, jax.Array],
    spec: spec_lib.AlignmentSpec,
    plan: str,
    plans: Mapping[str, jax.Array] | None,
    roles: tuple[str, ...],
) -> jax.Array:
    """Rows (n, d) of the plan's ready producers of the given roles, input axes aligned by ``plans``.

    ``plans=None`` reads the leaves as they are (the target; raw importance norms).
    """
    lm = spec.leaf_map
    parts = []
    for path in spec.cost_producers(plan):
        ls = lm[path]
        if ls.role not in roles:
            continue
        in_axes = [] if plans is None else [ax for ax, n in enumerate(ls.axes[:-1]) if n is not None]
        parts.append(_rows(_aligned_leaf(flat[path], ls, plans, in_axes)))
    return jnp.concatenate(parts, axis=1)


def _act_columns(acts: Activations, plan: str, who: str) -> list[jax.Array]:
    """The plan's activation tensors (..., n), neurons on the last axis (see ``ot.pairwise_cost_columns``)."""
    if plan not in acts:
        raise FusionError(f"{who}: no activations for layer {plan!r} (have {sorted(acts)})")
    return [jnp.asarray(a) for a in acts[plan]]


def _solve(cost, a, b, uniform: bool, config: FusionConfig, epsilon: jax.Array | None = None):
    n, m = cost.shape
    if config.solver == "sinkhorn":
        plan, info = ot.sinkhorn_plan(
            cost,
            a,
            b,
            epsilon=config.epsilon if epsilon is None else epsilon,
            relative_epsilon=config.relative_epsilon,
            threshold=config.sinkhorn_threshold,
            max_iterations=config.sinkhorn_max_iterations,
            implicit_diff=config.implicit_diff,
            tau=config.tau,
        )
        return plan, None, info
    if n == m and uniform:
        if config.exact_backend == "auction":
            return ot.exact_assignment_auction(cost, bidders=config.auction_bidders)
        solve = ot.exact_assignment if config.exact_backend == "device" else ot.exact_assignment_host
        return solve(cost)
    plan, info = ot.exact_transport(cost, a, b)
    return plan, None, info


def _permutation_scale(n: int, config: FusionConfig) -> float:
    """The value a 1/n entry of a permutation plan takes after the correction."""
    if not config.correction:
        return 1.0 / n
    if config.proper_marginals:
        return (1.0 / n) / (1.0 / n + ot.CORRECTION_EPS)
    return 1.0


def align(
    parent: Variables,
    target: Variables,
    spec: spec_lib.AlignmentSpec,
    config: FusionConfig = FusionConfig(),
    *,
    parent_acts: Activations | None = None,
    target_acts: Activations | None = None,
    epsilons: Mapping[str, jax.Array] | None = None,
) -> tuple[dict[str, Any], dict[str, jax.Array], dict[str, ot.PlanInfo]]:
    """Aligns one parent onto the target: OTFusion's layer-by-layer plans.

    Args:
      parent, target: Flax variables (the parent may be wider or narrower).
      spec: the shared alignment spec.
      config: fusion options.
      parent_acts, target_acts: activation mode: plan name -> tuple of (S, ..., n) arrays.
      epsilons: Sinkhorn: per-plan epsilon overriding ``config.epsilon`` (may be
        traced: differentiable, see ``otfusion_jax.learned``).

    Returns:
      (aligned parent variables in the target's shapes, corrected plans, plan infos).
    """
    fa, fb = spec_lib.flatten_paths(parent), spec_lib.flatten_paths(target)
    dtype = jnp.result_type(*[x.dtype for x in fb.values()])
    plans: dict[str, jax.Array] = {}  # dense corrected plans (returned)
    moves: dict[str, jax.Array | ot.Permutation] = {}  # what is applied: a gather where the plan permutes
    infos: dict[str, ot.PlanInfo] = {}
    roles = ("weight", "bias") if config.bias_in_cost else ("weight",)
    for name in spec.plans:
        wa = _neuron_rows(fa, spec, name, moves, roles)
        wb = _neuron_rows(fb, spec, name, None, roles)
        n, m = wa.shape[0], wb.shape[0]
        if name == spec.output_plan and not config.align_output:
            if n != m:
                raise FusionError(f"layer {name!r}: align_output=False needs equal widths, got {n} and {m}")
            plans[name] = jnp.eye(n, dtype=dtype)
            moves[name] = ot.Permutation(jnp.arange(n), 1.0)
            continue
        if config.mode == "activations":
            xa, xb = _act_columns(parent_acts, name, "parent"), _act_columns(target_acts, name, "target")
            for who, tensors, width in (("parent", xa, n), ("target", xb, m)):
                if len(tensors) != len(xa) or any(t.ndim < 1 or t.shape[-1] != width for t in tensors):
                    raise FusionError(
                        f"layer {name!r}: {who} activations have shapes {[tuple(t.shape) for t in tensors]}; "
                        f"expected {len(xa)} tensor(s) with the {width} neurons on the last axis"
                    )
            sizes_a = [x.size // x.shape[-1] for x in xa]
            sizes_b = [x.size // x.shape[-1] for x in xb]
            if sizes_a != sizes_b:
                raise FusionError(
                    f"layer {name!r}: activations have {sum(sizes_a)} and {sum(sizes_b)} values per neuron "
                    f"(per tensor: {sizes_a} and {sizes_b}); compute both on the same samples"
                )
            raw = ot.pairwise_cost_columns(xa, xb, config.ground_metric, config.squared)
        else:
            xa, xb = wa, wb
            if config.unit_norm_rows:
                xa = xa / jnp.maximum(jnp.linalg.norm(xa, axis=1, keepdims=True), 1e-12)
                xb = xb / jnp.maximum(jnp.linalg.norm(xb, axis=1, keepdims=True), 1e-12)
            raw = ot.pairwise_cost(xa, xb, config.ground_metric, config.squared)
        cost = ot.normalize_cost(raw, config.normalize_cost)
        use_importance = config.importance is not None and name != spec.output_plan
        if use_importance:
            # Like the original: norms of the raw incoming weights, biases left out.
            a = ot.importance_marginal(_neuron_rows(fa, spec, name, None, ("weight",)), config.importance)
            b = ot.importance_marginal(_neuron_rows(fb, spec, name, None, ("weight",)), config.importance)
        else:
            a = jnp.full((n,), 1.0 / n, cost.dtype)
            b = jnp.full((m,), 1.0 / m, cost.dtype)
        eps = None if epsilons is None else epsilons.get(name)
        plan, perm, info = _solve(cost, a, b, not use_importance, config, eps)
        if config.correction:
            plan = ot.correct_plan(plan, proper_marginals=config.proper_marginals)
        plans[name] = plan.astype(dtype)
        moves[name] = plans[name] if perm is None else ot.Permutation(perm, _permutation_scale(n, config))
        infos[name] = info
    aligned = apply_plans(parent, spec, moves, incoming=config.past_correction)
    return aligned, plans, infos


def _averaging_weights(k: int, t: int, config: FusionConfig, weights: jax.Array | None) -> jax.Array:
    if weights is not None:
        w = jnp.asarray(weights)
        if w.shape != (k,):
            raise FusionError(f"weights has shape {w.shape}, expected ({k},) for {k} parents")
    elif config.ensemble_step is not None:
        if k != 2:
            raise FusionError(f"ensemble_step is for two parents, got {k}; use weights")
        s = config.ensemble_step
        w = jnp.array([s, s])
        w = w.at[1 - t].set(1.0 - s)
    elif config.weights is not None:
        if len(config.weights) != k:
            raise FusionError(f"FusionConfig.weights has {len(config.weights)} entries for {k} parents")
        w = jnp.asarray(config.weights)
    else:
        w = jnp.ones((k,))
    return w / jnp.sum(w)


def _weighted_sum(aligned: Sequence[Variables], w: jax.Array) -> dict[str, Any]:
    """Leaf-wise sum_k w[k] * aligned[k] (each weight cast to the leaf's dtype)."""
    return jax.tree_util.tree_map(
        lambda *xs: sum(wi.astype(x.dtype) * x for wi, x in zip(w, xs)), *[dict(a) for a in aligned]
    )


def _fuse_impl(parents, spec, config, activations, weights, epsilons=None):
    k = len(parents)
    t = config.target % k
    w = _averaging_weights(k, t, config, weights)
    if config.mode == "activations" and (activations is None or len(activations) != k):
        raise FusionError(
            f"mode='activations' needs one activation dict per parent ({k}); got "
            f"{'none' if activations is None else len(activations)}"
        )
    aligned, plans, infos = [], [], []
    for i, parent in enumerate(parents):
        if i == t:
            aligned.append(parents[t])
            plans.append(None)
            infos.append(None)
            continue
        acts = (activations[i], activations[t]) if config.mode == "activations" else (None, None)
        al, pl, inf = align(
            parent, parents[t], spec, config, parent_acts=acts[0], target_acts=acts[1], epsilons=epsilons
        )
        aligned.append(al)
        plans.append(pl)
        infos.append(inf)
    return _weighted_sum(aligned, w), FusionAux(tuple(plans), tuple(infos), w)


_fuse_jit = jax.jit(_fuse_impl, static_argnums=(1, 2))


def fuse(
    parents: Sequence[Variables],
    spec: spec_lib.AlignmentSpec,
    config: FusionConfig = FusionConfig(),
    *,
    activations: Sequence[Activations] | None = None,
    weights: jax.Array | None = None,
    epsilons: Mapping[str, jax.Array] | None = None,
) -> tuple[dict[str, Any], FusionAux]:
    """Fuses K parents into the target's architecture with OTFusion.

    Pure and jit-compiled (``spec`` and ``config`` are static); usable inside
    ``jax.jit``, ``jax.vmap`` (stack parents leaf-wise) and ``jax.grad``. Called
    with concrete arrays it first checks them for NaN/Inf on the host.

    Args:
      parents: K Flax variable dicts (``{"params": ..., "batch_stats": ...}``).
      spec: the models' alignment spec.
      config: fusion options.
      activations: activation mode: per parent, plan name -> tuple of
        (S, ..., n) arrays from the same S samples
        (``otfusion_jax.models.capture_activations``).
      weights: optional (K,) averaging weights (a traced array: differentiable);
        overrides ``config.weights`` and ``config.ensemble_step``.
      epsilons: optional plan name -> Sinkhorn epsilon (traced: differentiable),
        overriding ``config.epsilon`` for those plans.

    Returns:
      (fused variables with the target's shapes, FusionAux).
    """
    parents = [dict(p) for p in parents]
    check_parents(parents, spec, config.target)
    if _is_concrete(parents):
        check_finite(parents)
    acts = None if activations is None else [dict(a) for a in activations]
    eps = None if epsilons is None else dict(epsilons)
    return _fuse_jit(parents, spec, config, acts, weights, eps)


def vanilla_average(parents: Sequence[Variables], weights: Sequence[float] | None = None) -> dict[str, Any]:
    """Plain (weighted) mean of the parents' leaves, no alignment: the baseline OT fusion must beat."""
    k = len(parents)
    w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    shapes = [jax.tree_util.tree_map(jnp.shape, dict(p)) for p in parents]
    if any(s != shapes[0] for s in shapes[1:]):
        raise FusionError("vanilla averaging needs parents of identical shapes (use OT fusion for other widths)")
    return jax.tree_util.tree_map(lambda *xs: sum(float(wi) * x for wi, x in zip(w, xs)), *[dict(p) for p in parents])


