"""Plans and how they move a model: the one place where a plan is applied to a leaf.

A plan sends the neurons of a parent layer (n) onto those of the target layer (m):

* a dense ``(n, m)`` matrix ``T`` (a corrected transport plan, a soft weight
  matching plan): axis ``a`` of a leaf becomes ``y[.., j, ..] = sum_i T[i, j] x[.., i, ..]``;
* a :class:`Permutation` (exact plans of equal widths, weight matching): the
  same map for ``T = scale * P`` with P a permutation matrix, applied as a
  gather (``jnp.take``) instead of an n x n matmul: exact, and O(n) not O(n^2).
  A bare ``(n,)`` integer array is read as ``Permutation(index, 1.0)``;
* a :class:`Linear` map (CCA Merge): an invertible ``(n, n)`` matrix ``T`` on the
  neurons a layer produces (its output axis, the last) and ``T^-1`` on the
  layers that read them (every other axis), so that the layer pair computes
  the same function up to the nonlinearity in between. Transport plans and
  permutations need no inverse: their input side is the same matrix.

Every method (OTFusion, weight matching, REPAIR's aligned parents, learned
fusion, sharding, the bench) moves parents with :func:`apply_plans`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp

from otfusion_jax import spec as spec_lib

__all__ = [
    "Permutation",
    "Linear",
    "Plan",
    "as_plan",
    "move_axis",
    "move_leaf",
    "apply_plans",
    "as_matrix",
    "perms_to_plans",
    "plans_to_perms",
]


class Permutation(NamedTuple):
    """A plan that is a scaled permutation: target neuron j takes ``scale * source[index[j]]``.

    Attributes:
      index: (m,) int array, the parent neuron sent to each target neuron.
      scale: the value of the plan's nonzero entries (1.0 after the usual
        correction; a Python float, or an array once it crossed a jit boundary).
    """

    index: jax.Array
    scale: Any = 1.0


class Linear(NamedTuple):
    """An invertible map of a layer's neurons (CCA Merge's plans): ``matrix`` on its output axis, ``inverse`` on inputs.

    Axis ``a`` of a leaf moves as for a dense plan (``y[.., j, ..] = sum_i M[i, j] x[.., i, ..]``) with
    ``M = matrix`` when ``a`` is the leaf's output axis (its last: a kernel's outputs, a bias) and
    ``M = inverse.T`` on any other axis (a kernel's inputs): the next layer undoes the map, so without the
    nonlinearity in between the pair of layers would compute the parent's function exactly.

    Attributes:
      matrix: (n, m) the map of the produced neurons (parent activations ``x`` become ``x @ matrix``).
      inverse: (m, n) its inverse.
    """

    matrix: jax.Array
    inverse: jax.Array


Plan = Union[jax.Array, Permutation, Linear]


def as_plan(plan: Any) -> Plan:
    """A Permutation, Linear or dense plan; an (n,) integer array becomes ``Permutation(plan, 1.0)``."""
    if isinstance(plan, (Permutation, Linear)):
        return plan
    plan = jnp.asarray(plan)
    if plan.ndim == 1 and jnp.issubdtype(plan.dtype, jnp.integer):
        return Permutation(plan, 1.0)
    if plan.ndim != 2:
        raise ValueError(f"a plan is an (n, m) matrix or an (n,) permutation, got shape {plan.shape}")
    return plan


def move_axis(x: jax.Array, plan: Plan, axis: int) -> jax.Array:
    """Moves axis ``axis`` of ``x`` from parent to target neurons: ``y[.., j, ..] = sum_i T[i, j] x[.., i, ..]``.

    A :class:`Linear` plan moves an output axis here (``move_leaf`` picks its side).
    """
    plan = as_plan(plan)
    if isinstance(plan, Linear):
        plan = plan.matrix
    if isinstance(plan, Permutation):
        y = jnp.take(x, plan.index, axis=axis)
        if isinstance(plan.scale, (int, float)) and plan.scale == 1.0:
            return y
        return y * jnp.asarray(plan.scale, x.dtype)
    return jnp.moveaxis(jnp.tensordot(x, plan.astype(x.dtype), axes=([axis], [0])), -1, axis)


def move_leaf(
    leaf: jax.Array, ls: spec_lib.LeafSpec, plans: Mapping[str, Plan], axes: Any = None, path: str = "?"
) -> jax.Array:
    """A leaf read through its view, with the given axes (default: every plan axis) moved by their plans.

    A :class:`Linear` plan moves the leaf's last (output) axis by its matrix and any other axis by its inverse.
    Returns the leaf in its viewed shape.
    """
    x = leaf.reshape(spec_lib.view_shape(ls, leaf.shape, path))
    if axes is None:
        axes = [ax for ax, name in enumerate(ls.axes) if name is not None]
    last = len(ls.axes) - 1
    for ax in axes:
        plan = plans[ls.axes[ax]]
        if isinstance(plan, Linear):
            plan = plan.matrix if ax == last else plan.inverse.T
        x = move_axis(x, plan, ax)
    return x


def apply_plans(
    parent: Mapping[str, Any],
    spec: spec_lib.AlignmentSpec,
    plans: Mapping[str, Any],
    *,
    incoming: bool = True,
) -> dict[str, Any]:
    """Moves a parent into the target's neuron order and widths.

    Args:
      parent: Flax variables of the parent.
      spec: its alignment spec.
      plans: plan name -> plan (dense (n, m), :class:`Permutation` or (n,)
        int permutation), for every plan of the spec.
      incoming: also move input axes (OTFusion's past correction); False moves
        only each leaf's output axis, as the original does without past correction.

    A Linear plan must come as a :class:`Linear` (its input side is its inverse): the dense matrices of
    ``engine.FusionAux.plans`` are only its output side.

    Returns:
      Variables with the target's shapes.
    """
    flat = spec_lib.flatten_paths(parent)
    out = {}
    for path, ls in spec.leaves:
        leaf = flat[path]
        last = len(ls.axes) - 1
        axes = [ax for ax, n in enumerate(ls.axes) if n is not None and (incoming or ax == last)]
        x = move_leaf(leaf, ls, plans, axes, path)
        if ls.view:
            if x.shape == spec_lib.view_shape(ls, leaf.shape, path):
                x = x.reshape(leaf.shape)  # widths unchanged: the stored layout (attention's heads axis too)
            else:
                # A flat input axis (a dense kernel after a flatten) takes the target's
                # size: the plan inside the view may change the width (C_A -> C_B).
                lead = (-1,) if leaf.ndim == 2 else leaf.shape[:-1]
                x = x.reshape(lead + x.shape[-1:])
        out[path] = x
    return spec_lib.unflatten_paths(out)


def as_matrix(plan: Plan, n: int | None = None, dtype: Any = jnp.float32) -> jax.Array:
    """The dense (n, m) matrix of a plan (``n`` defaults to m for a permutation; a Linear plan's output side)."""
    plan = as_plan(plan)
    if isinstance(plan, Linear):
        return plan.matrix.astype(dtype)
    if not isinstance(plan, Permutation):
        return plan
    m = plan.index.shape[0]
    n = m if n is None else n
    scale = jnp.asarray(plan.scale, dtype)
    return jnp.zeros((n, m), dtype).at[plan.index, jnp.arange(m)].set(scale)


def perms_to_plans(perms: Mapping[str, jax.Array], dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """Permutations -> (n, n) permutation matrices, ``plan[perm[j], j] = 1``."""
    return {name: as_matrix(Permutation(jnp.asarray(p), 1.0), dtype=dtype) for name, p in perms.items()}


def plans_to_perms(plans: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Plans -> (m,) int32 permutations: a Permutation's index, a matrix's column argmax.

    For a matrix, column j's largest entry names the parent neuron sent to
    target neuron j (a permutation if the plan is one up to scale).
    """
    out = {}
    for name, t in plans.items():
        t = as_plan(t)
        if isinstance(t, Linear):
            raise ValueError(f"plan {name!r} is a Linear map (CCA Merge), not a permutation: it has no neuron order")
        idx = t.index if isinstance(t, Permutation) else jnp.argmax(t, axis=0)
        out[name] = jnp.asarray(idx).astype(jnp.int32)
    return out
