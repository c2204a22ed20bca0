"""The alignment engine: one ``fuse`` for every method.

>>> fused, aux = otf.fuse([vars_a, vars_b], spec, otf.FusionConfig(mode="weights"))   # OTFusion
>>> fused, aux = otf.fuse([vars_a, vars_b], spec, otf.WeightMatching(), key=jax.random.key(0))

A method is an **aligner**: a frozen (hashable, jit-static) object whose
``align(parent, target, spec, ...)`` returns one plan per plan name of the
spec (:mod:`otfusion_jax.plans`: a :class:`~otfusion_jax.plans.Permutation`
or a dense ``(n_parent, n_target)`` matrix) and what its solver reports. The
engine owns everything around it, once:

1. the checks: parents against the spec and each other, NaN/Inf, activations,
   averaging weights, and the aligner's own (``aligner.check``);
2. the K-parent loop: every parent but the target is aligned onto the target
   (parent ``i`` gets the key ``fold_in(key, i)`` for seeded aligners) and
   moved with :func:`otfusion_jax.plans.apply_plans`;
3. the weighted average (:func:`averaging_weights`: the one way weights are given).

The aligners of this library: :class:`otfusion_jax.fusion.FusionConfig`
(OTFusion, also ``otf.OTFusion``), :class:`otfusion_jax.matching.WeightMatching`
(Git Re-Basin, hard or soft), :class:`otfusion_jax.matching.Refine` (one
aligner's plans refined by weight matching); learned fusion
(:mod:`otfusion_jax.learned`) differentiates ``fuse`` through OTFusion's
Sinkhorn with traced per-layer epsilons (``params``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from otfusion_jax import ot
from otfusion_jax import plans as plans_lib
from otfusion_jax import spec as spec_lib

__all__ = [
    "Aligner",
    "Alignment",
    "FusionAux",
    "FusionError",
    "fuse",
    "align_parents",
    "averaging_weights",
    "ensemble_weights",
    "weighted_sum",
    "vanilla_average",
    "check_parents",
    "check_equal_widths",
    "check_finite",
    "warn_unconverged",
]

Variables = Mapping[str, Any]
Activations = Mapping[str, Sequence[jax.Array]]


class FusionError(ValueError):
    """Parents, activations or options that cannot be fused; the message names the culprit."""


class Alignment(NamedTuple):
    """What an aligner returns for one parent.

    Attributes:
      plans: plan name -> plan applied to the parent (Permutation or (n, m) matrix).
      info: plan name -> ``ot.PlanInfo`` (cost, converged, n_iters, error) of its solve.
      stats: aligner-level report (weight matching: ``MatchingInfo``), or None.
    """

    plans: dict[str, plans_lib.Plan]
    info: dict[str, ot.PlanInfo]
    stats: Any = None


class FusionAux(NamedTuple):
    """Side outputs of ``fuse``, one entry per parent (None for the target).

    Attributes:
      plans: per parent, plan name -> (n_parent, n_target) plan matrix (a
        corrected transport plan, a permutation matrix, a soft matching plan;
        CCA Merge's ``plans.Linear`` map: its output side only, ``matrix``).
      info: per parent, plan name -> ``ot.PlanInfo``.
      weights: (K,) averaging weights used.
      stats: per parent, the aligner-level report (``Alignment.stats``).
      iterations: alignment rounds run: 1 for one-shot fusion onto the
        target; with ``fuse(..., iterations=N > 1)`` the rounds of the
        iterative barycentre (then every parent, the target too, has plans:
        onto the final fused model).
      plan_change: iterative barycentre: the largest entry change of any plan
        in the last round (0 once the plans stopped changing); None one-shot.
    """

    plans: tuple[dict[str, jax.Array] | None, ...]
    info: tuple[dict[str, ot.PlanInfo] | None, ...]
    weights: jax.Array
    stats: tuple[Any, ...] | None = None
    iterations: Any = 1
    plan_change: Any = None


class Aligner(Protocol):
    """The interface every fusion method implements (a frozen, hashable dataclass).

    Attributes:
      needs_activations: ``align`` reads ``parent_acts`` / ``target_acts``.
      incoming: plans also move the parent's input axes (OTFusion's past
        correction; always True for permutation methods).

    An aligner may also have ``prepare(variables, spec) -> variables``: an
    equivalent parametrisation of every parent (the same function) that its
    plans act on, applied by the engine before aligning and averaging
    (OTFusion with ``symmetry="orthogonal"`` folds the norms: ``spec.fold_norms``),
    and ``respec(spec) -> spec``: the spec its plans are named by, with the same
    leaves (OTFusion with ``stream_policy="mean"``: a plan per residual sum,
    ``spec.per_sum_plans``); ``FusionAux.plans`` then carry its names.
    """

    needs_activations: bool
    incoming: bool

    def check(self, sizes: Sequence[Mapping[str, int]], target: int) -> None:
        """Static checks on the parents' plan sizes (raise FusionError naming the plan)."""

    def align(
        self,
        parent: Variables,
        target: Variables,
        spec: spec_lib.AlignmentSpec,
        *,
        parent_acts: Activations | None = None,
        target_acts: Activations | None = None,
        key: jax.Array | None = None,
        params: Any = None,
    ) -> Alignment:
        """Plans that move ``parent`` onto ``target`` (traceable: runs under jit)."""


# ----------------------------------------------------------------------------- checks


def check_parents(
    parents: Sequence[Variables], spec: spec_lib.AlignmentSpec, target: int = -1
) -> list[dict[str, int]]:
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


def check_equal_widths(sizes: Sequence[Mapping[str, int]], target: int, method: str) -> None:
    """For aligners whose plans need equal widths (permutations, invertible maps): raises FusionError naming the
    first plan and parent whose width differs from the target's."""
    for k, sz in enumerate(sizes):
        for name, n in sz.items():
            if n != sizes[target][name]:
                raise FusionError(
                    f"{method} needs equal widths, but plan {name!r} has {n} neurons in parent {k} "
                    f"and {sizes[target][name]} in the target; use OT fusion (FusionConfig) for different widths"
                )


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def check_finite(parents: Sequence[Variables]) -> None:
    """Raises FusionError naming the first parent and leaf holding NaN or Inf, or a non-float leaf.

    The check runs where the arrays live; only one flag per leaf comes to the
    host. Inside a trace (concrete parents closed over by a jitted function)
    the values are not known yet and only the dtypes are checked.
    """
    for k, parent in enumerate(parents):
        flat = spec_lib.flatten_paths(parent)
        for path, leaf in flat.items():
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                raise FusionError(f"parent {k}: leaf {path} has non-float dtype {jnp.result_type(leaf)}")
        flags = _finite_flags(list(flat.values()))
        if isinstance(flags, jax.core.Tracer):
            continue
        flags = np.asarray(jax.device_get(flags))
        if not flags.all():
            path = list(flat)[int(np.argmin(flags))]
            arr = np.asarray(flat[path])
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise FusionError(f"parent {k}: leaf {path} has {bad} NaN/Inf values")


def warn_unconverged(aux: FusionAux, threshold: float | None = None, *, config: Any = None) -> list[str]:
    """Warns (and returns the messages) for every plan whose solver did not converge.

    That is Sinkhorn stopped by its iteration cap, or the auction out of rounds.
    ``config`` (the aligner) picks the message; without it, a plan with
    marginal error 0 (exact solvers) is taken for the auction's.
    """
    messages = []
    for k, info in enumerate(aux.info):
        if info is None:
            continue
        for name, pi in info.items():
            if np.all(np.asarray(pi.converged)):
                continue
            err = float(np.max(np.asarray(pi.error)))
            auction = err == 0.0 if config is None else getattr(config, "solver", "exact") == "exact"
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


# ----------------------------------------------------------------------------- averaging


def averaging_weights(k: int, weights: Any = None) -> jax.Array:
    """The (K,) averaging weights, normalised to sum 1: ``weights`` (any positive scale) or 1/K.

    ``weights`` may be traced (differentiable). The one place weights are normalised:
    ``fuse``, REPAIR's interpolated statistics and the experiment all call it.
    """
    if weights is None:
        return jnp.full((k,), 1.0 / k)
    w = jnp.asarray(weights, jnp.float32) if not isinstance(weights, jax.Array) else weights
    if w.shape != (k,):
        raise FusionError(f"weights has shape {tuple(w.shape)}, expected ({k},) for {k} parents")
    if _is_concrete(w) and not (np.all(np.asarray(w) >= 0) and float(np.sum(np.asarray(w))) > 0):
        raise FusionError(f"weights must be >= 0 with a positive sum, got {np.asarray(w).tolist()}")
    return w / jnp.sum(w)


def ensemble_weights(step: float, k: int = 2, target: int = -1) -> tuple[float, ...]:
    """The original's ``--ensemble-step s`` as weights: s for the target, 1 - s for the other parent."""
    if k != 2:
        raise FusionError(f"ensemble_step is for two parents, got {k}; give weights instead")
    if not 0.0 <= float(step) <= 1.0:
        raise FusionError(f"ensemble_step must be in [0, 1], got {step}")
    w = [1.0 - float(step)] * 2
    w[target % 2] = float(step)
    return tuple(w)


def weighted_sum(trees: Sequence[Variables], w: jax.Array) -> dict[str, Any]:
    """Leaf-wise ``sum_k w[k] * trees[k]`` (each weight cast to the leaf's dtype)."""
    return jax.tree_util.tree_map(
        lambda *xs: sum(wi.astype(x.dtype) * x for wi, x in zip(w, xs)), *[dict(t) for t in trees]
    )


def vanilla_average(parents: Sequence[Variables], weights: Any = None) -> dict[str, Any]:
    """Plain (weighted) mean of the parents' leaves, no alignment: the baseline fusion must beat."""
    shapes = [jax.tree_util.tree_map(jnp.shape, dict(p)) for p in parents]
    if any(s != shapes[0] for s in shapes[1:]):
        raise FusionError("vanilla averaging needs parents of identical shapes (use OT fusion for other widths)")
    return weighted_sum(parents, averaging_weights(len(parents), weights))


# ----------------------------------------------------------------------------- the loop


def _align_all(parents, spec, aligner, activations, key, params, target):
    """(aligned parents, per-parent Alignment or None): the K-parent loop, traced once."""
    aligned, results = [], []
    for i, parent in enumerate(parents):
        if i == target:
            aligned.append(dict(parent))
            results.append(None)
            continue
        acts = (activations[i], activations[target]) if activations is not None else (None, None)
        res = aligner.align(
            parent,
            parents[target],
            spec,
            parent_acts=acts[0],
            target_acts=acts[1],
            key=None if key is None else jax.random.fold_in(key, i),
            params=params,
        )
        aligned.append(plans_lib.apply_plans(parent, spec, res.plans, incoming=aligner.incoming))
        results.append(res)
    return aligned, results


def _aux(results, parents, spec, w) -> FusionAux:
    plans, infos, stats = [], [], []
    for i, res in enumerate(results):
        if res is None:
            plans.append(None)
            infos.append(None)
            stats.append(None)
            continue
        sizes = spec.check_variables(parents[i])
        dtype = jnp.result_type(*jax.tree_util.tree_leaves(parents[i]))
        plans.append({name: plans_lib.as_matrix(p, sizes[name], dtype) for name, p in res.plans.items()})
        infos.append(res.info)
        stats.append(res.stats)
    return FusionAux(tuple(plans), tuple(infos), w, tuple(stats))


def _align_impl(parents, spec, aligner, activations, weights, key, params, target, iterations=1, tol=0.0):
    """(aligned parents, FusionAux): the one implementation behind ``align_parents`` and ``fuse``."""
    respec = getattr(aligner, "respec", None)
    if respec is not None:  # the aligner names its plans by another spec with the same leaves
        spec = respec(spec)
    prepare = getattr(aligner, "prepare", None)
    if prepare is not None:  # an equivalent parametrisation the aligner needs (folded norms): the same functions
        parents = [prepare(p, spec) for p in parents]
    w = averaging_weights(len(parents), weights)
    aligned, results = _align_all(parents, spec, aligner, activations, key, params, target)
    aux = _aux(results, parents, spec, w)
    if iterations > 1:
        aligned, aux = _barycenter(
            parents, spec, aligner, w, key, params, target, aligned, aux, iterations, tol, activations
        )
    return aligned, aux


def _fuse_impl(parents, spec, aligner, activations, weights, key, params, target, iterations=1, tol=0.0):
    aligned, aux = _align_impl(parents, spec, aligner, activations, weights, key, params, target, iterations, tol)
    return weighted_sum(aligned, aux.weights), aux


_ROUND_KEYS = 1 << 20


def _moved_acts(acts, plans):
    """A parent's activations in the target's neuron order: each plan's tensors times its (n, m) plan matrix."""
    return {n: tuple(a @ plans[n].astype(a.dtype) for a in tensors) for n, tensors in acts.items() if n in plans}


def _barycenter(parents, spec, aligner, w, key, params, target, aligned, aux, iterations, tol, activations=None):
    """The iterative barycentre ("merge many", Ainsworth et al. 2023): re-align each parent onto the others' mean.

    Round 1 is the one-shot alignment onto the target (``aligned``, ``aux``).
    Each further round visits the parents in order; parent i is aligned (from
    its original weights) onto the weighted mean of the *other* aligned
    parents, and replaces its aligned copy at once (Gauss-Seidel, like Git
    Re-Basin's MergeMany; aligning onto a mean that contains the parent
    itself would return its current plans: a fixed point, nothing learned).
    Aligners by activations align onto the same weighted mean of the other
    parents' activations, each moved by its current plans (a barycentre in
    activation space: every plan is solved from the parents' own activations,
    which no plan of an earlier layer changes).
    The rounds are one ``lax.while_loop`` (the aligner traced K times, once
    per parent); it stops when no plan entry moved by more than ``tol`` in a
    round, or after ``iterations`` rounds. The fused model keeps the target's
    widths; its neuron order is the first round's.
    """
    k = len(parents)
    sizes = [spec.check_variables(p) for p in parents]
    dtypes = [jnp.result_type(*jax.tree_util.tree_leaves(p)) for p in parents]
    other = next(i for i in range(k) if i != target)
    # The target's entries, which round 1 did not align, start as the identity
    # (plans) and as zeros shaped like another parent's reports.
    eye = {n: jnp.eye(sizes[target][n], dtype=dtypes[target]) for n in aux.plans[other]}
    zeros = functools.partial(jax.tree_util.tree_map, jnp.zeros_like)

    def filled(seq, fill):
        return [fill if i == target else x for i, x in enumerate(seq)]

    state = (
        jnp.array(1, jnp.int32),
        list(aligned),
        filled(aux.plans, eye),
        filled(aux.info, zeros(aux.info[other])),
        filled(aux.stats, zeros(aux.stats[other])),
        jnp.array(jnp.inf, jnp.float32),
    )

    def body(state):
        it, current, old, infos, stats, _ = state
        current, plans, infos, stats = list(current), list(old), list(infos), list(stats)
        for i, parent in enumerate(parents):
            rest = jnp.concatenate([w[:i], w[i + 1:]])
            total = jnp.sum(rest)
            # All others weighted 0 (e.g. ensemble weights (0, 1)): their plain mean, not 0 / 0.
            rest = jnp.where(total > 0, rest / jnp.where(total > 0, total, 1.0), 1.0 / (k - 1))
            others = weighted_sum(current[:i] + current[i + 1:], rest)
            acts = {}
            if activations is not None:
                moved = [_moved_acts(activations[j], plans[j]) for j in range(k) if j != i]
                acts = dict(parent_acts=activations[i], target_acts=weighted_sum(moved, rest))
            res = aligner.align(
                parent, others, spec, **acts,
                # Round r of parent i: fold_in(fold_in(key, i), ROUND_KEYS + r), apart from the keys of
                # round 1 (fold_in(key, i)) and of any restarts inside (fold_in(that, small r)).
                key=None if key is None else jax.random.fold_in(jax.random.fold_in(key, i), _ROUND_KEYS + it),
                params=params,
            )
            current[i] = plans_lib.apply_plans(parent, spec, res.plans, incoming=aligner.incoming)
            plans[i] = {n: plans_lib.as_matrix(p, sizes[i][n], dtypes[i]) for n, p in res.plans.items()}
            infos[i], stats[i] = res.info, res.stats
        change = jnp.max(jnp.stack([
            jnp.max(jnp.abs(plans[i][n] - old[i][n])) for i in range(k) for n in plans[i]
        ])).astype(jnp.float32)
        return it + 1, current, plans, infos, stats, change

    def cond(state):
        return (state[0] < iterations) & (state[5] > tol)

    it, aligned, plans, infos, stats, change = jax.lax.while_loop(cond, body, state)
    return aligned, FusionAux(tuple(plans), tuple(infos), w, tuple(stats), it, change)


_STATIC = ("spec", "aligner", "target", "iterations", "tol")
_fuse_jit = jax.jit(_fuse_impl, static_argnames=_STATIC)
_align_jit = jax.jit(_align_impl, static_argnames=_STATIC)


def _check_iterations(aligner, iterations, tol, spec) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise FusionError(f"iterations must be an int >= 1, got {iterations!r}")
    if not tol >= 0:
        raise FusionError(f"tol must be >= 0, got {tol!r}")
    respec = getattr(aligner, "respec", None)
    if iterations > 1 and respec is not None and respec(spec).derived:  # plans that mix others (spec.derived)
        raise FusionError(
            f"the iterative barycentre (iterations={iterations}) moves each plan's activations and weights by that "
            "plan; stream_policy='mean' mixes plans at every residual sum: use stream_policy='shared'"
        )


def _prepare(parents, spec, aligner, activations, key, params, target, weights=None):
    """Checks shared by fuse and align_parents; returns normalised arguments."""
    parents = [dict(p) for p in parents]
    if weights is not None and _is_concrete(weights):
        averaging_weights(len(parents), weights)  # shape and sign checked here, on concrete values
    sizes = check_parents(parents, spec, target)
    if _is_concrete(parents):
        check_finite(parents)
    t = target % len(parents)
    aligner.check(sizes, t)
    if aligner.needs_activations:
        if activations is None or len(activations) != len(parents):
            raise FusionError(
                f"{type(aligner).__name__} by activations needs one activation dict per parent ({len(parents)}); "
                f"got {'none' if activations is None else len(activations)}"
            )
        activations = [dict(a) for a in activations]
    else:
        activations = None
    if key is None:
        key = jax.random.key(0)  # seeded aligners: parent i still gets its own stream, fold_in(key, i)
    elif not isinstance(key, jax.Array):
        key = jax.random.key(int(key))
    return parents, activations, key, params, t


def fuse(
    parents: Sequence[Variables],
    spec: spec_lib.AlignmentSpec,
    aligner: Aligner | None = None,
    *,
    activations: Sequence[Activations] | None = None,
    weights: Any = None,
    target: int = -1,
    key: jax.Array | int | None = None,
    params: Any = None,
    iterations: int = 1,
    tol: float = 0.0,
) -> tuple[dict[str, Any], FusionAux]:
    """Fuses K parents into the target's architecture: align every parent onto it, then average.

    Pure and jit-compiled (``spec`` and ``aligner`` are static); usable inside
    ``jax.jit``, ``jax.vmap`` (stack parents leaf-wise) and ``jax.grad``. Called
    with concrete arrays it first checks them for NaN/Inf on the host.

    Args:
      parents: K Flax variable dicts (``{"params": ..., "batch_stats": ...}``).
      spec: the models' alignment spec.
      aligner: the method (default ``FusionConfig()``: OTFusion by weights, exact).
      activations: for aligners by activations: per parent, plan name -> tuple
        of (S, ..., n) arrays from the same S samples
        (``otfusion_jax.models.capture_activations``).
      weights: optional (K,) averaging weights (normalised; may be traced:
        differentiable); default 1/K. The original's ``--ensemble-step s`` is
        ``weights=ensemble_weights(s)``.
      target: index of the parent whose widths and neuron order the fused
        model takes (default the last, the original's model B).
      key: PRNG key (or int seed) of seeded aligners (weight matching's sweep
        order; default ``key(0)``); parent i uses ``fold_in(key, i)``.
      params: traced parameters of the aligner (OTFusion: plan name ->
        Sinkhorn epsilon, see ``otfusion_jax.learned``).
      iterations: 1 (default): one-shot, every parent aligned onto the target.
        N > 1: the iterative barycentre for many parents ("merge many"): after
        the one-shot round, each parent in turn (the target too) is aligned
        onto the mean of the other aligned parents, for at most N rounds in
        all, until no plan entry moves by more than ``tol`` in a round
        (``aux.iterations``, ``aux.plan_change``). By activations, each
        parent is aligned onto the mean of the others' activations moved by
        their plans (the parents' means have no activations of their own).
      tol: iterative barycentre: the plan change under which it stops (0:
        hard plans identical). With Sinkhorn plans the barycentre blurs its
        means round after round (digits K = 4: 11% after 10 rounds,
        docs/RESULTS.md): use exact plans or weight matching.

    Returns:
      (fused variables with the target's shapes, FusionAux).
    """
    if aligner is None:
        from otfusion_jax.fusion import FusionConfig  # pylint: disable=import-outside-toplevel

        aligner = FusionConfig()
    _check_iterations(aligner, iterations, tol, spec)
    parents, acts, key, params, t = _prepare(parents, spec, aligner, activations, key, params, target, weights)
    return _fuse_jit(parents, spec, aligner, acts, weights, key, params, t, iterations, float(tol))


def align_parents(
    parents: Sequence[Variables],
    spec: spec_lib.AlignmentSpec,
    aligner: Aligner,
    *,
    activations: Sequence[Activations] | None = None,
    weights: Any = None,
    target: int = -1,
    key: jax.Array | int | None = None,
    params: Any = None,
    iterations: int = 1,
    tol: float = 0.0,
) -> tuple[list[dict[str, Any]], FusionAux]:
    """The parents moved onto the target (the target as it is), before averaging: ``fuse`` without its last step.

    ``fuse(...) == weighted_sum(*align_parents(...))`` with the same arguments (``aux.weights`` holds the
    normalised weights); REPAIR's interpolated statistics and learned fusion's per-layer mixing start from
    these. ``weights`` matter here only for the iterative barycentre (its means of the other parents).
    Arguments as :func:`fuse`.
    """
    _check_iterations(aligner, iterations, tol, spec)
    parents, acts, key, params, t = _prepare(parents, spec, aligner, activations, key, params, target, weights)
    return _align_jit(parents, spec, aligner, acts, weights, key, params, t, iterations, float(tol))
