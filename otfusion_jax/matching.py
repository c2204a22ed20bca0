"""Git Re-Basin weight matching (Ainsworth et al., 2023) on an AlignmentSpec.

>>> perms, info = weight_matching(vars_a, vars_b, spec)
>>> aligned_a = apply_perms(vars_a, spec, perms)  # or fusion.apply_plans(vars_a, spec, perms_to_plans(perms))
>>> fused, aux = fuse_weight_matching([vars_a, vars_b], spec)

Where OTFusion computes one plan per layer from that layer's *incoming*
weights only, weight matching looks for the permutations (one per plan of the
spec) that maximise the total inner product between the aligned parent and the
target,

    J(perms) = sum over leaves L of <L_parent with every plan axis permuted, L_target>,

by coordinate descent: a sweep visits the plans in a random (seeded) order and
re-solves each one with the others fixed. For a plan P, with every *other* plan
axis of the parent's leaves permuted by the current permutations,

    S[i, j] = sum over (leaf, axis) acting on P of <parent slice i along axis, target slice j along axis>

(incoming and outgoing sides alike: the producers' output axes and the
consumers' input axes, through ``LeafSpec.view`` for conv->dense flattens), and
the permutation maximising ``sum_j S[perm[j], j]`` is an exact linear
assignment (``ot.exact_assignment(-S)``, on device). J is linear in each
plan's permutation when the others are fixed (as long as no leaf carries the
same plan on two axes), so with exact assignments it never decreases; a new
permutation is only accepted if it strictly improves the plan's term, and the
descent stops after a sweep that changes nothing, or after ``max_sweeps``.

Start (our addition, ``start="greedy"``, the default): before the descent, one
pass in the spec's order solves each plan from the members whose other plans
are already solved (its producers: OTFusion's layer-by-layer pass, with inner
products instead of distances). This recovers a permuted copy exactly before
any sweep; from the identity (``start="identity"``, Git Re-Basin's choice),
coordinate descent can stall in a poorer local optimum on such pairs (seen
on small random MLPs). On trained pairs neither start wins consistently.
``init_plans`` (e.g. OTFusion's plans: "refinement") replaces either start.

Solvers: ``backend="device"`` uses optax's Hungarian (``ot.exact_assignment``,
stays on the accelerator); ``"auction"`` the parallel auction
(``ot.exact_assignment_auction``, also on device); ``"host"`` calls scipy's ``linear_sum_assignment``
through ``jax.pure_callback`` (faster on a CPU, much cheaper to compile). Plans
of equal width share one solver instance in the compiled graph.

Soft variant (``soft=True``): each plan is an entropic OT plan instead of a
permutation: Sinkhorn with uniform marginals on the cost ``-S / std(S)`` with
regularisation ``epsilon`` (the standardisation makes ``epsilon`` scale free),
rescaled to a doubly stochastic matrix times n (each column sums to 1: target
neuron j becomes a barycentre of parent neurons, like OTFusion's correction).
The other plans act by contraction with these soft plans. J is then not
guaranteed to increase; the descent stops when no plan moves by more than
``soft_tol`` (max abs entry change) in a sweep. The returned ``perms`` are the
nearest permutations (an exact assignment maximising overlap with each soft
plan); ``info.plans`` holds the soft plans, which ``fusion.apply_plans``
applies (and ``fuse_weight_matching`` uses).

Everything is pure and jit-compiled (the spec and options are static; the seed
and ``epsilon`` are traced, so new seeds or values of the same shapes do not
recompile). Equal
widths only: permutations need them (use ``fusion.fuse`` otherwise).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from otfusion_jax import fusion
from otfusion_jax import ot
from otfusion_jax import spec as spec_lib

__all__ = [
    "MatchingInfo",
    "WeightMatchingAux",
    "weight_matching",
    "matching_objective",
    "perms_to_plans",
    "plans_to_perms",
    "apply_perms",
    "fuse_weight_matching",
]

Variables = Mapping[str, Any]
DEFAULT_ROLES = ("weight", "bias", "norm")


class MatchingInfo(NamedTuple):
    """What ``weight_matching`` reports.

    Attributes:
      objective: (max_sweeps + 1,) objective J before the first sweep (entry 0,
        after the greedy start if any) and after each sweep; entries past
        ``n_sweeps`` repeat the last value.
      n_sweeps: number of sweeps run.
      converged: True if the last sweep changed no plan (False: max_sweeps hit).
      plans: plan name -> (n, n) plan for ``fusion.apply_plans``: the
        permutation matrices of ``perms``, or the soft (column-stochastic) plans.
    """

    objective: jax.Array
    n_sweeps: jax.Array
    converged: jax.Array
    plans: dict[str, jax.Array]


class WeightMatchingAux(NamedTuple):
    """Side outputs of ``fuse_weight_matching``, one entry per parent (None for the target).

    Attributes:
      perms: per parent, plan name -> (n,) permutation.
      info: per parent, MatchingInfo.
      weights: (K,) averaging weights used.
    """

    perms: tuple[dict[str, jax.Array] | None, ...]
    info: tuple[MatchingInfo | None, ...]
    weights: jax.Array


@dataclasses.dataclass(frozen=True)
class _Options:
    """Static options of the jitted descent."""

    max_sweeps: int
    greedy_start: bool
    backend: str
    soft: bool
    align_output: bool
    roles: tuple[str, ...]
    tol: float
    soft_tol: float
    sinkhorn_threshold: float
    sinkhorn_max_iterations: int


# ----------------------------------------------------------------------------- permutation algebra


def perms_to_plans(perms: Mapping[str, jax.Array], dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """Permutations -> (n, n) permutation plans, ``plan[perm[j], j] = 1``, for ``fusion.apply_plans``.

    Args:
      perms: plan name -> (n,) int array, perm[j] = parent neuron sent to target neuron j.
      dtype: dtype of the plans.

    Returns:
      plan name -> (n, n) plan matrix.
    """
    return {name: jnp.eye(p.shape[0], dtype=dtype)[:, p] for name, p in perms.items()}


def plans_to_perms(plans: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """(n, n) plans (e.g. OTFusion's corrected exact plans) -> permutations by column argmax.

    Args:
      plans: plan name -> (n, n) plan; column j's largest entry names the parent
        neuron sent to target neuron j.

    Returns:
      plan name -> (n,) int32 array (a permutation if each plan is a
      permutation matrix up to scale; otherwise possibly not).
    """
    return {name: jnp.argmax(jnp.asarray(t), axis=0).astype(jnp.int32) for name, t in plans.items()}


def _move(x: jax.Array, axis: int, p: jax.Array) -> jax.Array:
    """Axis ``axis`` of x in the target's neuron order: a permutation (n,) or a plan (n, m)."""
    if p.ndim == 1:
        return jnp.take(x, p, axis=axis)
    return jnp.moveaxis(jnp.tensordot(x, p.astype(x.dtype), axes=([axis], [0])), -1, axis)


def _viewed(flat: Mapping[str, jax.Array], spec: spec_lib.AlignmentSpec) -> dict[str, jax.Array]:
    return {path: flat[path].reshape(spec_lib.view_shape(ls, flat[path].shape, path)) for path, ls in spec.leaves}


def _aligned(x: jax.Array, ls: spec_lib.LeafSpec, perms: Mapping[str, jax.Array], skip: int | None = None) -> jax.Array:
    for ax, name in enumerate(ls.axes):
        if name is not None and ax != skip:
            x = _move(x, ax, perms[name])
    return x


def apply_perms(parent: Variables, spec: spec_lib.AlignmentSpec, perms: Mapping[str, jax.Array]) -> dict[str, Any]:
    """Permutes every plan axis of a parent: ``aligned[.., j, ..] = parent[.., perm[j], ..]``.

    Same result as ``fusion.apply_plans(parent, spec, perms_to_plans(perms))``
    with gathers instead of matmuls (exact: no rounding, whatever the matmul
    precision).

    Args:
      parent: Flax variables.
      spec: its alignment spec.
      perms: plan name -> (n,) permutation, for every plan of the spec.

    Returns:
      The permuted variables (same shapes).
    """
    flat = spec_lib.flatten_paths(parent)
    out = {}
    for path, ls in spec.leaves:
        leaf = flat[path]
        x = leaf.reshape(spec_lib.view_shape(ls, leaf.shape, path))
        out[path] = _aligned(x, ls, perms).reshape(leaf.shape)
    return spec_lib.unflatten_paths(out)


# ----------------------------------------------------------------------------- the descent


def _objective(va, vb, spec, perms, roles) -> jax.Array:
    total = jnp.zeros((), jnp.float32)
    for path, ls in spec.leaves:
        if ls.role in roles:
            total = total + jnp.vdot(_aligned(va[path], ls, perms), vb[path]).astype(jnp.float32)
    return total


def _similarity(va, vb, spec, plan, perms, roles, ready=None) -> jax.Array:
    """S (n, n): S[i, j] = sum over members of <parent slice i, target slice j>, other plan axes aligned.

    ``ready`` (greedy start): only members whose other plan axes are all in it.
    """
    lm = spec.leaf_map
    s = None
    for path, ax in spec.members(plan):
        ls = lm[path]
        if ls.role not in roles:
            continue
        if ready is not None and any(n is not None and k != ax and n not in ready for k, n in enumerate(ls.axes)):
            continue
        a = _aligned(va[path], ls, perms, skip=ax)
        other = [k for k in range(a.ndim) if k != ax]
        term = jnp.tensordot(a, vb[path], axes=(other, other)).astype(jnp.float32)
        s = term if s is None else s + term
    if s is None:
        if ready is not None:
            n = perms[plan].shape[0]
            return jnp.zeros((n, n), jnp.float32)
        raise ValueError(f"weight matching: plan {plan!r} acts on no leaf with a role in {roles}")
    return s


def _lsa_host(s: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment  # pylint: disable=import-outside-toplevel

    rows, cols = linear_sum_assignment(np.asarray(s, np.float64), maximize=True)
    perm = np.empty(s.shape[1], np.int32)
    perm[cols] = rows
    return perm


def _assignment(s: jax.Array, backend: str) -> jax.Array:
    """The permutation maximising sum_j S[perm[j], j]: on device (optax Hungarian) or scipy on the host."""
    s = jax.lax.stop_gradient(s)
    if backend == "device":
        return ot.exact_assignment(-s)[1]
    if backend == "auction":
        return ot.exact_assignment_auction(-s)[1]
    return jax.pure_callback(
        _lsa_host, jax.ShapeDtypeStruct((s.shape[1],), jnp.int32), s, vmap_method="sequential"
    )


def _solve(s: jax.Array, old: jax.Array, epsilon: jax.Array, opts: _Options) -> tuple[jax.Array, jax.Array]:
    """Re-solves one plan from its similarity S (n, n). Returns (new perm or plan, changed)."""
    n = s.shape[0]
    if opts.soft:
        # Sinkhorn on C / epsilon with regularisation 1 is Sinkhorn on C with
        # epsilon: epsilon stays a traced value (new values do not recompile).
        cost = -s / ((jnp.std(s) + 1e-12) * epsilon)
        u = jnp.full((n,), 1.0 / n, cost.dtype)
        plan, _ = ot.sinkhorn_plan(
            cost,
            u,
            u,
            epsilon=1.0,
            relative_epsilon=None,
            threshold=opts.sinkhorn_threshold,
            max_iterations=opts.sinkhorn_max_iterations,
            implicit_diff=False,
        )
        new = (plan * n).astype(old.dtype)
        return new, jnp.max(jnp.abs(new - old)) > opts.soft_tol
    perm = _assignment(s, opts.backend)
    cols = jnp.arange(n)
    gain_old, gain_new = jnp.sum(s[old, cols]), jnp.sum(s[perm, cols])
    better = gain_new > gain_old + opts.tol * jnp.abs(gain_old)
    return jnp.where(better, perm.astype(old.dtype), old), better


def _group_branch(names, va, vb, epsilon, spec, opts: _Options, ready: Mapping[str, frozenset] | None):
    """One switch branch for all plans of one width: a single solver instance in the graph.

    The solver (a Hungarian or Sinkhorn loop) dominates compile time, so plans of
    equal width share it: an inner switch picks the plan's similarity (local
    index j < len(names): the full S of names[j]; with ``ready``, j >= len(names):
    the greedy start's S of names[j - len(names)]), one solve, then a select
    writes the result back.
    """
    sims = [
        (lambda ps, name=name: (_similarity(va, vb, spec, name, ps, opts.roles), ps[name])) for name in names
    ]
    if ready is not None:
        sims += [
            (lambda ps, name=name: (_similarity(va, vb, spec, name, ps, opts.roles, ready[name]), ps[name]))
            for name in names
        ]

    def branch(ps, local):
        s, old = jax.lax.switch(local, sims, ps) if len(sims) > 1 else sims[0](ps)
        new, changed = _solve(s, old, epsilon, opts)
        ps = dict(ps)
        for j, name in enumerate(names):
            ps[name] = jnp.where(local % len(names) == j, new, ps[name])
        return ps, changed

    return branch


def _weight_matching_impl(parent, target, init, key, epsilon, spec, opts: _Options):
    va = _viewed(spec_lib.flatten_paths(parent), spec)
    vb = _viewed(spec_lib.flatten_paths(target), spec)
    perms = dict(init)
    if opts.soft:
        perms = perms_to_plans(perms, jnp.float32)
    active = [p for p in spec.plans if opts.align_output or p != spec.output_plan]
    groups: dict[int, list[str]] = {}
    for name in active:
        groups.setdefault(init[name].shape[0], []).append(name)
    group_of = jnp.array([list(groups).index(init[n].shape[0]) for n in active], jnp.int32)
    local_of = np.array([groups[init[n].shape[0]].index(n) for n in active], np.int32)
    greedy_of = local_of + np.array([len(groups[init[n].shape[0]]) for n in active], np.int32)
    ready = None
    if opts.greedy_start:
        # Plans before P in spec.plans (topological), plus the fixed ones.
        fixed = frozenset(p for p in spec.plans if p not in active)
        ready = {p: fixed | frozenset(spec.plans[: spec.plans.index(p)]) for p in active}
    branches = [_group_branch(names, va, vb, epsilon, spec, opts, ready) for names in groups.values()]

    def step_fn(plan_index, local):
        def step(k, carry):
            ps, changed = carry
            q = plan_index(k)
            if len(branches) > 1:
                ps, ch = jax.lax.switch(group_of[q], branches, ps, local[q])
            else:
                ps, ch = branches[0](ps, local[q])
            return ps, changed | ch

        return step

    if opts.greedy_start and active:
        # One pass in the spec's order, each plan from the members whose other
        # plans are already solved (like OTFusion's layer-by-layer pass).
        perms, _ = jax.lax.fori_loop(
            0, len(active), step_fn(lambda k: k, jnp.asarray(greedy_of)), (perms, jnp.array(False))
        )
    objs = jnp.zeros((opts.max_sweeps + 1,), jnp.float32).at[0].set(_objective(va, vb, spec, perms, opts.roles))

    def sweep(state):
        i, ps, _, objs = state
        order = jax.random.permutation(jax.random.fold_in(key, i), len(active))
        step = step_fn(lambda k: order[k], jnp.asarray(local_of))
        ps, changed = jax.lax.fori_loop(0, len(active), step, (ps, jnp.array(False)))
        objs = objs.at[i + 1].set(_objective(va, vb, spec, ps, opts.roles))
        return i + 1, ps, ~changed, objs

    state = (jnp.array(0, jnp.int32), perms, jnp.array(not active), objs)
    if opts.max_sweeps > 0 and active:
        state = jax.lax.while_loop(lambda s: (s[0] < opts.max_sweeps) & ~s[2], sweep, state)
    n_sweeps, perms, converged, objs = state
    objs = jnp.where(jnp.arange(objs.shape[0]) > n_sweeps, objs[n_sweeps], objs)
    if opts.soft:
        plans = perms
        perms = {k: _assignment(t, opts.backend) for k, t in plans.items()}
    else:
        plans = perms_to_plans(perms, jnp.result_type(*[x.dtype for x in vb.values()]))
    return perms, MatchingInfo(objs, n_sweeps, converged, plans)


_weight_matching_jit = jax.jit(_weight_matching_impl, static_argnums=(5, 6))


def _check_equal_widths(parent, target, spec, what="parent") -> dict[str, int]:
    try:
        sa = spec.check_variables(parent, what=what)
        sb = spec.check_variables(target, what="target")
    except spec_lib.SpecError as e:
        raise ValueError(str(e)) from None
    for name in spec.plans:
        if sa[name] != sb[name]:
            raise ValueError(
                f"weight matching needs equal widths, but plan {name!r} has {sa[name]} neurons in the "
                f"{what} and {sb[name]} in the target; use OT fusion (fusion.fuse) for different widths"
            )
    return sb


def _init_perms(init_plans, sizes, spec) -> dict[str, jax.Array]:
    init_plans = {} if init_plans is None else dict(init_plans)
    unknown = set(init_plans) - set(spec.plans)
    if unknown:
        raise ValueError(f"init_plans names plans not in the spec: {sorted(unknown)}")
    perms = {}
    for name in spec.plans:
        n = sizes[name]
        p = init_plans.get(name)
        if p is None:
            perms[name] = jnp.arange(n, dtype=jnp.int32)
            continue
        p = jnp.asarray(p)
        if p.ndim == 2:
            p = jnp.argmax(p, axis=0)
        if p.shape != (n,):
            raise ValueError(f"init_plans[{name!r}] has shape {p.shape}, expected ({n},) or ({n}, {n})")
        perms[name] = p.astype(jnp.int32)
    return perms


def _make_options(
    *,
    max_sweeps: int = 20,
    start: str = "greedy",
    backend: str = "device",
    soft: bool = False,
    align_output: bool = False,
    roles: Sequence[str] = DEFAULT_ROLES,
    tol: float = 1e-6,
    soft_tol: float = 1e-4,
    sinkhorn_threshold: float = 1e-3,
    sinkhorn_max_iterations: int = 2000,
) -> _Options:
    opts = _Options(
        max_sweeps=int(max_sweeps),
        greedy_start=start == "greedy",
        backend=str(backend),
        soft=bool(soft),
        align_output=bool(align_output),
        roles=tuple(roles),
        tol=float(tol),
        soft_tol=float(soft_tol),
        sinkhorn_threshold=float(sinkhorn_threshold),
        sinkhorn_max_iterations=int(sinkhorn_max_iterations),
    )
    if start not in ("greedy", "identity"):
        raise ValueError(f"start must be 'greedy' or 'identity', got {start!r}")
    if opts.backend not in fusion.EXACT_BACKENDS:
        raise ValueError(f"backend must be one of {fusion.EXACT_BACKENDS}, got {backend!r}")
    if opts.max_sweeps < 0:
        raise ValueError(f"max_sweeps must be >= 0, got {max_sweeps}")
    unknown = set(opts.roles) - set(spec_lib.ROLES)
    if unknown:
        raise ValueError(f"roles must be among {spec_lib.ROLES}, got {sorted(unknown)}")
    return opts


def weight_matching(
    parent: Variables,
    target: Variables,
    spec: spec_lib.AlignmentSpec,
    *,
    max_sweeps: int = 20,
    seed: int | jax.Array = 0,
    init_plans: Mapping[str, jax.Array] | None = None,
    start: str = "greedy",
    soft: bool = False,
    epsilon: float = 0.1,
    align_output: bool = False,
    backend: str = "device",
    roles: Sequence[str] = DEFAULT_ROLES,
    tol: float = 1e-6,
    soft_tol: float = 1e-4,
    sinkhorn_threshold: float = 1e-3,
    sinkhorn_max_iterations: int = 2000,
) -> tuple[dict[str, jax.Array], MatchingInfo]:
    """Git Re-Basin weight matching of ``parent`` onto ``target`` (equal widths).

    Args:
      parent, target: Flax variables with the spec's leaves and equal widths.
      spec: their alignment spec.
      max_sweeps: at most this many coordinate-descent sweeps over the plans.
      seed: seed (int or traced int) of the random plan order of each sweep.
      init_plans: starting point, plan name -> (n,) permutation or (n, n)
        plan (converted by column argmax, e.g. OTFusion's corrected exact
        plans: "refinement"); missing plans start at the identity. A plan
        excluded from the descent (the output plan unless ``align_output``)
        keeps its initial value.
      start: without ``init_plans``: "greedy" (default) first solves each plan
        once in the spec's order from the members whose other plans are
        already solved (its producers, like OTFusion's layer-by-layer pass, but
        maximising inner products), then descends from there; "identity" starts
        the descent from the identity, as Git Re-Basin does. The greedy start
        recovers a permuted copy exactly before any sweep; from the identity,
        coordinate descent can stop in a poorer local optimum (observed on
        small random MLPs).
      soft: Sinkhorn plans instead of permutations (see the module docstring).
      epsilon: soft only: entropic regularisation of Sinkhorn on ``-S / std(S)``.
      align_output: also match the output (class) plan.
      backend: the exact assignment solver: "device" (optax's Hungarian,
        ``ot.exact_assignment``: jit/vmap-able, stays on the accelerator),
        "auction" (``ot.exact_assignment_auction``: on device, parallel rounds) or
        "host" (scipy's ``linear_sum_assignment`` through ``jax.pure_callback``:
        faster on a CPU and much cheaper to compile, one host round trip per
        plan update).
      roles: leaf roles entering S and the objective; the default leaves out
        BatchNorm running statistics ("stat"), which describe data, not the
        function. All leaves are permuted regardless.
      tol: a new permutation is accepted only if it raises the plan's term
        ``sum_j S[perm[j], j]`` by more than ``tol`` times its magnitude
        (float32 rounding must not count as progress).
      soft_tol: soft only: a plan "changes" if an entry moves by more than this.
      sinkhorn_threshold, sinkhorn_max_iterations: soft only: Sinkhorn stopping rule.

    Returns:
      (perms, info): perms maps every plan of the spec to an (n,) int32 array,
      ``perm[j]`` = the parent neuron sent to target neuron j (the nearest
      permutation for ``soft``); info is a MatchingInfo.

    Raises:
      ValueError: leaves not matching the spec, or a plan with different widths.
    """
    sizes = _check_equal_widths(parent, target, spec)
    opts = _make_options(
        max_sweeps=max_sweeps,
        start="identity" if init_plans is not None else start,
        backend=backend,
        soft=soft,
        align_output=align_output,
        roles=roles,
        tol=tol,
        soft_tol=soft_tol,
        sinkhorn_threshold=sinkhorn_threshold,
        sinkhorn_max_iterations=sinkhorn_max_iterations,
    )
    key = seed if _is_key(seed) else jax.random.key(jnp.asarray(seed, jnp.uint32))
    init = _init_perms(init_plans, sizes, spec)
    return _weight_matching_jit(dict(parent), dict(target), init, key, _epsilon(epsilon), spec, opts)


def _epsilon(epsilon: float | jax.Array) -> jax.Array:
    if isinstance(epsilon, (int, float)) and not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    return jnp.asarray(epsilon, jnp.float32)


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def matching_objective(
    parent: Variables,
    target: Variables,
    spec: spec_lib.AlignmentSpec,
    perms: Mapping[str, jax.Array],
    roles: Sequence[str] = DEFAULT_ROLES,
) -> jax.Array:
    """The objective J: sum over leaves (of the given roles) of <parent permuted by perms, target>.

    Args:
      parent, target: Flax variables of equal widths.
      spec: their alignment spec.
      perms: plan name -> (n,) permutation or (n, n) plan, for every plan.
      roles: leaf roles summed over (as in ``weight_matching``).

    Returns:
      Scalar float32.
    """
    va = _viewed(spec_lib.flatten_paths(parent), spec)
    vb = _viewed(spec_lib.flatten_paths(target), spec)
    return _objective(va, vb, spec, dict(perms), tuple(roles))


def fuse_weight_matching(
    parents: Sequence[Variables],
    spec: spec_lib.AlignmentSpec,
    *,
    target: int = -1,
    weights: Sequence[float] | jax.Array | None = None,
    seed: int = 0,
    init_plans: Sequence[Mapping[str, jax.Array] | None] | None = None,
    epsilon: float | jax.Array = 0.1,
    **options: Any,
) -> tuple[dict[str, Any], WeightMatchingAux]:
    """Aligns every parent onto the target by weight matching and averages (like ``fusion.fuse``).

    Args:
      parents: K Flax variable dicts of equal widths.
      spec: their alignment spec.
      target: index of the parent whose neuron order the fused model keeps.
      weights: (K,) averaging weights (normalised), or None for 1/K.
      seed: parent k is matched with the key ``fold_in(key(seed), k)``.
      init_plans: optional per-parent starting plans (None entries for none).
      epsilon: soft only: Sinkhorn regularisation (see ``weight_matching``).
      **options: other options of ``weight_matching`` (max_sweeps, start, soft,
        backend, align_output, roles, ...).

    Returns:
      (fused variables, WeightMatchingAux).
    """
    parents = [dict(p) for p in parents]
    k = len(parents)
    try:
        fusion.check_parents(parents, spec, target)
    except fusion.FusionError as e:
        raise ValueError(str(e)) from None
    t = target % k
    if init_plans is not None and len(init_plans) != k:
        raise ValueError(f"init_plans has {len(init_plans)} entries for {k} parents")
    w = jnp.ones((k,)) if weights is None else jnp.asarray(weights, jnp.float32)
    if w.shape != (k,):
        raise ValueError(f"weights has shape {w.shape}, expected ({k},)")
    w = w / jnp.sum(w)
    if init_plans is not None:
        options = {**options, "start": "identity"}
    opts = _make_options(**options)
    inits = []
    for i, parent in enumerate(parents):
        if i == t:
            inits.append(None)
            continue
        sizes = _check_equal_widths(parent, parents[t], spec, what=f"parent {i}")
        inits.append(_init_perms(None if init_plans is None else init_plans[i], sizes, spec))
    return _fuse_jit(parents, inits, jax.random.key(seed), w, _epsilon(epsilon), spec, opts, t)


def _fuse_impl(parents, inits, key, w, epsilon, spec, opts: _Options, t: int):
    aligned, all_perms, infos = [], [], []
    for i, parent in enumerate(parents):
        if i == t:
            aligned.append(parent)
            all_perms.append(None)
            infos.append(None)
            continue
        perms, info = _weight_matching_impl(
            parent, parents[t], inits[i], jax.random.fold_in(key, i), epsilon, spec, opts
        )
        if opts.soft:
            aligned.append(fusion.apply_plans(parent, spec, info.plans))
        else:
            aligned.append(apply_perms(parent, spec, perms))
        all_perms.append(perms)
        infos.append(info)
    return fusion._weighted_sum(aligned, w), WeightMatchingAux(tuple(all_perms), tuple(infos), w)


_fuse_jit = jax.jit(_fuse_impl, static_argnums=(5, 6, 7))
