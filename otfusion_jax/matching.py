"""Git Re-Basin weight matching (Ainsworth et al., 2023) on an AlignmentSpec.

>>> fused, aux = otf.fuse([vars_a, vars_b], spec, WeightMatching(), key=jax.random.key(0))
>>> perms, info = weight_matching(vars_a, vars_b, spec)             # one pair, the permutations
>>> aligned_a = otf.apply_plans(vars_a, spec, perms)                 # a gather per plan axis

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
assignment (``ot.assignment(-S, backend)``). J is linear in each
plan's permutation when the others are fixed (as long as no leaf carries the
same plan on two axes), so with exact assignments it never decreases; a new
permutation is only accepted if it strictly improves the plan's term, and the
descent stops after a sweep that changes nothing, or after ``max_sweeps``.

Start: from the identity (``start="identity"``, the default, Git Re-Basin's
choice), or (our addition, ``start="greedy"``) before the descent, one
pass in the spec's order solves each plan from the members whose other plans
are already solved (its producers: OTFusion's layer-by-layer pass, with inner
products instead of distances). This recovers a permuted copy exactly before
any sweep, where coordinate descent from the identity can stall in a poorer
local optimum (seen on small random MLPs); on trained pairs the identity start
fuses better. ``restarts`` runs R sweep orders under ``vmap`` and keeps the
best objective.
``init_plans`` (e.g. OTFusion's plans: "refinement") replaces either start.

Solvers: the assignment solver every aligner uses, ``ot.assignment`` with
``backend`` one of ``ot.EXACT_BACKENDS`` ("auto": the native C++ solver on a CPU, else a
host solver (lapjv or scipy); the auction on accelerators). Plans of equal width share one solver instance
in the compiled graph.

Soft variant (``soft=True``): each plan is an entropic OT plan instead of a
permutation: Sinkhorn with uniform marginals on the cost ``-S / std(S)`` with
regularisation ``epsilon`` (the standardisation makes ``epsilon`` scale free),
rescaled to a doubly stochastic matrix times n (each column sums to 1: target
neuron j becomes a barycentre of parent neurons, like OTFusion's correction).
The other plans act by contraction with these soft plans. J is then not
guaranteed to increase; the descent stops when no plan moves by more than
``soft_tol`` (max abs entry change) in a sweep. The returned ``perms`` are the
nearest permutations (an exact assignment maximising overlap with each soft
plan); ``info.plans`` holds the soft plans, which the aligner returns (and
``otf.fuse`` applies).

Everything is pure and jit-compiled (the spec and the :class:`WeightMatching`
options are static; the key is traced, so new seeds do not recompile). Equal
widths only: permutations need them (use OTFusion otherwise).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from otfusion_jax import heads as heads_lib
from otfusion_jax import ot
from otfusion_jax import plans as plans_lib
from otfusion_jax import spec as spec_lib
from otfusion_jax.engine import Alignment, FusionError, check_equal_widths

__all__ = [
    "MatchingInfo",
    "WeightMatching",
    "Refine",
    "weight_matching",
    "matching_objective",
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
      plans: plan name -> (n, n) plan for ``otf.apply_plans``: the
        permutation matrices of ``perms``, or the soft (column-stochastic) plans.
      perms: plan name -> (n,) permutation (for ``soft``: the nearest one to each soft plan).
      restart_objectives: (R,) final objective of each restart (``WeightMatching.restarts``);
        the other fields describe the best one, ``restart_objectives.argmax()``.
      restart_perms: plan name -> (R, n) permutations of every restart (to rank
        the restarts by something else, e.g. the fused model's training loss:
        ``experiment`` does).
    """

    objective: jax.Array
    n_sweeps: jax.Array
    converged: jax.Array
    plans: dict[str, jax.Array]
    perms: dict[str, jax.Array]
    restart_objectives: jax.Array
    restart_perms: dict[str, jax.Array]


def _viewed(flat: Mapping[str, jax.Array], spec: spec_lib.AlignmentSpec) -> dict[str, jax.Array]:
    return {path: flat[path].reshape(spec_lib.view_shape(ls, flat[path].shape, path)) for path, ls in spec.leaves}


def _aligned(x: jax.Array, ls: spec_lib.LeafSpec, perms: Mapping[str, jax.Array], skip: int | None = None) -> jax.Array:
    for ax, name in enumerate(ls.axes):
        if name is not None and ax != skip:
            x = plans_lib.move_axis(x, perms[name], ax)
    return x


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
        raise FusionError(f"weight matching: plan {plan!r} acts on no leaf with a role in {roles}")
    return s


def _assignment(s: jax.Array, backend: str) -> jax.Array:
    """The permutation maximising sum_j S[perm[j], j], by the shared solver entry point."""
    return ot.assignment(-jax.lax.stop_gradient(s), backend)[1]


def _soft_cost(s: jax.Array, epsilon: jax.Array) -> jax.Array:
    """The soft variant's cost ``-S / (std(S) epsilon)``, solved by Sinkhorn with regularisation 1.

    Sinkhorn on C / epsilon with regularisation 1 is Sinkhorn on C with
    epsilon: epsilon stays a traced value (new values do not recompile).
    """
    return -s / ((jnp.std(s) + 1e-12) * epsilon)


def _solve(
    s: jax.Array, old: jax.Array, epsilon: jax.Array, opts: WeightMatching, hard: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Re-solves one plan from its similarity S (n, n). Returns (new perm or plan, changed).

    ``hard`` (a permutation-only plan of a soft descent): the best permutation, as a matrix.
    """
    n = s.shape[0]
    if opts.soft and hard:
        new = plans_lib.as_matrix(plans_lib.Permutation(_assignment(s, opts.backend), 1.0), n, old.dtype)
        return new, jnp.max(jnp.abs(new - old)) > opts.soft_tol
    if opts.soft:
        cost = _soft_cost(s, epsilon)
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


def _group_branch(
    names, va, vb, epsilon, spec, opts: WeightMatching, ready: Mapping[str, frozenset] | None, hard: bool = False
):
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
        new, changed = _solve(s, old, epsilon, opts, hard)
        ps = dict(ps)
        for j, name in enumerate(names):
            ps[name] = jnp.where(local % len(names) == j, new, ps[name])
        return ps, changed

    return branch


def _head_branch(group: spec_lib.HeadGroup, va, vb, epsilon, spec, opts: WeightMatching, ready):
    """The switch branch of one attention head group: its plans re-solved together, whole heads first.

    ``local`` 0 re-solves from the full similarities, 1 (greedy start) from the
    members whose other plans are ready. Exact: the best head-structured
    permutations of ``sum_p S_p`` (``heads.head_assignment``), accepted if they
    raise the group's term; soft: head-structured Sinkhorn plans.
    """
    def sims(ps, rd=None):
        return [_similarity(va, vb, spec, p, ps, opts.roles, None if rd is None else rd[p]) for p in group.plans]

    cases = [sims] + ([lambda ps: sims(ps, ready)] if ready is not None else [])
    rigid = [p in group.rigid for p in group.plans]

    def branch(ps, local):
        ss = jax.lax.switch(local, cases, ps) if len(cases) > 1 else cases[0](ps)
        old = [ps[p] for p in group.plans]
        if opts.soft:
            costs = [_soft_cost(s, epsilon) for s in ss]
            raw, _ = heads_lib.head_sinkhorn(
                costs,
                group.heads,
                epsilon=1.0,
                relative_epsilon=None,
                threshold=opts.sinkhorn_threshold,
                max_iterations=opts.sinkhorn_max_iterations,
                implicit_diff=False,
                rigid=rigid,
            )
            new = [(t * t.shape[0]).astype(o.dtype) for t, o in zip(raw, old)]
            changed = jnp.any(jnp.stack([jnp.max(jnp.abs(a - b)) > opts.soft_tol for a, b in zip(new, old)]))
        else:
            perms, _, _ = heads_lib.head_assignment(
                [-jax.lax.stop_gradient(s) for s in ss], group.heads, opts.backend, rigid=rigid
            )
            gain_old = sum(jnp.sum(s[o, jnp.arange(s.shape[1])]) for s, o in zip(ss, old))
            gain_new = sum(jnp.sum(s[p, jnp.arange(s.shape[1])]) for s, p in zip(ss, perms))
            changed = gain_new > gain_old + opts.tol * jnp.abs(gain_old)
            new = [jnp.where(changed, p.astype(o.dtype), o) for p, o in zip(perms, old)]
        ps = dict(ps)
        ps.update(zip(group.plans, new))
        return ps, changed

    return branch


def _weight_matching_impl(parent, target, init, key, epsilon, spec, opts: WeightMatching, greedy: bool):
    va = _viewed(spec_lib.flatten_paths(parent), spec)
    vb = _viewed(spec_lib.flatten_paths(target), spec)
    perms = dict(init)
    if opts.soft:
        perms = plans_lib.perms_to_plans(perms, jnp.float32)
    active = [p for p in spec.plans if opts.align_output or p != spec.output_plan]
    # A unit is solved in one step: a plan, or an attention head group (its plans share the head map).
    units = [(p,) if spec.head_group(p) is None else spec.head_group(p).plans for p in active]
    units = [u for i, u in enumerate(units) if u not in units[:i]]
    # Single plans share a solver per (width, permutation-only): a soft descent keeps those hard.
    groups: dict[tuple[int, bool], list[str]] = {}
    group_key = {p: (init[p].shape[0], p in spec.permutation_only) for p in active}
    for (name, *_) in units:
        if spec.head_group(name) is None:
            groups.setdefault(group_key[name], []).append(name)
    head_units = [u for u in units if spec.head_group(u[0]) is not None]
    ready = None
    if greedy:
        # Plans before P in spec.plans (topological), plus the fixed ones.
        fixed = frozenset(p for p in spec.plans if p not in active)
        ready = {p: fixed | frozenset(spec.plans[: spec.plans.index(p)]) for p in active}
    branches = [_group_branch(names, va, vb, epsilon, spec, opts, ready, hard) for (_, hard), names in groups.items()]
    branches += [_head_branch(spec.head_group(u[0]), va, vb, epsilon, spec, opts, ready) for u in head_units]
    branch_of, local_of, greedy_of = [], [], []
    for u in units:
        if u in head_units:
            branch_of.append(len(groups) + head_units.index(u))
            local_of.append(0)
            greedy_of.append(1)
        else:
            names = groups[group_key[u[0]]]
            branch_of.append(list(groups).index(group_key[u[0]]))
            local_of.append(names.index(u[0]))
            greedy_of.append(names.index(u[0]) + len(names))
    group_of = jnp.array(branch_of, jnp.int32)
    local_of, greedy_of = np.array(local_of, np.int32), np.array(greedy_of, np.int32)
    active = units  # the descent visits units

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

    if greedy and active:
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
        for group in spec.heads:  # the nearest permutations that move whole heads
            nearest, _, _ = heads_lib.head_assignment(
                [-plans[p] for p in group.plans], group.heads, opts.backend, rigid=[p in group.rigid for p in group.plans]
            )
            perms.update(zip(group.plans, nearest))
    else:
        plans = plans_lib.perms_to_plans(perms, jnp.result_type(*[x.dtype for x in vb.values()]))
    return perms, MatchingInfo(objs, n_sweeps, converged, plans, perms, objs[-1:], {k: p[None] for k, p in perms.items()})


# ----------------------------------------------------------------------------- the aligners


@dataclasses.dataclass(frozen=True)
class WeightMatching:
    """Git Re-Basin weight matching as an aligner (equal widths; static under jit).

    Attributes:
      max_sweeps: at most this many coordinate-descent sweeps over the plans.
      start: "identity" (default) starts the descent from the identity, as Git
        Re-Basin does; "greedy" first solves each plan once in the spec's
        order from the members whose other plans are already solved (its
        producers, like OTFusion's layer-by-layer pass, but maximising inner
        products), then descends from there. The greedy start recovers a
        permuted copy exactly before any sweep and reaches higher objectives
        on trained pairs, but fuses them worse (digits and Fashion MLPNet
        pairs: 94.1% / 73.8% mean accuracy against 94.3% / 75.6% from the
        identity, and 96.0% / 77.1% with 8 restarts; ``docs/RESULTS.md``).
        A given starting point (``Refine``) replaces either.
      soft: Sinkhorn plans instead of permutations (see the module docstring).
      epsilon: soft only: entropic regularisation of Sinkhorn on ``-S / std(S)``
        (``params={"epsilon": e}`` overrides it with a traced value).
      align_output: also match the output (class) plan.
      backend: the exact assignment solver, one of ``ot.EXACT_BACKENDS``
        (``ot.assignment``; "auto" is a host solver, lapjv or scipy, on a CPU backend).
      roles: leaf roles entering S and the objective; the default leaves out
        BatchNorm running statistics ("stat"), which describe data, not the
        function. All leaves are permuted regardless.
      tol: a new permutation is accepted only if it raises the plan's term
        ``sum_j S[perm[j], j]`` by more than ``tol`` times its magnitude
        (float32 rounding must not count as progress).
      soft_tol: soft only: a plan "changes" if an entry moves by more than this.
      sinkhorn_threshold, sinkhorn_max_iterations: soft only: Sinkhorn stopping rule.
      restarts: R descents (default 8) from the same start with R different sweep orders
        (keys ``key, fold_in(key, 1), ..., fold_in(key, R - 1)``), solved
        together under ``vmap`` (one after another with the auction backend,
        whose vmap rule fails inside this loop); the plans with the best final objective win
        (never worse than any single restart; restart 0 is the single run).
        Git Re-Basin's own result varies with its seed (its sweep order): this
        takes the best of R seeds in one call.
    """

    max_sweeps: int = 20
    start: str = "identity"
    soft: bool = False
    epsilon: float = 0.1
    align_output: bool = False
    backend: str = "auto"
    roles: tuple[str, ...] = DEFAULT_ROLES
    tol: float = 1e-6
    soft_tol: float = 1e-4
    sinkhorn_threshold: float = 1e-3
    sinkhorn_max_iterations: int = 2000
    restarts: int = 8

    needs_activations = False  # class attributes of the aligner interface, not options
    incoming = True

    def __post_init__(self):
        object.__setattr__(self, "roles", tuple(self.roles))
        if self.start not in ("greedy", "identity"):
            raise FusionError(f"WeightMatching.start must be 'greedy' or 'identity', got {self.start!r}")
        if self.backend not in ot.EXACT_BACKENDS:
            raise FusionError(f"WeightMatching.backend must be one of {ot.EXACT_BACKENDS}, got {self.backend!r}")
        if not isinstance(self.max_sweeps, int) or isinstance(self.max_sweeps, bool) or self.max_sweeps < 0:
            raise FusionError(f"WeightMatching.max_sweeps must be an int >= 0, got {self.max_sweeps!r}")
        unknown = set(self.roles) - set(spec_lib.ROLES)
        if unknown:
            raise FusionError(f"WeightMatching.roles must be among {spec_lib.ROLES}, got {sorted(unknown)}")
        if not self.epsilon > 0:
            raise FusionError(f"WeightMatching.epsilon must be > 0, got {self.epsilon}")
        if not isinstance(self.restarts, int) or isinstance(self.restarts, bool) or self.restarts < 1:
            raise FusionError(f"WeightMatching.restarts must be an int >= 1, got {self.restarts!r}")

    def check(self, sizes: Sequence[Mapping[str, int]], target: int) -> None:
        """Permutations need equal widths: raises FusionError naming the plan otherwise."""
        check_equal_widths(sizes, target, "weight matching")

    def match(
        self,
        parent: Variables,
        target: Variables,
        spec: spec_lib.AlignmentSpec,
        key: jax.Array | None = None,
        params: Mapping[str, Any] | None = None,
        init: Mapping[str, jax.Array] | None = None,
    ) -> tuple[dict[str, jax.Array], MatchingInfo]:
        """The descent for one parent (traceable): (perms, MatchingInfo); ``init`` replaces the start."""
        sizes = spec.check_variables(target)
        start = {} if init is None else dict(init)
        perms = {name: start[name].astype(jnp.int32) if name in start else jnp.arange(sizes[name], dtype=jnp.int32)
                 for name in spec.plans}
        key = jax.random.key(0) if key is None else key
        eps = jnp.asarray(self.epsilon if params is None else params.get("epsilon", self.epsilon), jnp.float32)
        greedy = self.start == "greedy" and init is None

        def one(k):
            return _weight_matching_impl(parent, target, perms, k, eps, spec, self, greedy)

        if self.restarts == 1:
            return one(key)
        keys = jnp.stack([key] + [jax.random.fold_in(key, r) for r in range(1, self.restarts)])
        if ot.resolve_backend(self.backend) == "auction":
            # The auction's custom vmap rule fails inside vmap(while_loop(switch(...))) (a JAX assertion on
            # batched constants of the rule), so its restarts run one after another.
            all_perms, all_info = jax.lax.map(one, keys)
        else:
            all_perms, all_info = jax.vmap(one)(keys)
        finals = all_info.objective[:, -1]
        best = jnp.argmax(finals)  # the first of equal bests: restart 0 wins ties
        pick = functools.partial(jax.tree_util.tree_map, lambda x: x[best])
        return pick(all_perms), pick(all_info)._replace(restart_objectives=finals, restart_perms=all_perms)

    def align(
        self,
        parent: Variables,
        target: Variables,
        spec: spec_lib.AlignmentSpec,
        *,
        parent_acts: Any = None,
        target_acts: Any = None,
        key: jax.Array | None = None,
        params: Mapping[str, Any] | None = None,
        init: Mapping[str, jax.Array] | None = None,
    ) -> Alignment:
        """Weight matching plans for one parent: permutations, or the soft plans."""
        del parent_acts, target_acts
        return self._alignment(*self.match(parent, target, spec, key, params, init))

    def _alignment(self, perms: Mapping[str, jax.Array], info: MatchingInfo) -> Alignment:
        """The aligner's answer for a descent's result: the soft plans, or the permutations."""
        plans = info.plans if self.soft else {k: plans_lib.Permutation(p, 1.0) for k, p in perms.items()}
        return Alignment(plans, {}, info)


@dataclasses.dataclass(frozen=True)
class Refine:
    """One aligner's plans, refined by weight matching: ``first``'s plans (as permutations) start ``then``.

    ``Refine(FusionConfig(mode="weights", solver="exact"), WeightMatching())``
    is ``fuse.py``'s ``wm-refine`` (weight matching started from OTFusion's plans).
    """

    first: Any
    then: WeightMatching = WeightMatching()

    @property
    def needs_activations(self) -> bool:
        return self.first.needs_activations

    incoming = True

    def check(self, sizes: Sequence[Mapping[str, int]], target: int) -> None:
        self.first.check(sizes, target)
        self.then.check(sizes, target)

    def match(
        self,
        parent: Variables,
        target: Variables,
        spec: spec_lib.AlignmentSpec,
        key: jax.Array | None = None,
        params: Mapping[str, Any] | None = None,
        *,
        parent_acts: Any = None,
        target_acts: Any = None,
    ) -> tuple[dict[str, jax.Array], MatchingInfo]:
        """``then``'s descent started from ``first``'s plans: (perms, MatchingInfo), as :meth:`WeightMatching.match`
        (so that wrappers which rank the restarts, such as fuse.py's training-loss ranking, take either)."""
        first = self.first.align(
            parent, target, spec, parent_acts=parent_acts, target_acts=target_acts, key=key, params=params
        )
        return self.then.match(parent, target, spec, key, None, plans_lib.plans_to_perms(first.plans))

    def align(self, parent, target, spec, *, parent_acts=None, target_acts=None, key=None, params=None) -> Alignment:
        return self.then._alignment(
            *self.match(parent, target, spec, key, params, parent_acts=parent_acts, target_acts=target_acts)
        )


def weight_matching(
    parent: Variables,
    target: Variables,
    spec: spec_lib.AlignmentSpec,
    config: WeightMatching | None = None,
    *,
    seed: int | jax.Array = 0,
    init_plans: Mapping[str, jax.Array] | None = None,
    **options: Any,
) -> tuple[dict[str, jax.Array], MatchingInfo]:
    """Weight matching of one ``parent`` onto ``target`` (equal widths): the permutations and the report.

    ``otf.fuse(parents, spec, WeightMatching(...))`` fuses with it; this returns
    the permutations of one pair (e.g. to study the descent).

    Args:
      parent, target: Flax variables with the spec's leaves and equal widths.
      spec: their alignment spec.
      config: the options (default ``WeightMatching(**options)``).
      seed: seed (int or traced int, or a PRNG key) of the random plan order of each sweep.
      init_plans: starting point, plan name -> (n,) permutation or (n, n)
        plan (converted by column argmax, e.g. OTFusion's corrected exact
        plans: "refinement"); missing plans start at the identity. A plan
        excluded from the descent (the output plan unless ``align_output``)
        keeps its initial value.
      **options: ``WeightMatching`` fields, when ``config`` is not given.

    Returns:
      (perms, info): perms maps every plan of the spec to an (n,) int32 array,
      ``perm[j]`` = the parent neuron sent to target neuron j (the nearest
      permutation for ``soft``); info is a MatchingInfo.

    Raises:
      FusionError: leaves not matching the spec, or a plan with different widths.
    """
    if config is None:
        config = WeightMatching(**options)
    elif options:
        raise FusionError(f"weight_matching: give either config or options, not both ({sorted(options)})")
    try:
        sizes = [spec.check_variables(parent, what="parent"), spec.check_variables(target, what="target")]
    except spec_lib.SpecError as e:
        raise FusionError(str(e)) from None
    config.check(sizes, 1)
    if init_plans is not None:
        config = dataclasses.replace(config, start="identity")  # a given start replaces the greedy one
    # An identity start is an explicit identity init: one compiled program for both.
    init = _init_perms(init_plans or {}, sizes[1], spec) if config.start == "identity" else None
    key = seed if _is_key(seed) else jax.random.key(jnp.asarray(seed, jnp.uint32))
    return _match_jit(dict(parent), dict(target), spec, config, key, init)


_match_jit = jax.jit(
    lambda parent, target, spec, config, key, init: config.match(parent, target, spec, key, None, init),
    static_argnums=(2, 3),
)


def _init_perms(init_plans, sizes, spec) -> dict[str, jax.Array]:
    unknown = set(init_plans) - set(spec.plans)
    if unknown:
        raise FusionError(f"init_plans names plans not in the spec: {sorted(unknown)}")
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
            raise FusionError(f"init_plans[{name!r}] has shape {p.shape}, expected ({n},) or ({n}, {n})")
        perms[name] = p.astype(jnp.int32)
    return perms


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
      roles: leaf roles summed over (as in ``WeightMatching``).

    Returns:
      Scalar float32.
    """
    va = _viewed(spec_lib.flatten_paths(parent), spec)
    vb = _viewed(spec_lib.flatten_paths(target), spec)
    return _objective(va, vb, spec, dict(perms), tuple(roles))
