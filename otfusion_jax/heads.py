"""Head-structured plans: whole attention heads matched first, neurons within matched heads second.

A :class:`~otfusion_jax.spec.HeadGroup` holds flat plans over attention's
``heads * head_dim`` axis (Q/K share one, V and the output projection
another). Each plan ``p`` of the group comes with an ``(H d_p, H d_p)`` cost
``C_p`` between parent and target neurons (OTFusion: distances of the aligned
incoming weights or of activations; weight matching: ``-S``). Cut into head
blocks ``C_p[h, :, g, :]`` (parent head h, target head g), the group is solved
in two levels:

1. **within heads**: every block is solved on its own (``H^2`` problems of
   size ``d_p``, batched with ``vmap``): an exact assignment, or Sinkhorn;
   a *rigid* plan (rotary queries and keys) keeps the identity within heads
   and its block cost is the block's trace;
2. **between heads**: the head-to-head cost ``A[h, g] = sum_p cost of the
   best within-head plan of block (h, g)``, summed over the group's plans
   (the head map is shared), is solved the same way (exact or Sinkhorn).

The flat plan of ``p`` is then ``T_p[(h, i), (g, j)] = H[h, g] * W_p[h, g][i, j]``:
a permutation (returned as a flat index) when both levels are exact, a dense
block-structured matrix otherwise. The exact version is optimal among plans
that move whole heads: for any head map the best within-head plans are the
blocks' own optima, so the head map is an assignment on their costs.

A third, **orthogonal** level-1 solver (:func:`head_orthogonal`) uses a
symmetry permutations miss: within a head, ``q . k`` is unchanged when Q and K
are both rotated by the same orthogonal ``R`` (``q R (k R)^T = q k^T``), and the
head's output when V is rotated by ``R`` and the output projection's input by
``R`` too. So each block's within-head plan may be the orthogonal Procrustes
map between the blocks' neurons, and the head map an assignment on the
Procrustes residuals.

Every head keeps its attention pattern under an exact plan: Q and K of target
head g come from the same parent head with the same within-head permutation,
so ``q . k`` is unchanged (the mergekit / transformer-fusion ablations move
neurons across heads, which breaks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from otfusion_jax import ot

__all__ = ["blocks", "head_assignment", "head_sinkhorn", "head_orthogonal"]


def blocks(cost: jax.Array, heads: int) -> jax.Array:
    """(H d, H d) cost -> (H, H, d, d) head blocks: ``out[h, g] = cost[h d : (h+1) d, g d : (g+1) d]``."""
    n = cost.shape[0]
    d = n // heads
    return cost.reshape(heads, d, heads, d).transpose(0, 2, 1, 3)


def _unblocks(b: jax.Array) -> jax.Array:
    """(H, H, d, d) head blocks -> the flat (H d, H d) matrix: the inverse of :func:`blocks`."""
    h, _, d, _ = b.shape
    return b.transpose(0, 2, 1, 3).reshape(h * d, h * d)


def _head_map(head_cost: jax.Array, heads: int, backend: str, bidders: int | None) -> jax.Array:
    """The (H,) head permutation minimising the summed head-to-head cost (``head_perm[g]``: parent head of target g)."""
    if heads == 1:
        return jnp.zeros((1,), jnp.int32)
    return ot.assignment(head_cost, backend, bidders=bidders)[1].astype(jnp.int32)


def _rigid(rigid: Sequence[bool] | None, n: int) -> list[bool]:
    return [False] * n if rigid is None else list(rigid)


def _check(costs: Sequence[jax.Array], heads: int) -> None:
    for c in costs:
        if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] % heads:
            raise ValueError(
                f"head-structured plans need square costs over heads x head_dim neurons ({heads} heads), "
                f"got shape {tuple(c.shape)}"
            )


def head_assignment(
    costs: Sequence[jax.Array],
    heads: int,
    backend: str = "auto",
    *,
    bidders: int | None = None,
    rigid: Sequence[bool] | None = None,
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """The exact head-structured assignment of a head group (minimising the summed cost).

    Args:
      costs: per plan of the group, its ``(H d_p, H d_p)`` cost (parent rows, target columns).
      heads: H.
      backend: exact assignment solver (``ot.EXACT_BACKENDS``).
      bidders: the auction's bidders per round.
      rigid: per plan, True where neurons keep their place within a head.

    Returns:
      ``(perms, head_perm, total)``: per plan the flat ``(H d_p,)`` permutation
      (``perm[j]`` = the parent neuron sent to target neuron j), the ``(H,)``
      head permutation (``head_perm[g]`` = the parent head sent to target head g)
      and the total cost ``sum_p sum_j C_p[perm_p[j], j]``.
    """
    _check(costs, heads)
    within, head_cost = [], 0.0
    for c, fixed in zip(costs, _rigid(rigid, len(costs))):
        b = blocks(c, heads)  # (H, H, d, d)
        d = b.shape[-1]
        flat = b.reshape(heads * heads, d, d)
        if fixed:
            perms = jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32), (heads * heads, d))
        else:
            perms = jax.vmap(lambda x: ot.assignment(x, backend, bidders=bidders)[1])(flat)  # (H^2, d)
        best = jnp.take_along_axis(flat, perms[:, None, :], axis=1)[:, 0, :].sum(-1)  # (H^2,)
        within.append(perms.reshape(heads, heads, d))
        head_cost = head_cost + best.reshape(heads, heads)
    head_perm = _head_map(head_cost, heads, backend, bidders)
    out, total = [], 0.0
    for c, w in zip(costs, within):
        d = w.shape[-1]
        inner = w[head_perm, jnp.arange(heads)]  # (H, d): within-head perm of (parent head_perm[g], target g)
        perm = (head_perm[:, None] * d + inner).reshape(-1).astype(jnp.int32)
        out.append(perm)
        total = total + jnp.sum(c[perm, jnp.arange(c.shape[1])])
    return out, head_perm, total


def head_sinkhorn(
    costs: Sequence[jax.Array],
    heads: int,
    *,
    epsilon,
    relative_epsilon: str | None,
    threshold: float,
    max_iterations: int,
    implicit_diff: bool,
    rigid: Sequence[bool] | None = None,
) -> tuple[list[jax.Array], ot.PlanInfo]:
    """Entropic head-structured plans: Sinkhorn within every head block, then between heads.

    Uniform marginals at both levels: each block's plan has marginals ``1/d``,
    the head plan ``1/H``, so the flat plan ``H[h, g] * W[h, g]`` has the
    uniform marginals ``1/(H d)`` of an unstructured plan (the correction then
    applies as usual). Differentiable like :func:`ot.sinkhorn_plan`.

    Args:
      costs: per plan of the group, its ``(H d_p, H d_p)`` cost.
      heads: H.
      epsilon, relative_epsilon, threshold, max_iterations, implicit_diff:
        Sinkhorn's options (:func:`ot.sinkhorn_plan`), used at both levels
        (a relative epsilon is relative to each problem's own cost).
      rigid: per plan, True where neurons keep their place within a head
        (the within-head plans are ``I / d``).

    Returns:
      (per plan the dense (H d_p, H d_p) raw plan, one PlanInfo for the group:
      the summed transport cost, all converged, the most iterations, the
      largest marginal error).
    """
    _check(costs, heads)
    opts = dict(
        epsilon=epsilon,
        relative_epsilon=relative_epsilon,
        threshold=threshold,
        max_iterations=max_iterations,
        implicit_diff=implicit_diff,
    )

    def solve(c):
        n = c.shape[0]
        if n == 1:  # one head, or heads of size 1: the only plan (a relative epsilon of a 1x1 cost is 0)
            return jnp.ones((1, 1), c.dtype), ot.solved_info(c[0, 0])
        u = jnp.full((n,), 1.0 / n, c.dtype)
        return ot.sinkhorn_plan(c, u, u, **opts)

    within, infos, head_cost = [], [], 0.0
    for c, fixed in zip(costs, _rigid(rigid, len(costs))):
        b = blocks(c, heads)
        d = b.shape[-1]
        if fixed:
            plans = jnp.broadcast_to(jnp.eye(d, dtype=c.dtype) / d, (heads * heads, d, d))
            info = ot.solved_info(jnp.sum(plans * b.reshape(heads * heads, d, d), axis=(1, 2)))
        else:
            plans, info = jax.vmap(solve)(b.reshape(heads * heads, d, d))
        within.append(plans.reshape(heads, heads, d, d))
        infos.append(info)
        head_cost = head_cost + info.cost.reshape(heads, heads)
    head_plan, head_info = solve(head_cost)
    out = [_unblocks(head_plan[:, :, None, None] * w) for w in within]  # [h, g, i, j] = H[h, g] W[h, g][i, j]
    info = ot.PlanInfo(
        cost=sum(jnp.sum(p * c) for p, c in zip(out, costs)),
        converged=jnp.all(jnp.stack([jnp.all(i.converged) for i in infos] + [head_info.converged])),
        n_iters=jnp.max(jnp.stack([jnp.max(i.n_iters) for i in infos] + [head_info.n_iters])),
        error=jnp.max(jnp.stack([jnp.max(i.error) for i in infos] + [head_info.error])),
    )
    return out, info


def head_orthogonal(
    grams: Sequence[tuple[jax.Array, jax.Array, jax.Array]],
    heads: int,
    backend: str = "auto",
    *,
    bidders: int | None = None,
    rigid: Sequence[bool] | None = None,
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """Head-structured orthogonal plans: whole heads matched, an orthogonal map within each matched pair.

    For block (parent head h, target head g) of plan p with cross-Gram ``G = X_h^T Y_g``
    (``ot.cross_gram`` of the neurons' values: activations, or the producers' weights), the
    within-head map is the Procrustes solution ``R = U V^T`` and its residual
    ``|X_h|^2 + |Y_g|^2 - 2 |G|_*`` the block's cost (a rigid plan keeps ``R = I``:
    cost ``|X_h|^2 + |Y_g|^2 - 2 trace(G)``); the head map is the exact
    assignment of the costs summed over the group's plans.

    Args:
      grams: per plan, ``(G, |x|^2, |y|^2)``: the ``(H d, H d)`` cross-Gram and the neurons' squared norms.
      heads: H.
      backend: the head map's exact assignment solver.
      bidders: the auction's bidders per round.
      rigid: per plan, True where neurons keep their place within a head (rotary Q/K).

    Returns:
      ``(plans, head_perm, residual)``: per plan the dense ``(H d, H d)`` plan
      (``T[(h, i), (g, j)] = R_hg[i, j]`` for ``h = head_perm[g]``, else 0: an
      orthogonal matrix), the head permutation, and the summed residual.
    """
    _check([g for g, _, _ in grams], heads)
    maps, head_cost = [], 0.0
    for (g, nx2, ny2), fixed in zip(grams, _rigid(rigid, len(grams))):
        b = blocks(g, heads)  # (H, H, d, d)
        d = b.shape[-1]
        flat = b.reshape(heads * heads, d, d)
        if fixed:
            rs = jnp.broadcast_to(jnp.eye(d, dtype=g.dtype), flat.shape)
            value = jnp.trace(flat, axis1=1, axis2=2)
        else:
            rs, value = jax.vmap(ot.procrustes)(flat)
        sx, sy = nx2.reshape(heads, d).sum(1), ny2.reshape(heads, d).sum(1)
        head_cost = head_cost + sx[:, None] + sy[None, :] - 2.0 * value.reshape(heads, heads)
        maps.append(rs.reshape(heads, heads, d, d))
    head_perm = _head_map(head_cost, heads, backend, bidders)
    chosen = jnp.arange(heads)[:, None] == head_perm[None, :]  # [h, g]: parent head h sent to target head g
    out = [_unblocks(chosen[:, :, None, None].astype(rs.dtype) * rs) for rs in maps]
    residual = jnp.sum(head_cost[head_perm, jnp.arange(heads)])
    return out, head_perm, residual
