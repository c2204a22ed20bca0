"""Alignment specs: which axis of which parameter leaf each transport plan acts on.

A spec is the single source of truth about a model's structure for fusion. For
every leaf of the Flax variable dict (addressed by its "/"-joined path, e.g.
``"params/fc1/kernel"`` or ``"batch_stats/bn1/mean"``) it names, per array axis,
the plan acting on that axis or ``None``. Tensors added into one residual sum
carry the same plan name, so skip connections share a plan by construction; the
conv-to-dense flatten is described by a ``view`` (the shape the flat kernel is
read as), never guessed from shapes.

Transformers add two declarations (see :class:`HeadGroup`):

* **head groups**: attention's Q/K/V kernels ``(embed, heads, head_dim)`` are
  read through a view ``(embed, heads * head_dim)`` with one flat plan on the
  last axis (``qk`` for Q and K, ``vo`` for V and the output projection's
  input); a head group says that these flat plans move *whole heads* together
  (one permutation of heads shared by all of them) and neurons only *within*
  a head. Aligners solve a group's plans together (:mod:`otfusion_jax.heads`);
  the flat plans are block-structured and applied like any other plan.
* **permutation-only plans**: a residual stream that passes through
  LayerNorm may only be permuted (LayerNorm commutes with a permutation of its
  features, not with a barycentric mix of them); aligners return a
  permutation for these whatever their solver (Sinkhorn is rounded).

A residual stream may also declare the order of its sums (:class:`StreamSums`):
which tensors are added at each sum and which layers read the stream after it.
That is what :func:`per_sum_plans` needs to rebuild the spec with a plan per
sum (transformer-fusion's residual policy, ``FusionConfig(stream_policy="mean")``):
each branch gets a plan of its own and the stream after a sum is the mean of the
incoming stream's plan and the branch's (a *derived* plan, never solved).

Flax layouts put a layer's output features on the *last* axis of its kernel and
on the only axis of its bias / norm parameters, so a plan on a leaf's last axis
is that leaf's *output* (the leaf "produces" the plan's neurons); a plan on any
other axis acts on the leaf's input side.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax

__all__ = [
    "LeafSpec",
    "HeadGroup",
    "StreamSums",
    "AlignmentSpec",
    "SpecError",
    "dense",
    "conv",
    "norm",
    "layer_norm",
    "embedding",
    "attention",
    "mlp_block",
    "flatten_dense",
    "flatten_paths",
    "view_shape",
    "with_biases",
    "fold_norms",
    "per_sum_plans",
    "stream_activations",
    "unflatten_paths",
]

ROLES = ("weight", "bias", "norm", "stat", "additive")


class SpecError(ValueError):
    """A spec does not fit the variables it is applied to."""


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """How plans act on one leaf.

    Attributes:
      axes: one entry per axis of the (viewed) array: a plan name or None.
      view: shape to read the leaf as before applying ``axes`` (e.g. a dense
        kernel after a flatten, ``(H*W*C, out)`` read as ``(H, W, C, out)``);
        None reads the leaf as it is.
      role: "weight" (kernels: rows enter weight-mode costs), "bias" (enters the
        cost as an extra feature), "norm" (BatchNorm and LayerNorm scale/bias),
        "stat" (BatchNorm running mean/var), "additive" (a tensor added into a
        stream as it is: a position embedding, a class token, a token-embedding
        table; it produces the stream's neurons and its values enter
        weight-mode costs like a kernel's). Only alignment, never cost, for
        "norm" and "stat".
    """

    axes: tuple[str | None, ...]
    view: tuple[int, ...] | None = None
    role: str = "weight"

    def __post_init__(self):
        if self.role not in ROLES:
            raise SpecError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.view is not None and len(self.view) != len(self.axes):
            raise SpecError(f"view {self.view} and axes {self.axes} differ in length")

    @property
    def output_plan(self) -> str | None:
        """The plan on the last axis (the neurons this leaf produces)."""
        return self.axes[-1] if self.axes else None


@dataclasses.dataclass(frozen=True)
class HeadGroup:
    """Flat plans over attention's ``heads * head_dim`` axis that permute whole heads together.

    Every plan of the group acts on an axis viewed as ``heads`` consecutive
    blocks of ``size // heads`` neurons (Flax's ``(embed, heads, head_dim)``
    kernels read as ``(embed, heads * head_dim)``). A plan of the group sends
    parent head ``h`` to target head ``g`` with the same head map for every
    plan of the group, and mixes neurons only within the matched heads:
    ``T[(h, i), (g, j)] = H[h, g] * W[h, g][i, j]``. With Q and K sharing one
    plan (``q . k`` of a head is invariant only when both move alike) and V
    and the output projection another, a group of the two plans keeps every
    head's attention pattern and output.

    Rotary position embeddings rotate fixed pairs of a head's query/key
    dimensions by fixed frequencies, so those dimensions may not move within
    a head: name such plans in ``rigid`` (whole heads move, ``W[h, g]`` is the
    identity).

    Attributes:
      plans: the flat plans sharing the head map, e.g. ``("blk0_qk", "blk0_vo")``;
        listed consecutively in ``AlignmentSpec.plans``.
      heads: number of heads.
      rigid: plans of the group that keep every neuron's place within its head.
    """

    plans: tuple[str, ...]
    heads: int
    rigid: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "plans", tuple(self.plans))
        object.__setattr__(self, "rigid", tuple(self.rigid))
        if not set(self.rigid) <= set(self.plans):
            raise SpecError(f"head group {self.plans}: rigid plans {self.rigid} must be plans of the group")
        if not self.plans or len(set(self.plans)) != len(self.plans):
            raise SpecError(f"a head group needs distinct plans, got {self.plans}")
        if isinstance(self.heads, bool) or not isinstance(self.heads, numbers.Integral) or self.heads < 1:
            raise SpecError(f"head group {self.plans}: heads must be an int >= 1, got {self.heads!r}")
        object.__setattr__(self, "heads", int(self.heads))


@dataclasses.dataclass(frozen=True)
class StreamSums:
    """A residual stream's sums, in the order the model computes them.

    ``sums[i] = (added, readers)``: the leaves whose outputs are added into the
    stream at sum i (sum 0: the embeddings that start it; then each block's
    branch output projection with its bias) and the leaves that read the stream
    as it is after sum i (norms and the dense layers after them; the head after
    the last sum). Every leaf of the stream's plan is in exactly one entry. The
    model sows the stream after every sum in this order (one activation tensor
    per sum), so the branch added at sum i is the difference of taps i and i - 1.

    Attributes:
      plan: the stream's (shared) plan.
      sums: ``((added paths), (reader paths))`` per sum.
    """

    plan: str
    sums: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]

    def __post_init__(self):
        object.__setattr__(self, "sums", tuple((tuple(a), tuple(r)) for a, r in self.sums))
        if not self.sums or not self.sums[0][0]:
            raise SpecError(f"stream {self.plan!r}: needs at least one sum, the first with the tensors that start it")


@dataclasses.dataclass(frozen=True)
class AlignmentSpec:
    """A model's alignment spec: hashable, so it can be a static jit argument.

    Attributes:
      leaves: ``(path, LeafSpec)`` pairs, sorted by path, covering every leaf.
      plans: plan names in the order OTFusion computes them (topological: every
        plan on an input axis of a plan's producers comes earlier).
      output_plan: the plan over the classes (the last layer's outputs); fusion
        may align it or keep it as the identity.
      heads: attention head groups (:class:`HeadGroup`): plans solved together,
        moving whole heads.
      permutation_only: plans that must stay permutations (residual streams
        through LayerNorm); they need equal widths in every parent.
      folds: ``(norm layer, consumer layers)`` pairs: the dense layers that read
        each LayerNorm/RMSNorm's output (:func:`fold_norms` folds the norm's
        scale and bias into them, after which the stream also admits
        orthogonal plans).
      streams: the residual streams' sums (:class:`StreamSums`), for :func:`per_sum_plans`.
      derived: ``(plan, sources)`` pairs: plans that are not solved but are the
        mean of earlier plans (written by :func:`per_sum_plans`; only OTFusion
        computes them).
      taps: ``(plan, stream, i)``: the plan's activations are the branch added
        at sum i of ``stream`` (:func:`stream_activations`).
    """

    leaves: tuple[tuple[str, LeafSpec], ...]
    plans: tuple[str, ...]
    output_plan: str | None = None
    heads: tuple[HeadGroup, ...] = ()
    permutation_only: tuple[str, ...] = ()
    folds: tuple[tuple[str, tuple[str, ...]], ...] = ()
    streams: tuple[StreamSums, ...] = ()
    derived: tuple[tuple[str, tuple[str, ...]], ...] = ()
    taps: tuple[tuple[str, str, int], ...] = ()

    @classmethod
    def build(
        cls,
        leaves: Mapping[str, LeafSpec],
        plans: Sequence[str],
        output_plan: str | None = None,
        *,
        heads: Sequence[HeadGroup] = (),
        permutation_only: Iterable[str] = (),
        folds: Mapping[str, Sequence[str]] | None = None,
        streams: Sequence[StreamSums] = (),
        derived: Mapping[str, Sequence[str]] | None = None,
        taps: Sequence[tuple[str, str, int]] = (),
    ) -> "AlignmentSpec":
        """Builds and checks a spec from a path -> LeafSpec mapping."""
        spec = cls(
            tuple(sorted(leaves.items())),
            tuple(plans),
            output_plan,
            tuple(heads),
            tuple(sorted(set(permutation_only))),
            tuple((norm, tuple(consumers)) for norm, consumers in sorted((folds or {}).items())),
            tuple(streams),
            tuple((plan, tuple(sources)) for plan, sources in (derived or {}).items()),
            tuple((plan, stream, int(i)) for plan, stream, i in taps),
        )
        spec.check_order()
        return spec

    @property
    def leaf_map(self) -> dict[str, LeafSpec]:
        return dict(self.leaves)

    def head_group(self, plan: str) -> HeadGroup | None:
        """The head group ``plan`` belongs to, or None."""
        return next((g for g in self.heads if plan in g.plans), None)

    def members(self, plan: str) -> list[tuple[str, int]]:
        """All (path, axis) pairs the plan acts on (derived, never written by hand)."""
        return [(p, ax) for p, ls in self.leaves for ax, name in enumerate(ls.axes) if name == plan]

    def producers(self, plan: str, roles: Iterable[str] = ("weight", "bias", "additive")) -> list[str]:
        """Paths of leaves whose output axis is ``plan`` and whose role is in ``roles``."""
        roles = tuple(roles)
        return [p for p, ls in self.leaves if ls.output_plan == plan and ls.role in roles]

    def cost_producers(self, plan: str) -> list[str]:
        """Producers of ``plan`` whose input plans are all computed before it.

        Weight-mode costs use these. A plan shared around a residual loop (a
        stage's stream feeds block b's conv1 whose block output is the same
        stream) is computed from the producers that are ready at its turn, e.g.
        the first block's conv2 and projection shortcut; the later blocks'
        outputs then follow that plan.
        """
        done = set(self.plans[: self.plans.index(plan)])
        lm = self.leaf_map
        return [
            p for p in self.producers(plan)
            if all(n is None or n in done for n in lm[p].axes[:-1])
        ]

    def check_order(self) -> None:
        """Raises SpecError if a plan is unlisted, listed twice or has no ready producer."""
        named = {n for _, ls in self.leaves for n in ls.axes if n is not None}
        missing = named - set(self.plans)
        if missing:
            raise SpecError(f"plans used by leaves but not listed in spec.plans: {sorted(missing)}")
        if len(set(self.plans)) != len(self.plans):
            raise SpecError(f"spec.plans lists a plan twice: {self.plans}")
        derived = dict(self.derived)
        for plan, sources in self.derived:
            if plan not in self.plans:
                raise SpecError(f"derived plan {plan!r} is not in spec.plans")
            early = self.plans[: self.plans.index(plan)]
            if not sources or any(src not in early for src in sources):
                raise SpecError(f"derived plan {plan!r}: its sources {sources} must be plans listed before it")
        for plan in self.plans:
            if plan in derived:
                continue  # computed from its sources, not from producers
            if not self.producers(plan):
                raise SpecError(f"plan {plan!r} has no producing weight leaf")
            if not self.cost_producers(plan):
                raise SpecError(
                    f"plan {plan!r} is listed before the input plans of all its producers: "
                    f"reorder spec.plans"
                )
        lm = self.leaf_map
        for norm, consumers in self.folds:
            if f"params/{norm}/scale" not in lm:
                raise SpecError(f"folds: norm layer {norm!r} has no leaf params/{norm}/scale")
            plan = lm[f"params/{norm}/scale"].axes[-1]
            for c in consumers:
                kernel = lm.get(f"params/{c}/kernel")
                if kernel is None or kernel.axes[0] != plan:
                    raise SpecError(f"folds: consumer {c!r} of {norm!r} needs a kernel whose first axis carries {plan!r}")
        for stream in self.streams:
            self._check_stream(stream)
        for plan, stream, i in self.taps:
            if plan not in self.plans or plan in derived or i < 0:
                raise SpecError(f"taps: ({plan!r}, {stream!r}, {i}) needs a solved plan of spec.plans and a sum index >= 0")
        unknown = [p for p in self.permutation_only if p not in self.plans]
        if unknown:
            raise SpecError(f"permutation_only names plans not in spec.plans: {unknown}")
        seen: set[str] = set()
        for group in self.heads:
            where = f"head group {group.plans}"
            bad = [p for p in group.plans if p not in self.plans]
            if bad:
                raise SpecError(f"{where}: plans not in spec.plans: {bad}")
            if seen & set(group.plans):
                raise SpecError(f"{where}: plan(s) {sorted(seen & set(group.plans))} in two head groups")
            seen |= set(group.plans)
            first = self.plans.index(group.plans[0])
            if self.plans[first:first + len(group.plans)] != group.plans:
                raise SpecError(f"{where}: list the group's plans consecutively, in this order, in spec.plans")
            if self.output_plan in group.plans or set(group.plans) & set(self.permutation_only):
                raise SpecError(f"{where}: a head group's plans cannot be the output plan or permutation-only")
            for p in group.plans:
                for path in self.cost_producers(p):
                    inner = [n for n in lm[path].axes[:-1] if n in group.plans]
                    if inner:
                        raise SpecError(f"{where}: producer {path} of {p!r} reads plan {inner[0]!r} of its own group")

    def _check_stream(self, stream: StreamSums) -> None:
        """Every leaf of the stream's plan is in one sum: its added tensors produce the plan, its readers read it."""
        lm = self.leaf_map
        where = f"stream {stream.plan!r}"
        seen: dict[str, int] = {}
        for i, (added, readers) in enumerate(stream.sums):
            for path in added + readers:
                if path in seen:
                    raise SpecError(f"{where}: leaf {path} is in sums {seen[path]} and {i}")
                seen[path] = i
                if path not in lm or stream.plan not in lm[path].axes:
                    raise SpecError(f"{where}: sum {i} names {path}, which is not a leaf carrying {stream.plan!r}")
            for path in added:
                if lm[path].output_plan != stream.plan or lm[path].role not in ("weight", "bias", "additive"):
                    raise SpecError(f"{where}: sum {i} adds {path}, which does not produce {stream.plan!r}")
        members = {p for p, _ in self.members(stream.plan)}
        if members != set(seen):
            raise SpecError(f"{where}: leaves carrying it but in no sum: {sorted(members - set(seen))[:5]}")

    def check_variables(self, variables: Any, what: str = "variables") -> dict[str, tuple[int, ...]]:
        """Checks that ``variables`` has exactly the spec's leaves with consistent plan sizes.

        Args:
          variables: a Flax variable dict (or its flat path mapping).
          what: how to name these variables in error messages.

        Returns:
          Mapping plan name -> size implied by the variables.
        """
        flat = variables if _is_flat(variables) else flatten_paths(variables)
        have, want = set(flat), {p for p, _ in self.leaves}
        if have != want:
            extra, missing = sorted(have - want), sorted(want - have)
            raise SpecError(
                f"{what}: leaves do not match the alignment spec"
                + (f"; not in spec: {extra[:5]}" if extra else "")
                + (f"; missing: {missing[:5]}" if missing else "")
            )
        sizes: dict[str, tuple[int, str]] = {}
        for path, ls in self.leaves:
            shape = tuple(flat[path].shape)
            view = view_shape(ls, shape, path)
            if len(view) != len(ls.axes):
                raise SpecError(f"{what}: leaf {path} has shape {shape}, spec expects {len(ls.axes)} axes")
            for ax, name in enumerate(ls.axes):
                if name is None:
                    continue
                if name in sizes and sizes[name][0] != view[ax]:
                    raise SpecError(
                        f"{what}: plan {name!r} has size {sizes[name][0]} at {sizes[name][1]} "
                        f"but {view[ax]} at {path} axis {ax}"
                    )
                sizes.setdefault(name, (view[ax], path))
        for group in self.heads:
            for p in group.plans:
                if p in sizes and sizes[p][0] % group.heads:
                    raise SpecError(
                        f"{what}: plan {p!r} has {sizes[p][0]} neurons at {sizes[p][1]}, "
                        f"not a multiple of its head group's {group.heads} heads"
                    )
        return {n: s for n, (s, _) in sizes.items()}


def with_biases(spec: AlignmentSpec) -> AlignmentSpec:
    """The same spec with a bias leaf ``<layer>/bias`` next to every weight leaf that lacks one.

    A new bias of a layer that adds into a stream is added at the same sum as its kernel (``spec.streams``).
    """
    leaves = dict(spec.leaves)
    new: dict[str, str] = {}  # kernel path -> its new bias
    for path, ls in spec.leaves:
        bias = path.rsplit("/", 1)[0] + "/bias"
        if ls.role == "weight" and bias not in leaves:
            # A viewed kernel (attention's (embed, heads, head_dim)) has a bias read the same way.
            view = (ls.view[-1],) if ls.view else None
            leaves[bias] = LeafSpec((ls.output_plan,), view=view, role="bias")
            new[path] = bias
    streams = [
        StreamSums(st.plan, [(added + tuple(new[p] for p in added if p in new), readers) for added, readers in st.sums])
        for st in spec.streams
    ]
    return AlignmentSpec.build(
        leaves, spec.plans, spec.output_plan, heads=spec.heads, permutation_only=spec.permutation_only,
        folds=dict(spec.folds), streams=streams, derived=dict(spec.derived), taps=spec.taps,
    )


def sum_plan(stream: str, i: int) -> str:
    """The name :func:`per_sum_plans` gives the stream after sum ``i``."""
    return f"{stream}@{i}"


def branch_plan(stream: str, i: int) -> str:
    """The name :func:`per_sum_plans` gives the branch added at sum ``i`` (i >= 1)."""
    return f"{stream}@{i}.branch"


@functools.lru_cache(maxsize=64)
def per_sum_plans(spec: AlignmentSpec) -> AlignmentSpec:
    """The spec with a plan per residual sum: transformer-fusion's residual policy ("mean"; Imfeld et al., 2024).

    For every stream of ``spec.streams``: the tensors that start it get the plan
    ``<stream>@0``; the branch added at sum i (its output projection and bias)
    gets its own plan ``<stream>@i.branch``, solved from that projection alone
    (by weights) or from what it adds to the stream (by activations:
    :func:`stream_activations`); the layers that read the stream after sum i
    read it through ``<stream>@i``, *derived* as the mean of ``<stream>@(i-1)``
    and the branch's plan. The fused model's stream is then no longer moved by one
    plan: where two plans differ the sum is only approximately aligned, and a
    derived plan is soft (a mix of two permutations), so LayerNorm no longer
    commutes with it. That is the reference's rule, kept for comparison; the
    default (``stream_policy="shared"``) aligns the whole stream with one plan.
    The streams stop being permutation-only (the mean of two permutations is not one).

    Raises:
      SpecError: the spec declares no streams.
    """
    if not spec.streams:
        raise SpecError("per-sum stream plans need a spec that declares its streams' sums (spec.streams)")
    lm = dict(spec.leaves)
    axes = {p: list(ls.axes) for p, ls in spec.leaves}
    plans = list(spec.plans)
    derived: dict[str, tuple[str, ...]] = dict(spec.derived)
    taps = list(spec.taps)
    for stream in spec.streams:
        s = stream.plan
        where = plans.index(s)
        plans[where] = sum_plan(s, 0)
        for i, (added, readers) in enumerate(stream.sums):
            mine = sum_plan(s, i) if i == 0 else branch_plan(s, i)
            for path in added:
                axes[path] = [mine if n == s else n for n in axes[path]]
            for path in readers:
                axes[path] = [sum_plan(s, i) if n == s else n for n in axes[path]]
            taps.append((mine, s, i))
            if i == 0:
                continue
            # After the branch's input plans and the previous sum's plan: where both are known.
            inputs = {n for p in added for n in lm[p].axes[:-1] if n is not None} | {sum_plan(s, i - 1)}
            at = max(plans.index(n) for n in inputs) + 1
            while at < len(plans) and any(plans[at] in g.plans and plans[at] != g.plans[0] for g in spec.heads):
                at += 1  # never inside a head group
            plans[at:at] = [branch_plan(s, i), sum_plan(s, i)]
            derived[sum_plan(s, i)] = (sum_plan(s, i - 1), branch_plan(s, i))
    streams = {st.plan for st in spec.streams}
    leaves = {p: dataclasses.replace(ls, axes=tuple(axes[p])) for p, ls in spec.leaves}
    return AlignmentSpec.build(
        leaves,
        plans,
        spec.output_plan,
        heads=spec.heads,
        permutation_only=[p for p in spec.permutation_only if p not in streams],
        folds=dict(spec.folds),
        derived=derived,
        taps=taps,
    )


def stream_activations(spec: AlignmentSpec, acts: Mapping[str, Sequence[Any]]) -> dict[str, tuple[Any, ...]]:
    """``acts`` with each tapped plan's activations (``spec.taps``): the stream after sum 0, or what sum i adds.

    ``acts[stream]`` holds the stream after every sum, in the order of its
    :class:`StreamSums` (as the model sows it).

    Raises:
      SpecError: a stream's activations are missing or have another number of taps than its sums.
    """
    out = dict(acts)
    for plan, stream, i in spec.taps:
        taps = acts.get(stream)
        if taps is None:
            raise SpecError(f"no activations for stream {stream!r} (have {sorted(acts)}), needed for plan {plan!r}")
        want = 1 + max(j for _, st, j in spec.taps if st == stream)
        if len(taps) != want:
            raise SpecError(f"stream {stream!r}: {len(taps)} activation taps, but the spec's stream has {want} sums")
        out[plan] = (taps[0],) if i == 0 else (taps[i] - taps[i - 1],)
    return out


def _is_flat(tree: Any) -> bool:
    return isinstance(tree, Mapping) and all(isinstance(k, str) and "/" in k for k in tree) and bool(tree)


def _resolve_view(view: tuple[int, ...], shape: tuple[int, ...], path: str) -> tuple[int, ...]:
    """Resolves a view: 0 copies the leaf's axis aligned from the right, one -1 is inferred."""
    offset = len(shape) - len(view)
    view = tuple(shape[k + offset] if v == 0 and 0 <= k + offset else v for k, v in enumerate(view))
    size = math.prod(shape)
    known = math.prod(v for v in view if v != -1)
    resolved = tuple(size // known if v == -1 else v for v in view) if known else view
    if math.prod(resolved) != size or list(view).count(-1) > 1:
        raise SpecError(f"leaf {path} of shape {shape} cannot be viewed as {view}")
    return resolved


def view_shape(ls: LeafSpec, shape: tuple[int, ...], path: str = "?") -> tuple[int, ...]:
    """The shape a leaf is read as under its spec."""
    return _resolve_view(ls.view, tuple(shape), path) if ls.view else tuple(shape)


def flatten_paths(tree: Any) -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)] = leaf
    return out


def unflatten_paths(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dict."""
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return out


# ----------------------------------------------------------------------------- helpers
# Each returns a {path: LeafSpec} dict for one layer; spec builders merge them.


def dense(name: str, in_plan: str | None, out_plan: str | None, *, bias: bool) -> dict[str, LeafSpec]:
    """A Dense layer: kernel (in, out), bias (out,)."""
    out = {f"params/{name}/kernel": LeafSpec((in_plan, out_plan))}
    if bias:
        out[f"params/{name}/bias"] = LeafSpec((out_plan,), role="bias")
    return out


def flatten_dense(
    name: str, spatial: tuple[int, int], in_plan: str | None, out_plan: str | None, *, bias: bool
) -> dict[str, LeafSpec]:
    """A Dense layer reading a flattened (H, W, C) map: its kernel is viewed as (H, W, C, out).

    Flax's row-major flatten of an NHWC map puts input feature ``(h*W + w)*C + c``
    at kernel row h, w, c, so the view is exact; C is inferred, so parents of
    different widths share the spec.
    """
    h, w = spatial
    out = {f"params/{name}/kernel": LeafSpec((None, None, in_plan, out_plan), view=(h, w, -1, 0))}
    if bias:
        out[f"params/{name}/bias"] = LeafSpec((out_plan,), role="bias")
    return out


def conv(name: str, in_plan: str | None, out_plan: str, *, bias: bool) -> dict[str, LeafSpec]:
    """A Conv layer: kernel HWIO, bias (out,)."""
    out = {f"params/{name}/kernel": LeafSpec((None, None, in_plan, out_plan))}
    if bias:
        out[f"params/{name}/bias"] = LeafSpec((out_plan,), role="bias")
    return out


def norm(name: str, plan: str) -> dict[str, LeafSpec]:
    """A BatchNorm layer: scale and bias in params, running mean and var in batch_stats."""
    return {
        f"params/{name}/scale": LeafSpec((plan,), role="norm"),
        f"params/{name}/bias": LeafSpec((plan,), role="norm"),
        f"batch_stats/{name}/mean": LeafSpec((plan,), role="stat"),
        f"batch_stats/{name}/var": LeafSpec((plan,), role="stat"),
    }


def layer_norm(name: str, plan: str, *, bias: bool = True) -> dict[str, LeafSpec]:
    """A LayerNorm (scale and bias) or, with ``bias=False``, an RMSNorm (scale), carrying ``plan``.

    Both commute with a permutation of their features but not with a soft
    plan: declare ``plan`` in ``AlignmentSpec.build(..., permutation_only=...)``.
    """
    out = {f"params/{name}/scale": LeafSpec((plan,), role="norm")}
    if bias:
        out[f"params/{name}/bias"] = LeafSpec((plan,), role="norm")
    return out


def embedding(path: str, plan: str, ndim: int = 2) -> dict[str, LeafSpec]:
    """A tensor added into (or producing) a stream as it is, its features last.

    A position embedding ``(1, T, E)`` (``ndim=3``), a class token ``(1, 1, E)``
    (``ndim=3``), a token-embedding table ``(vocab, E)`` (``ndim=2``).

    Args:
      path: the leaf's full path, e.g. ``"params/pos_embed"``.
      plan: the stream's plan.
      ndim: the leaf's number of axes.
    """
    return {path: LeafSpec((None,) * (ndim - 1) + (plan,), role="additive")}


def attention(
    name: str,
    in_plan: str | None,
    qk_plan: str,
    vo_plan: str,
    out_plan: str | None,
    *,
    heads: int,
    head_dim: int,
    bias: bool,
) -> dict[str, LeafSpec]:
    """Multi-head attention in Flax's layout (``nn.DenseGeneral`` / ``MultiHeadDotProductAttention``).

    ``query``, ``key``, ``value`` kernels ``(embed, heads, head_dim)`` are read as
    ``(embed, heads * head_dim)``: Q and K carry ``qk_plan``, V carries ``vo_plan``
    on that axis; the ``out`` kernel ``(heads, head_dim, embed)`` is read as
    ``(heads * head_dim, embed)`` with ``vo_plan`` on its input. Biases
    ``(heads, head_dim)`` are read flat. Put ``HeadGroup((qk_plan, vo_plan), heads)``
    in the spec so that the plans move whole heads.
    """
    flat = heads * head_dim
    out: dict[str, LeafSpec] = {}
    for proj, plan in (("query", qk_plan), ("key", qk_plan), ("value", vo_plan)):
        out[f"params/{name}/{proj}/kernel"] = LeafSpec((in_plan, plan), view=(-1, flat))
        if bias:
            out[f"params/{name}/{proj}/bias"] = LeafSpec((plan,), view=(flat,), role="bias")
    out[f"params/{name}/out/kernel"] = LeafSpec((vo_plan, out_plan), view=(flat, -1))
    if bias:
        out[f"params/{name}/out/bias"] = LeafSpec((out_plan,), role="bias")
    return out


def mlp_block(
    name: str, in_plan: str | None, hidden_plan: str, out_plan: str | None, *, bias: bool
) -> dict[str, LeafSpec]:
    """A transformer MLP: ``{name}/fc1`` (in -> hidden), ``{name}/fc2`` (hidden -> out)."""
    return {
        **dense(f"{name}/fc1", in_plan, hidden_plan, bias=bias),
        **dense(f"{name}/fc2", hidden_plan, out_plan, bias=bias),
    }


def fold_norms(variables: Any, spec: AlignmentSpec) -> dict[str, Any]:
    """Folds every norm of ``spec.folds`` into the layers that read it: the same function, norms without affine.

    A norm ``y = g * n(x) + b`` read by dense layers ``y @ W + c`` becomes ``n(x)``
    read by ``n(x) @ (g[:, None] * W) + (b @ W + c)``; its scale becomes ones and its
    bias zeros. LayerNorm's normalisation ``n`` (centre, divide by the std over the
    features) then commutes with every orthogonal map ``R`` of the features that
    keeps the all-ones vector (``R 1 = 1``), RMSNorm's with every orthogonal map, so
    a residual stream whose norms are folded may be rotated, not only permuted
    (``FusionConfig(symmetry="orthogonal")``; SliceGPT's "computational invariance").

    Args:
      variables: Flax variables with the spec's leaves (traceable).
      spec: a spec with ``folds``.

    Returns:
      The folded variables (same leaves and shapes).

    A norm's bias is folded only when every reader has a bias to take it; otherwise it stays, divided by
    the scale (``(g n + b) W = (n + b / g) (g W)``; a zero scale entry makes it infinite: such a model
    cannot be folded without biases), and is moved like any stream vector (``n(x R) + b R = (n(x) + b) R``).
    """
    flat = dict(flatten_paths(variables))
    lm = dict(spec.leaves)
    for norm, consumers in spec.folds:
        g = flat[f"params/{norm}/scale"]
        b = flat.get(f"params/{norm}/bias")
        if b is not None and any(f"params/{c}/bias" not in flat for c in consumers):
            flat[f"params/{norm}/bias"] = b / g  # a reader without a bias: the norm keeps its bias, rescaled
            b = None
        for c in consumers:
            path = f"params/{c}/kernel"
            w = flat[path]
            rows = w.reshape(view_shape(lm[path], w.shape, path)).reshape(w.shape[0], -1)  # (features, outputs)
            if b is not None:
                bias_path = f"params/{c}/bias"
                bias = flat[bias_path]
                flat[bias_path] = (bias.reshape(-1) + b @ rows).reshape(bias.shape).astype(bias.dtype)
            flat[path] = (g[:, None] * rows).reshape(w.shape).astype(w.dtype)
        flat[f"params/{norm}/scale"] = jax.numpy.ones_like(g)
        if b is not None:
            flat[f"params/{norm}/bias"] = jax.numpy.zeros_like(b)
    return unflatten_paths(flat)
