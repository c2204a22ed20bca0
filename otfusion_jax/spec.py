"""Alignment specs: which axis of which parameter leaf each transport plan acts on.

A spec is the single source of truth about a model's structure for fusion. For
every leaf of the Flax variable dict (addressed by its "/"-joined path, e.g.
``"params/fc1/kernel"`` or ``"batch_stats/bn1/mean"``) it names, per array axis,
the plan acting on that axis or ``None``. Tensors added into one residual sum
carry the same plan name, so skip connections share a plan by construction; the
conv-to-dense flatten is described by a ``view`` (the shape the flat kernel is
read as), never guessed from shapes.

Flax layouts put a layer's output features on the *last* axis of its kernel and
on the only axis of its bias / norm parameters, so a plan on a leaf's last axis
is that leaf's *output* (the leaf "produces" the plan's neurons); a plan on any
other axis acts on the leaf's input side.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax

__all__ = [
    "LeafSpec",
    "AlignmentSpec",
    "SpecError",
    "dense",
    "conv",
    "norm",
    "flatten_dense",
    "flatten_paths",
    "view_shape",
    "with_biases",
    "unflatten_paths",
]

ROLES = ("weight", "bias", "norm", "stat")


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
        cost as an extra feature), "norm" (BatchNorm scale/bias), "stat"
        (BatchNorm running mean/var). Only alignment, never cost, for the last two.
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
class AlignmentSpec:
    """A model's alignment spec: hashable, so it can be a static jit argument.

    Attributes:
      leaves: ``(path, LeafSpec)`` pairs, sorted by path, covering every leaf.
      plans: plan names in the order OTFusion computes them (topological: every
        plan on an input axis of a plan's producers comes earlier).
      output_plan: the plan over the classes (the last layer's outputs); fusion
        may align it or keep it as the identity.
    """

    leaves: tuple[tuple[str, LeafSpec], ...]
    plans: tuple[str, ...]
    output_plan: str | None = None

    @classmethod
    def build(
        cls, leaves: Mapping[str, LeafSpec], plans: Sequence[str], output_plan: str | None = None
    ) -> "AlignmentSpec":
        """Builds and checks a spec from a path -> LeafSpec mapping."""
        spec = cls(tuple(sorted(leaves.items())), tuple(plans), output_plan)
        spec.check_order()
        return spec

    @property
    def leaf_map(self) -> dict[str, LeafSpec]:
        return dict(self.leaves)

    def members(self, plan: str) -> list[tuple[str, int]]:
        """All (path, axis) pairs the plan acts on (derived, never written by hand)."""
        return [(p, ax) for p, ls in self.leaves for ax, name in enumerate(ls.axes) if name == plan]

    def producers(self, plan: str, roles: Iterable[str] = ("weight", "bias")) -> list[str]:
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
        for plan in self.plans:
            if not self.producers(plan):
                raise SpecError(f"plan {plan!r} has no producing weight leaf")
            if not self.cost_producers(plan):
                raise SpecError(
                    f"plan {plan!r} is listed before the input plans of all its producers: "
                    f"reorder spec.plans"
                )

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
        return {n: s for n, (s, _) in sizes.items()}


def with_biases(spec: AlignmentSpec) -> AlignmentSpec:
    """The same spec with a bias leaf ``<layer>/bias`` next to every weight leaf that lacks one."""
    leaves = dict(spec.leaves)
    for path, ls in spec.leaves:
        bias = path.rsplit("/", 1)[0] + "/bias"
        if ls.role == "weight" and bias not in leaves:
            leaves[bias] = LeafSpec((ls.output_plan,), role="bias")
    return AlignmentSpec.build(leaves, spec.plans, spec.output_plan)


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
