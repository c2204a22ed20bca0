"""OTFusion (Singh & Jaggi, 2020) as an aligner: layer-by-layer transport plans onto a target.

>>> model, spec = otf.models.build("mlpnet", bias=False)
>>> fused, aux = otf.fuse([vars_a, vars_b], spec, otf.FusionConfig(mode="weights", solver="exact"))

``FusionConfig`` holds OTFusion's options and is the aligner ``otf.fuse``
calls (``otfusion_jax.engine`` owns the K-parent loop, the checks and the
averaging). Per plan, in the spec's (topological) order, for a parent A and
the target B, :meth:`FusionConfig.align`:

1. reads the plan's producers (leaves whose output axis it is) with their
   input axes moved by the plans already computed;
2. computes the ground cost between A's and B's neurons: rows of those aligned
   weights (weight mode) or the neurons' activations on the same samples
   (activation mode);
3. solves a transport plan (exact or Sinkhorn), then applies the correction
   (each target neuron becomes a barycentre of A's neurons);
4. returns the plans; the engine moves every leaf of A with them
   (``plans.apply_plans``: a gather where the plan permutes) and averages.

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

Transformers (see ``otfusion_jax.spec``): the plans of an attention head group
are solved together at the first one's turn (``heads.head_assignment`` /
``heads.head_sinkhorn``: whole heads matched from the summed within-head costs,
then neurons within matched heads), and a permutation-only plan (a stream
through LayerNorm) is rounded to the nearest permutation when the solver gives
a soft plan. The original has neither (nor any attention support).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from otfusion_jax import heads as heads_lib
from otfusion_jax import ot
from otfusion_jax import plans as plans_lib
from otfusion_jax import spec as spec_lib
from otfusion_jax.engine import Alignment, FusionError

__all__ = ["FusionConfig", "OTFusion", "EXACT_BACKENDS", "SYMMETRIES", "STREAM_POLICIES"]

Variables = Mapping[str, Any]
Activations = Mapping[str, Sequence[jax.Array]]
EXACT_BACKENDS = ot.EXACT_BACKENDS
SYMMETRIES = ("permutation", "orthogonal")
STREAM_POLICIES = ("shared", "mean")


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """OTFusion's options, and the OTFusion aligner (static under jit: frozen and hashable).

    Attributes:
      mode: "weights" (costs between incoming weights) or "activations" (costs
        between the neurons' activations on shared samples).
      solver: "exact" or "sinkhorn".
      exact_backend: square uniform problems (the rest always use the host's
        exact LP), one of ``ot.EXACT_BACKENDS``: "auto" (default: the fastest
        for the platform, ``ot.resolve_backend``: "native" on a CPU where a C++
        compiler is found, else "lapjv" or "host"; "auction" on accelerators),
        "native" (``otfusion_jax.native``: a C++ solver called as an XLA FFI
        target, CPU only; cacheable by the persistent compilation cache),
        "device" (optax Hungarian: jit/vmap-able,
        sequential), "auction" (``ot.exact_assignment_auction``: parallel
        rounds on device; optimal for the cost rounded to a grid of
        range / (2^26 / (n + 1))), "host" (scipy through a host callback) or
        "lapjv" (the optional ``lapjv`` package's Jonker-Volgenant through a
        host callback: ``pip install 'otfusion-jax[fast]'``).
      auction_bidders: "auction" only: free rows bidding per round (None: 16 on
        a CPU backend, all on accelerators).
      ground_metric: "euclidean", "cosine" or "correlation" (1 - Pearson
        correlation of each neuron's values; not in the original).
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
      symmetry: transformers (specs with permutation-only streams and head
        groups): "permutation" (default) aligns the residual stream with a
        permutation and attention heads with permutations within heads;
        "orthogonal" uses the larger symmetry a transformer has: the stream,
        once every norm's scale and bias are folded into its readers
        (``prepare``: ``spec.fold_norms``, the same function), admits any
        orthogonal map that keeps the all-ones vector, and a head's Q/K (and
        its V/output projection) any orthogonal map within the head. Both are
        solved by orthogonal Procrustes (from activations or from the
        producers' weights; ``ot.orthogonal_plan``, ``heads.head_orthogonal``),
        the head map by an exact assignment, and are used without correction;
        MLP hidden units (a privileged basis: GELU acts per unit) keep the
        solver's plans. Not in the original, nor in transformer-fusion.
      stream_policy: residual streams that declare their sums (``spec.streams``:
        transformers): "shared" (default) aligns the whole stream with one plan
        computed from all of its producers; "mean" is transformer-fusion's
        residual policy (Imfeld et al., 2024), for comparison: each branch
        (attention or MLP output) gets its own plan and the stream after a sum
        is moved by the mean of the incoming stream's plan and the branch's
        (``spec.per_sum_plans``): soft, and only approximately aligned where the
        two differ. With ``symmetry="permutation"`` only.

    Averaging weights, the original's ensemble step and the target are
    arguments of ``otf.fuse`` (``weights=``, ``engine.ensemble_weights``, ``target=``).
    """

    mode: str = "weights"
    solver: str = "exact"
    exact_backend: str = "auto"
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
    symmetry: str = "permutation"
    stream_policy: str = "shared"

    def __post_init__(self):
        choices = {
            "mode": ("weights", "activations"),
            "solver": ("exact", "sinkhorn"),
            "exact_backend": EXACT_BACKENDS,
            "ground_metric": ot.METRICS,
            "normalize_cost": ot.COST_NORMS,
            "relative_epsilon": (None, "mean", "std"),
            "importance": (None, "l1", "l2"),
            "symmetry": SYMMETRIES,
            "stream_policy": STREAM_POLICIES,
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
        if not (isinstance(self.sinkhorn_max_iterations, numbers.Integral) and self.sinkhorn_max_iterations >= 1):
            raise FusionError(f"FusionConfig.sinkhorn_max_iterations must be an int >= 1, got {self.sinkhorn_max_iterations!r}")
        if self.symmetry == "orthogonal" and not self.past_correction:
            raise FusionError("FusionConfig.symmetry='orthogonal' needs past_correction=True (rotations act on both sides)")
        if not self.sinkhorn_threshold > 0:
            raise FusionError(f"FusionConfig.sinkhorn_threshold must be > 0, got {self.sinkhorn_threshold}")
        if self.stream_policy == "mean" and self.symmetry == "orthogonal":
            raise FusionError("FusionConfig.stream_policy='mean' mixes plans; it needs symmetry='permutation'")

    # --------------------------------------------------------------- the aligner interface

    @property
    def needs_activations(self) -> bool:
        return self.mode == "activations"

    @property
    def incoming(self) -> bool:
        return self.past_correction

    def check(self, sizes: Sequence[Mapping[str, int]], target: int) -> None:
        """Nothing to check up front: transport plans take any widths (``align`` checks the class layer)."""
        del sizes, target

    def respec(self, spec: spec_lib.AlignmentSpec) -> spec_lib.AlignmentSpec:
        """``stream_policy="mean"``: the spec with a plan per residual sum (``spec.per_sum_plans``); else ``spec``.

        Raises:
          FusionError: "mean" on a spec without declared streams.
        """
        if self.stream_policy == "shared" or spec.derived or spec.taps:  # shared, or already per-sum
            return spec
        if not spec.streams:
            raise FusionError(
                "stream_policy='mean' needs a spec that declares its residual streams' sums (spec.streams: the "
                "transformers'); this spec declares none"
            )
        return spec_lib.per_sum_plans(spec)

    def prepare(self, variables: Variables, spec: spec_lib.AlignmentSpec) -> Variables:
        """``symmetry="orthogonal"``: the parent with its norms folded (``spec.fold_norms``); else as it is.

        Raises:
          FusionError: a norm on a permutation-only plan that ``spec.folds`` does not fold: a rotation would
            change what it computes.
        """
        if self.symmetry != "orthogonal":
            return variables
        folded = {f"params/{norm}/scale" for norm, _ in spec.folds}
        for path, ls in spec.leaves:
            if ls.role == "norm" and ls.axes[-1] in spec.permutation_only and path.endswith("/scale") and path not in folded:
                raise FusionError(
                    f"symmetry='orthogonal': the norm {path.rsplit('/', 1)[0]!r} on stream {ls.axes[-1]!r} is not in "
                    "spec.folds, so its scale cannot be folded away and a rotation would change the model"
                )
        return spec_lib.fold_norms(variables, spec) if spec.folds else variables

    def align(
        self,
        parent: Variables,
        target: Variables,
        spec: spec_lib.AlignmentSpec,
        *,
        parent_acts: Activations | None = None,
        target_acts: Activations | None = None,
        key: jax.Array | None = None,
        params: Mapping[str, jax.Array] | None = None,
    ) -> Alignment:
        """OTFusion's plans for one parent, layer by layer.

        Args:
          parent, target: Flax variables (the parent may be wider or narrower).
          spec: the shared alignment spec.
          parent_acts, target_acts: activation mode: plan name -> tuple of (S, ..., n) arrays.
          key: unused (OTFusion is deterministic).
          params: Sinkhorn: plan name -> epsilon overriding ``epsilon`` (may be
            traced: differentiable, see ``otfusion_jax.learned``). A head group
            reads its first plan's entry; a permutation-only plan's rounding
            passes no gradient to its entry.

        Returns:
          ``engine.Alignment``: corrected plans (a Permutation where the plan
          permutes, else an (n, m) matrix) and per-plan ``ot.PlanInfo``.
        """
        del key
        if spec.taps and self.mode == "activations":  # per-sum stream plans: what each sum adds to the stream
            try:
                parent_acts = spec_lib.stream_activations(spec, parent_acts or {})
                target_acts = spec_lib.stream_activations(spec, target_acts or {})
            except spec_lib.SpecError as e:
                raise FusionError(str(e)) from None
        derived = dict(spec.derived)
        fa, fb = spec_lib.flatten_paths(parent), spec_lib.flatten_paths(target)
        dtype = jnp.result_type(*[x.dtype for x in fb.values()])
        plans: dict[str, plans_lib.Plan] = {}
        infos: dict[str, ot.PlanInfo] = {}
        roles = ("weight", "bias", "additive") if self.bias_in_cost else ("weight", "additive")
        for name in spec.plans:
            if name in plans:
                continue  # solved with its head group
            if name in derived:  # the mean of earlier plans (stream_policy="mean")
                plans[name] = sum(plans_lib.as_matrix(plans[src], dtype=dtype) for src in derived[name]) / len(derived[name])
                continue
            eps = None if params is None else params.get(name)
            group = spec.head_group(name)
            if self.symmetry == "orthogonal" and (group is not None or name in spec.permutation_only):
                names = group.plans if group is not None else (name,)
                grams = [self._gram(fa, fb, spec, p, plans, roles, parent_acts, target_acts) for p in names]
                for p, plan, info in zip(names, *self._solve_orthogonal(names, grams, group, dtype)):
                    plans[p], infos[p] = plan, info
                continue
            if group is not None:
                costs = [self._cost(fa, fb, spec, p, plans, roles, parent_acts, target_acts)[0] for p in group.plans]
                for p, plan, info in zip(group.plans, *self._solve_heads(costs, group, eps, dtype)):
                    plans[p], infos[p] = plan, info
                continue
            cost, n, m = self._cost(fa, fb, spec, name, plans, roles, parent_acts, target_acts)
            if name == spec.output_plan and not self.align_output:
                if n != m:
                    raise FusionError(f"layer {name!r}: align_output=False needs equal widths, got {n} and {m}")
                plans[name] = plans_lib.Permutation(jnp.arange(n), 1.0)
                continue
            use_importance = self.importance is not None and name != spec.output_plan
            if use_importance:
                # Like the original: norms of the raw incoming weights, biases left out.
                a = ot.importance_marginal(_neuron_rows(fa, spec, name, None, ("weight",)), self.importance)
                b = ot.importance_marginal(_neuron_rows(fb, spec, name, None, ("weight",)), self.importance)
            else:
                a = jnp.full((n,), 1.0 / n, cost.dtype)
                b = jnp.full((m,), 1.0 / m, cost.dtype)
            plan, infos[name] = self._solve(cost, a, b, not use_importance, eps, n, dtype)
            if name in spec.permutation_only and not isinstance(plan, plans_lib.Permutation):
                plan = self._rounded(name, plan, n, m)
            plans[name] = plan
        return Alignment(plans, infos)

    def _features(self, fa, fb, spec, name, plans, roles, parent_acts, target_acts):
        """The plan's neurons on both sides, as (..., n) and (..., m) tensors: what its cost or Gram is computed from.

        Weight mode: the producers' leaves as they are stored, the neurons last, A's
        input axes moved by the plans so far; activation mode: the activations
        (the producers still tell the widths they are checked against).
        """
        cols_a = _neuron_columns(fa, spec, name, plans, roles)
        cols_b = _neuron_columns(fb, spec, name, None, roles)
        if self.mode == "activations":
            return activation_tensors(parent_acts, target_acts, name, cols_a[0].shape[-1], cols_b[0].shape[-1])
        return cols_a, cols_b

    def _cost(self, fa, fb, spec, name, plans, roles, parent_acts, target_acts) -> tuple[jax.Array, int, int]:
        """The plan's normalised (n, m) ground cost, from its producers' aligned weights or its activations."""
        if name == spec.output_plan and not self.align_output:  # not solved: the output keeps the classes in place
            n = _neuron_columns(fa, spec, name, plans, roles)[0].shape[-1]
            m = _neuron_columns(fb, spec, name, None, roles)[0].shape[-1]
            return jnp.zeros((0, 0)), n, m
        xs, ys = self._features(fa, fb, spec, name, plans, roles, parent_acts, target_acts)
        unit_norm = self.unit_norm_rows and self.mode == "weights"
        raw = ot.pairwise_cost_columns(xs, ys, self.ground_metric, self.squared, unit_norm=unit_norm)
        return ot.normalize_cost(raw, self.normalize_cost), xs[0].shape[-1], ys[0].shape[-1]

    def _gram(self, fa, fb, spec, name, plans, roles, parent_acts, target_acts):
        """``ot.cross_gram`` of the plan's neurons: their activations, or their producers' (input-aligned) weights."""
        return ot.cross_gram(*self._features(fa, fb, spec, name, plans, roles, parent_acts, target_acts))

    def _solve_orthogonal(self, names, grams, group: spec_lib.HeadGroup | None, dtype):
        """Orthogonal plans: a stream's (keeping the ones vector) or a head group's (whole heads, rotations within)."""
        for p, (g, _, _) in zip(names, grams):
            if g.shape[0] != g.shape[1]:
                raise FusionError(
                    f"layer {p!r}: orthogonal plans need equal widths in every parent, got {g.shape[0]} and {g.shape[1]}"
                )
        if group is None:
            g, nx2, ny2 = grams[0]
            plan = ot.orthogonal_plan(g)
            residual = (jnp.sum(nx2) + jnp.sum(ny2) - 2.0 * jnp.sum(plan * g)) / g.shape[0]  # per neuron
            infos = [ot.solved_info(residual, g.dtype)]
            return [plan.astype(dtype)], infos
        rigid = [p in group.rigid for p in group.plans]
        out, _, residual = heads_lib.head_orthogonal(
            grams, group.heads, self.exact_backend, bidders=self.auction_bidders, rigid=rigid
        )
        per_neuron = residual / sum(g.shape[0] for g, _, _ in grams)
        return [t.astype(dtype) for t in out], [ot.solved_info(per_neuron, grams[0][0].dtype)] * len(out)

    def _solve_heads(self, costs, group: spec_lib.HeadGroup, epsilon, dtype):
        """A head group's plans (:mod:`otfusion_jax.heads`): whole heads matched, then neurons within heads."""
        for p, c in zip(group.plans, costs):
            if c.shape[0] != c.shape[1]:
                raise FusionError(
                    f"layer {p!r}: head-structured plans need the same heads and head size in every parent; "
                    f"the parent has {c.shape[0]} neurons, the target {c.shape[1]} ({group.heads} heads in the spec)"
                )
        if self.importance is not None:
            raise FusionError(f"layer {group.plans[0]!r}: importance marginals are not defined for attention heads")
        rigid = [p in group.rigid for p in group.plans]
        if self.solver == "exact":
            perms, _, _ = heads_lib.head_assignment(
                costs, group.heads, self.exact_backend, bidders=self.auction_bidders, rigid=rigid
            )
            out = [plans_lib.Permutation(p, self._permutation_scale(c.shape[0])) for p, c in zip(perms, costs)]
            infos = [ot.solved_info(jnp.sum(c[p, jnp.arange(c.shape[1])]) / c.shape[0]) for p, c in zip(perms, costs)]
            return out, infos
        raw, info = heads_lib.head_sinkhorn(
            costs,
            group.heads,
            epsilon=self.epsilon if epsilon is None else epsilon,
            relative_epsilon=self.relative_epsilon,
            threshold=self.sinkhorn_threshold,
            max_iterations=self.sinkhorn_max_iterations,
            implicit_diff=self.implicit_diff,
            rigid=rigid,
        )
        out = [
            (ot.correct_plan(t, proper_marginals=self.proper_marginals) if self.correction else t).astype(dtype)
            for t in raw
        ]
        return out, [info] * len(out)

    def _rounded(self, name: str, plan: jax.Array, n: int, m: int) -> plans_lib.Permutation:
        """A permutation-only plan (a stream through LayerNorm): the permutation nearest to a soft plan."""
        if n != m:
            raise FusionError(
                f"layer {name!r} must stay a permutation (it passes through LayerNorm), so parents need equal "
                f"widths there; got {n} and {m}"
            )
        perm = ot.assignment(-jax.lax.stop_gradient(plan), self.exact_backend, bidders=self.auction_bidders)[1]
        return plans_lib.Permutation(perm, self._permutation_scale(n))

    def _solve(self, cost, a, b, uniform: bool, epsilon, n: int, dtype) -> tuple[plans_lib.Plan, ot.PlanInfo]:
        """One layer's corrected plan: a Permutation for square uniform exact problems, else a matrix."""
        if self.solver == "exact" and uniform and cost.shape[0] == cost.shape[1]:
            _, perm, info = ot.assignment(cost, self.exact_backend, bidders=self.auction_bidders)
            return plans_lib.Permutation(perm, self._permutation_scale(n)), info
        if self.solver == "sinkhorn":
            plan, info = ot.sinkhorn_plan(
                cost,
                a,
                b,
                epsilon=self.epsilon if epsilon is None else epsilon,
                relative_epsilon=self.relative_epsilon,
                threshold=self.sinkhorn_threshold,
                max_iterations=self.sinkhorn_max_iterations,
                implicit_diff=self.implicit_diff,
                tau=self.tau,
            )
        else:
            plan, info = ot.exact_transport(cost, a, b)
        if self.correction:
            plan = ot.correct_plan(plan, proper_marginals=self.proper_marginals)
        return plan.astype(dtype), info

    def _permutation_scale(self, n: int) -> float:
        """The value a 1/n entry of a permutation plan takes after the correction."""
        if not self.correction:
            return 1.0 / n
        if self.proper_marginals:
            return (1.0 / n) / (1.0 / n + ot.CORRECTION_EPS)
        return 1.0


OTFusion = FusionConfig  # the aligner's name in the engine's vocabulary


def _neuron_columns(
    flat: Mapping[str, jax.Array],
    spec: spec_lib.AlignmentSpec,
    plan: str,
    plans: Mapping[str, plans_lib.Plan] | None,
    roles: tuple[str, ...],
) -> list[jax.Array]:
    """The plan's ready producers of the given roles, (..., n) each, input axes moved by ``plans``.

    Every leaf keeps its stored layout with the plan's neurons on the last axis
    (an HWIO kernel (kh, kw, in, n), a dense kernel (in, n), a bias (n,)):
    ``ot.pairwise_cost_columns`` contracts the leading axes in place, so no
    transposed or concatenated rows are built. ``plans=None`` reads the leaves
    as they are (the target; raw importance norms).
    """
    lm = spec.leaf_map
    cols = []
    for path in spec.cost_producers(plan):
        ls = lm[path]
        if ls.role not in roles:
            continue
        in_axes = [] if plans is None else [ax for ax, n in enumerate(ls.axes[:-1]) if n is not None]
        cols.append(plans_lib.move_leaf(flat[path], ls, plans or {}, in_axes, path))
    return cols


def _neuron_rows(
    flat: Mapping[str, jax.Array],
    spec: spec_lib.AlignmentSpec,
    plan: str,
    plans: Mapping[str, plans_lib.Plan] | None,
    roles: tuple[str, ...],
) -> jax.Array:
    """Rows (n, d) of :func:`_neuron_columns` (concatenated; for the importance marginals only)."""
    cols = _neuron_columns(flat, spec, plan, plans, roles)
    return jnp.concatenate([jnp.moveaxis(x, -1, 0).reshape(x.shape[-1], -1) for x in cols], axis=1)


def activation_tensors(parent_acts, target_acts, name: str, n: int, m: int):
    """The plan's activation tensors of both sides, checked: the same samples, the neurons on the last axis."""
    xs = []
    for who, acts in (("parent", parent_acts), ("target", target_acts)):
        if acts is None or name not in acts:
            raise FusionError(f"{who}: no activations for layer {name!r} (have {sorted(acts or {})})")
        xs.append([jnp.asarray(a) for a in acts[name]])
    xa, xb = xs
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
    return xa, xb
