"""CCA Merge (Horoi et al., ICML 2024): align neurons by an invertible linear map, not a permutation.

>>> fused, aux = otf.fuse([vars_a, vars_b], spec, otf.CCAMerge(), activations=[acts_a, acts_b])

A permutation can only pair each parent neuron with one target neuron; trained networks spread a feature over
several neurons, differently in each parent. CCA Merge finds, layer by layer, the linear map ``T`` that sends
the parent's activations to the target's, ``X_parent @ T ~ X_target``, from canonical correlation analysis of
the two layers' activations on the same samples:

* whiten both sides, ``W_p = S_pp^-1/2`` and ``W_t = S_tt^-1/2`` (covariances over samples, centred);
* the canonical directions are ``P_p = W_p U`` and ``P_t = W_t V`` for the SVD ``W_p S_pt W_t = U S V^T``;
* ``T = P_p P_t^-1 = W_p (U V^T) S_tt^1/2`` and ``T^-1 = W_t (U V^T)^T S_pp^1/2``.

``U V^T`` is the orthogonal polar factor of the whitened cross-covariance (``ot.procrustes``, QR and matmuls: no
SVD), so CCA Merge is Procrustes between whitened activations. The layer producing the neurons is moved by ``T``
and the layers reading them by ``T^-1`` (:class:`otfusion_jax.plans.Linear`): without the nonlinearity in
between, the moved parent computes exactly what it did. The nonlinearity does not commute with ``T``; each
aligned parent is only approximately its old self, but the average of the aligned parents is a far better model
than the average of permuted ones when many parents are fused (docs/RESULTS.md, "CCA Merge").

Differences from the paper's code, on purpose:

* the covariances are shrunk towards a multiple of the identity, ``(1 - r) S + r tr(S)/n I``
  (``regularization`` r in [0, 1]): a fraction of the spectrum, whatever the activations' scale (the paper adds
  ``r I`` to S). r = 1 drops the whitening: the orthogonal Procrustes map of the raw activations, times the
  ratio of their overall scales (a scalar). Gradients need r < 1: at r = 1 the covariances are multiples of
  the identity, whose eigendecomposition has no derivative;
* every plan but the class layer's is solved from the parents' own activations (before any alignment), and each
  stream tensor of a plan adds its values as more samples.

Models with normalisation layers (BatchNorm, LayerNorm) or attention heads are refused: a per-neuron scale or a
per-head split does not commute with a dense map of the neurons. Every plan needs equal widths in all parents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from otfusion_jax import ot
from otfusion_jax import plans as plans_lib
from otfusion_jax import spec as spec_lib
from otfusion_jax.engine import Alignment, FusionError, check_equal_widths
from otfusion_jax.fusion import activation_tensors
from otfusion_jax.models.common import ACT_COLLECTIONS

__all__ = ["CCAMerge", "cca_map", "check_spec"]

Variables = Mapping[str, Any]
Activations = Mapping[str, Sequence[jax.Array]]


def _samples(tensors: Sequence[jax.Array]) -> jax.Array:
    """Every tensor's values as rows of one (samples, n) matrix (float32 at least)."""
    x = jnp.concatenate([t.reshape(-1, t.shape[-1]) for t in tensors], axis=0)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _sym_powers(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(S^1/2, S^-1/2)`` of a symmetric positive-semidefinite S, from one eigendecomposition.

    Eigenvalues are floored at ``eps * max``: directions the samples never reach (a dead neuron without shrinkage)
    get a large but finite inverse instead of an infinite one.
    """
    w, v = jnp.linalg.eigh(s)
    w = jnp.maximum(w, jnp.finfo(s.dtype).eps * jnp.max(jnp.abs(w)) + jnp.finfo(s.dtype).tiny)
    return (v * jnp.sqrt(w)) @ v.T, (v / jnp.sqrt(w)) @ v.T


def _shrunk_cov(x: jax.Array, r: Any) -> jax.Array:
    n = x.shape[1]
    s = x.T @ x / x.shape[0]
    floor = jnp.maximum(jnp.trace(s) / n, jnp.finfo(s.dtype).eps)
    return (1.0 - r) * s + r * floor * jnp.eye(n, dtype=s.dtype)


def cca_map(x_parent: jax.Array, x_target: jax.Array, regularization: Any = 0.5) -> tuple[jax.Array, jax.Array, jax.Array]:
    """CCA Merge's map of one layer: ``(T, T^-1, mean canonical correlation)``.

    Args:
      x_parent, x_target: (S, n) activations of the same S samples (n neurons each side).
      regularization: covariance shrinkage r in [0, 1] (module docstring); may be traced.

    Returns:
      ``T`` (n, n) with ``x_parent @ T ~ x_target``, its inverse, and the mean of the canonical correlations
      of the shrunk problem (1: the layers carry the same features up to a linear map).
    """
    xp = x_parent - jnp.mean(x_parent, axis=0)
    xt = x_target - jnp.mean(x_target, axis=0)
    s_pp, s_tt = _shrunk_cov(xp, regularization), _shrunk_cov(xt, regularization)
    # The cross-covariance enters unshrunk: the polar factor ignores its scale (1 - r), and at r = 1 it would vanish.
    s_pt = xp.T @ xt / xp.shape[0]
    sqrt_p, isqrt_p = _sym_powers(s_pp)
    sqrt_t, isqrt_t = _sym_powers(s_tt)
    rot, nuclear = ot.procrustes(isqrt_p @ s_pt @ isqrt_t)
    return isqrt_p @ rot @ sqrt_t, isqrt_t @ rot.T @ sqrt_p, (1.0 - regularization) * nuclear / x_parent.shape[1]


def check_spec(spec: spec_lib.AlignmentSpec) -> None:
    """Raises FusionError for what CCA Merge cannot move by a dense map: norms, attention heads, permutation-only
    plans, leaves carrying one plan on several axes."""
    if spec.heads:
        raise FusionError(
            f"CCA Merge: the spec has attention heads ({', '.join(g.plans[0] for g in spec.heads)}); a dense map of "
            "their neurons would mix heads. Use OT fusion with symmetry='orthogonal' for transformers"
        )
    if spec.permutation_only:
        raise FusionError(
            f"CCA Merge: plans {list(spec.permutation_only)} must stay permutations (they pass through a LayerNorm)"
        )
    for path, ls in spec.leaves:
        if ls.role in ("norm", "stat"):
            raise FusionError(
                f"CCA Merge: leaf {path} is a normalisation layer's ({ls.role}); its per-neuron scale does not "
                "commute with a linear map of the neurons. Fuse models without BatchNorm, or use OT fusion"
            )
        moved = [ax for ax, name in enumerate(ls.axes) if name is not None]
        if len(set(ls.axes[ax] for ax in moved)) < len(moved):
            raise FusionError(f"CCA Merge: leaf {path} carries the plan {ls.axes[moved[0]]!r} on several axes")


@dataclasses.dataclass(frozen=True)
class CCAMerge:
    """CCA Merge as an aligner of ``engine.fuse`` (by activations; plans are :class:`plans.Linear` maps).

    Attributes:
      regularization: covariance shrinkage r in [0, 1]: ``(1 - r) S + r tr(S)/n I``. 0.5 was chosen on held-out
        training images (docs/RESULTS.md, "CCA Merge"); 1 is orthogonal Procrustes on the raw activations (times
        a scalar).
      acts_kind: the activations the caller captures for it (``models.capture_activations(..., kind)``): "post"
        (after the ReLU, chosen on held-out images) or "pre".
      num_samples: how many training inputs the caller captures them on (fuse.py; None: its
        ``experiment.num_samples``). CCA estimates n x n covariances: a 400-neuron layer needs more than the
        paper's 200 samples (held-out: four MLPNets 84.54% on 200, 87.62% on 1,000).

    The engine reads neither ``acts_kind`` nor ``num_samples``: they tell the caller what to capture.

    The class layer's plan is the identity (classes are not interchangeable).
    """

    regularization: float = 0.5
    acts_kind: str = "post"
    num_samples: int | None = 1000

    needs_activations = True  # class attributes of the aligner interface, not options
    incoming = True

    def __post_init__(self):
        r = self.regularization
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0.0 <= float(r) <= 1.0:
            raise FusionError(f"CCAMerge.regularization must be a number in [0, 1], got {r!r}")
        if self.acts_kind not in ACT_COLLECTIONS:
            raise FusionError(f"CCAMerge.acts_kind must be one of {tuple(ACT_COLLECTIONS)}, got {self.acts_kind!r}")
        n = self.num_samples
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise FusionError(f"CCAMerge.num_samples must be an integer >= 1 or None, got {n!r}")

    def check(self, sizes: Sequence[Mapping[str, int]], target: int) -> None:
        """Every plan needs equal widths in all parents (a linear map of the neurons must be invertible)."""
        check_equal_widths(sizes, target, "CCA Merge")

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
        """One :class:`plans.Linear` per plan (the class layer's: the identity) and its ``ot.PlanInfo``.

        ``PlanInfo.cost`` is minus the mean canonical correlation (lower is better, as for the other aligners).
        """
        del key, params
        check_spec(spec)
        sizes = spec.check_variables(target)
        dtype = jnp.result_type(*jax.tree_util.tree_leaves(dict(target)))
        plans: dict[str, plans_lib.Plan] = {}
        infos: dict[str, ot.PlanInfo] = {}
        for name in spec.plans:
            n = sizes[name]
            if name == spec.output_plan:
                plans[name] = plans_lib.Permutation(jnp.arange(n), 1.0)
                continue
            xs, ys = activation_tensors(parent_acts, target_acts, name, n, n)
            t, t_inv, corr = cca_map(_samples(xs), _samples(ys), self.regularization)
            plans[name] = plans_lib.Linear(t.astype(dtype), t_inv.astype(dtype))
            infos[name] = ot.PlanInfo(-corr, jnp.array(True), jnp.array(0, jnp.int32), jnp.array(0.0, corr.dtype))
        return Alignment(plans, infos)
