"""Ground costs and transport plans between the neurons of two layers.

Everything here is a pure function of arrays, jit- and vmap-compatible. The one
exception is labelled: exact transport with unequal widths or non-uniform
marginals is a linear program solved on the host (``jax.pure_callback``), since
neither OTT-JAX nor optax has an exact transport solver on device.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching
from optax import assignment as optax_assignment

from otfusion_jax import native
from otfusion_jax.plans import Permutation

# OTT-JAX is imported by sinkhorn_plan on first use: importing it costs about
# 100 MB of RSS and seconds of start-up (it pulls in lineax, equinox, jaxopt),
# which runs with exact solvers never need.

__all__ = [
    "PlanInfo",
    "Permutation",
    "EXACT_BACKENDS",
    "resolve_backend",
    "has_lapjv",
    "assignment",
    "exact_assignment_host",
    "exact_assignment_native",
    "pairwise_cost",
    "pairwise_cost_columns",
    "normalize_cost",
    "importance_marginal",
    "exact_assignment",
    "exact_assignment_auction",
    "exact_transport",
    "sinkhorn_plan",
    "correct_plan",
    "solved_info",
    "cross_gram",
    "procrustes",
    "polar_factor",
    "orthogonal_plan",
]

METRICS = ("euclidean", "cosine", "correlation")
# Exact assignment solvers (square costs, uniform marginals); "auto" picks the fastest for the platform.
EXACT_BACKENDS = ("auto", "device", "auction", "native", "host", "lapjv")
COST_NORMS = ("none", "log", "max", "median", "mean")


class PlanInfo(NamedTuple):
    """What a solver reports about one plan (all arrays, so it can be vmapped).

    Attributes:
      cost: transport cost <T, C> of the raw plan.
      converged: Sinkhorn's convergence flag (True for exact solvers).
      n_iters: Sinkhorn iterations (0 for exact solvers).
      error: Sinkhorn's last marginal error (0 for exact solvers).
    """

    cost: jax.Array
    converged: jax.Array
    n_iters: jax.Array
    error: jax.Array


def pairwise_cost(
    x: jax.Array, y: jax.Array, metric: str = "euclidean", squared: bool = False, *, unit_norm: bool = False
) -> jax.Array:
    """Ground cost between the rows of ``x`` (n, d) and ``y`` (m, d), as matmuls.

    Args:
      x: (n, d) features of the first layer's neurons.
      y: (m, d) features of the second layer's neurons.
      metric: "euclidean", "cosine" (1 - cosine similarity) or "correlation"
        (1 - Pearson correlation: the cosine of the rows centred on their own
        means; Git Re-Basin's and REPAIR's activation matching).
      squared: euclidean only: squared distance (True) or distance (False).
      unit_norm: euclidean only: distances between the rows scaled to unit
        norm (cosine does not depend on it).

    Returns:
      (n, m) cost matrix.
    """
    return pairwise_cost_columns([x.T], [y.T], metric, squared, unit_norm=unit_norm)


# Centre the neurons on their joint mean before the Gram when the mean's squared
# norm exceeds this fraction of the neurons' mean squared norm (see pairwise_cost_columns).
CENTER_FRACTION = 0.25
# Costs over fewer values than this (all tensors of both sides) are always
# centred: there the copy costs less than compiling a conditional's two branches.
CENTER_ALWAYS_BELOW = 1 << 20


def pairwise_cost_columns(
    xs: Sequence[jax.Array],
    ys: Sequence[jax.Array],
    metric: str = "euclidean",
    squared: bool = False,
    *,
    unit_norm: bool = False,
) -> jax.Array:
    """:func:`pairwise_cost` for neurons stored along the last axis of one or more tensors.

    Neuron i of the first layer is the concatenation over ``t`` of
    ``xs[t][..., i]`` (all leading axes flattened: samples, positions, or the
    spatial and input axes of an HWIO kernel); the same for ``ys`` with the
    second layer's m neurons. Equal to ``pairwise_cost`` on those concatenated
    rows, but reads every tensor in its stored layout: the Gram matrix is one
    ``dot_general`` per tensor contracting its leading axes, squared norms are
    reductions, and a unit norm is a per-neuron factor on the Gram, so in the
    common case nothing is copied (3-4x faster than rows for VGG11's conv1
    activations on a CPU, ``bench/RESULTS.md``).

    Accuracy: the float32 expansion ``|x|^2 + |y|^2 - 2 x.y`` loses the digits
    of small distances between rows that share a large offset (activations
    after a ReLU, say); its rounding error scales with the squared norms of
    the rows. Distances are translation invariant, so when the joint mean c of
    all n + m neurons is large, ``|c|^2 > CENTER_FRACTION * mean |z|^2`` (the
    centred squared norms ``mean |z - c|^2 = mean |z|^2 - |c|^2`` are then at
    least a quarter smaller), the neurons are centred on c before the Gram, a
    copy of each tensor. The choice is a ``lax.cond`` on the data: one branch
    runs under ``jit``; under ``vmap`` (a batched predicate) both do. Costs
    over fewer than ``CENTER_ALWAYS_BELOW`` values are always centred: a
    conditional's two branches doubled the compile time of an MLPNet pair
    (0.65 against 0.24 s) to save copies worth well under a millisecond there.

    Args:
      xs: tensors (..., n), ``xs[t]`` with as many leading values as ``ys[t]``.
      ys: tensors (..., m).
      metric, squared, unit_norm: as :func:`pairwise_cost`.

    Returns:
      (n, m) cost matrix.
    """
    if metric not in METRICS:
        raise ValueError(f"ground_metric must be one of {METRICS}, got {metric!r}")
    if not xs or len(xs) != len(ys):
        raise ValueError(f"pairwise_cost_columns needs as many tensors on both sides (>= 1), got {len(xs)} and {len(ys)}")
    xs = [x.reshape(-1, x.shape[-1]) for x in xs]  # (f, n): a bitcast of the stored layout
    ys = [y.reshape(-1, y.shape[-1]) for y in ys]
    n, m = xs[0].shape[1], ys[0].shape[1]

    def gram(xs_, ys_):  # sum over tensors of (f, n), (f, m) -> (n, m), contracting the feature axis in place
        return sum(jax.lax.dot_general(x, y, (((0,), (0,)), ((), ()))) for x, y in zip(xs_, ys_))

    if metric == "correlation":  # each neuron centred on its own mean over all its values, then cosine
        fx = sum(x.shape[0] for x in xs)
        mx = sum(jnp.sum(x, 0) for x in xs) / fx
        my = sum(jnp.sum(y, 0) for y in ys) / fx
        xs, ys = [x - mx[None, :] for x in xs], [y - my[None, :] for y in ys]
        metric = "cosine"
    nx2 = sum(jnp.sum(x * x, 0) for x in xs)  # (n,) squared norms
    ny2 = sum(jnp.sum(y * y, 0) for y in ys)
    if metric == "cosine":
        g = gram(xs, ys)
        return 1.0 - g / (jnp.maximum(jnp.sqrt(nx2), 1e-12)[:, None] * jnp.maximum(jnp.sqrt(ny2), 1e-12)[None, :])
    if unit_norm:  # per-neuron factors, applied to the Gram and the norms rather than to copies of the rows
        sx = 1.0 / jnp.maximum(jnp.sqrt(nx2), 1e-12)
        sy = 1.0 / jnp.maximum(jnp.sqrt(ny2), 1e-12)
        nx2, ny2 = nx2 * sx * sx, ny2 * sy * sy
        sums = [x @ sx + y @ sy for x, y in zip(xs, ys)]  # (f,) per-feature sums over all neurons
    else:
        sx = sy = None
        sums = [jnp.sum(x, 1) + jnp.sum(y, 1) for x, y in zip(xs, ys)]
    centers = [s / (n + m) for s in sums]
    c2 = sum(jnp.sum(c * c) for c in centers)
    mean_sq = (jnp.sum(nx2) + jnp.sum(ny2)) / (n + m)

    def expanded(_):
        g = gram(xs, ys)
        if unit_norm:
            g = g * sx[:, None] * sy[None, :]
        return nx2[:, None] + ny2[None, :] - 2.0 * g

    def centred(_):
        xc = [(x if sx is None else x * sx[None, :]) - c[:, None] for x, c in zip(xs, centers)]
        yc = [(y if sy is None else y * sy[None, :]) - c[:, None] for y, c in zip(ys, centers)]
        cx2 = sum(jnp.sum(x * x, 0) for x in xc)
        cy2 = sum(jnp.sum(y * y, 0) for y in yc)
        return cx2[:, None] + cy2[None, :] - 2.0 * gram(xc, yc)

    if sum(x.size for x in xs) + sum(y.size for y in ys) < CENTER_ALWAYS_BELOW:
        sq = centred(None)
    else:
        sq = jax.lax.cond(c2 > CENTER_FRACTION * mean_sq, centred, expanded, None)
    sq = jnp.maximum(sq, 0.0)
    if squared:
        return sq
    # sqrt with a finite gradient at 0 (identical neurons).
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def cross_gram(xs: Sequence[jax.Array], ys: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(G, |x|^2, |y|^2)`` of neurons stored along the last axis of tensors (as :func:`pairwise_cost_columns`).

    ``G[i, j]`` is the inner product of parent neuron i's and target neuron j's
    values over every leading axis of every tensor: ``(n, m)``; the squared norms
    are ``(n,)`` and ``(m,)``.
    """
    xs = [x.reshape(-1, x.shape[-1]) for x in xs]
    ys = [y.reshape(-1, y.shape[-1]) for y in ys]
    g = sum(jax.lax.dot_general(x, y, (((0,), (0,)), ((), ()))) for x, y in zip(xs, ys))
    return g, sum(jnp.sum(x * x, 0) for x in xs), sum(jnp.sum(y * y, 0) for y in ys)


@jax.custom_jvp
def polar_factor(m: jax.Array) -> jax.Array:
    """The orthogonal factor ``R`` of the polar decomposition ``M = R H`` of a square nonsingular M (``U V^T``).

    QDWH iterations (``jax.scipy.linalg.polar``: QR and matrix products, no SVD), with a custom JVP: their
    ``while_loop`` has no reverse-mode derivative. The tangent is the closed form: with ``H = V diag(s) V^T``,
    ``dR = R V X V^T``, ``X_ij = C_ij / (s_i + s_j)`` and ``C = V^T (R^T dM - dM^T R) V`` (skew-symmetric).
    """
    r, _ = jax.scipy.linalg.polar(m, side="right", method="qdwh")
    return r


@polar_factor.defjvp
def _polar_factor_jvp(primals, tangents):
    (m,), (dm,) = primals, tangents
    r, h = jax.scipy.linalg.polar(m, side="right", method="qdwh")
    s, v = jnp.linalg.eigh((h + h.T) / 2)
    c = v.T @ (r.T @ dm - dm.T @ r) @ v
    denom = s[:, None] + s[None, :]
    x = c / jnp.where(denom > 0, denom, 1.0)
    return r, r @ (v @ x @ v.T)


def procrustes(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The orthogonal ``R`` maximising ``trace(R^T G)`` (= minimising ``|X R - Y|`` for ``G = X^T Y``), and that maximum.

    ``R = U V^T`` for the SVD ``G = U S V^T``: the orthogonal factor of the polar
    decomposition, computed by QDWH iterations (QR and matrix products; :func:`polar_factor`, differentiable).
    Not by ``jnp.linalg.svd``: XLA:CPU's SVD deadlocked (every thread asleep) inside
    the fused program of a 4-block ViT, though not alone. ``1e-6 max|G|`` is
    always added on the diagonal, so that a rank-deficient G (fewer features
    than neurons) still has a nonsingular polar factor (where the data see
    nothing, the map is then near the identity). The value returned is
    ``trace(R^T G)``: the nuclear norm ``sum(S)`` up to that ridge.
    """
    n = gram.shape[0]
    ridge = 1e-6 * jnp.max(jnp.abs(gram)) + jnp.finfo(gram.dtype).tiny
    r = polar_factor(gram + jax.lax.stop_gradient(ridge) * jnp.eye(n, dtype=gram.dtype))
    return r, jnp.sum(r * gram)


def orthogonal_plan(gram: jax.Array, *, keep_ones: bool = True) -> jax.Array:
    """The orthogonal plan ``R`` (n, n) best aligning parent neurons to target neurons, given ``G = X^T Y``.

    With ``keep_ones`` the plan also keeps the all-ones vector (``R 1 = 1``,
    ``1^T R = 1^T``): the maps that commute with LayerNorm's centring. It is
    the Procrustes solution on the complement of the ones vector, plus the
    identity on it.
    """
    n = gram.shape[0]
    if n == 1:
        return jnp.ones((1, 1), gram.dtype)
    if not keep_ones:
        return procrustes(gram)[0]
    # An orthonormal basis of the complement of 1: the Householder reflection sending e_0 to 1/sqrt(n).
    v = jnp.zeros((n,), gram.dtype).at[0].set(1.0) - jnp.full((n,), 1.0 / jnp.sqrt(n), gram.dtype)
    house = jnp.eye(n, dtype=gram.dtype) - 2.0 * jnp.outer(v, v) / jnp.maximum(jnp.dot(v, v), 1e-30)
    q = house[:, 1:]  # (n, n - 1), orthonormal columns, all orthogonal to 1
    inner, _ = procrustes(q.T @ gram @ q)
    return q @ inner @ q.T + jnp.full((n, n), 1.0 / n, gram.dtype)


def normalize_cost(cost: jax.Array, how: str = "none") -> jax.Array:
    """The original's cost normalisations: none, log (log1p), or divide by max/median/mean."""
    if how == "none":
        return cost
    if how == "log":
        return jnp.log1p(cost)
    if how == "max":
        return cost / jnp.max(cost)
    if how == "median":
        return cost / jnp.median(cost)
    if how == "mean":
        return cost / jnp.mean(cost)
    raise ValueError(f"normalize_cost must be one of {COST_NORMS}, got {how!r}")


def importance_marginal(rows: jax.Array, p: str) -> jax.Array:
    """Marginal proportional to each neuron's incoming-weight norm ("l1" or "l2")."""
    ord_ = {"l1": 1, "l2": 2}.get(p)
    if ord_ is None:
        raise ValueError(f"importance must be None, 'l1' or 'l2', got {p!r}")
    w = jnp.linalg.norm(rows, ord=ord_, axis=1)
    return w / jnp.sum(w)


def _one_by_one_on_cpu(solve, n_out: int):
    """``solve`` with a vmap rule: ``lax.map`` over the batch on a CPU backend, plain batching elsewhere.

    The iterative solvers (optax's Hungarian, the auction) run batched
    problems in lockstep until the slowest one is done, and their iteration
    counts vary a lot between problems. On a CPU a batched iteration costs the
    batch's work, so lockstep is slower than solving the problems one after
    the other (MLPNet pairs under vmap: Hungarian 112 ms per pair in lockstep
    vs 45-53 ms for one pair; auction 118-144 vs 16 ms, ``bench/RESULTS.md``).
    On accelerators a batched iteration costs about as much as a single one,
    so the batch stays in lockstep there.
    """
    batched = custom_batching.custom_vmap(solve)

    @batched.def_vmap
    def _rule(axis_size, in_batched, *args):  # pylint: disable=unused-argument
        args = [a if b else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b in zip(args, in_batched)]
        if jax.default_backend() == "cpu":
            return jax.lax.map(lambda xs: solve(*xs), tuple(args)), (True,) * n_out
        return jax.vmap(solve)(*args), (True,) * n_out

    return batched


def _hungarian(cost: jax.Array) -> tuple[jax.Array, jax.Array]:
    return optax_assignment.hungarian_algorithm(cost)


_hungarian_batched = _one_by_one_on_cpu(_hungarian, 2)


def exact_assignment(cost: jax.Array) -> tuple[jax.Array, jax.Array, PlanInfo]:
    """Exact OT for equal widths and uniform marginals: a permutation, on device.

    Uses the Hungarian algorithm of optax (what ``ott.tools.unreg.hungarian``
    wraps). Both of its outputs are used, so XLA cannot drop the solve. Under
    ``vmap`` on a CPU the problems are solved one by one (``_one_by_one_on_cpu``).

    Args:
      cost: (n, n) cost matrix.

    Returns:
      (plan, perm, info): plan (n, n) with entries 1/n, perm (n,) such that
      ``plan[perm[j], j] = 1/n`` (the A neuron sent to B neuron j).
    """
    n = cost.shape[0]
    rows, cols = _hungarian_batched(jax.lax.stop_gradient(cost))
    perm = jnp.zeros((n,), jnp.int32).at[cols].set(rows.astype(jnp.int32))
    plan = jnp.zeros_like(cost).at[rows, cols].set(1.0 / n)
    info = _exact_info(cost, plan)
    return plan, perm, info


def _host_solver(solver: str) -> Callable[[np.ndarray], np.ndarray]:
    """``solve(c) -> perm`` for one (n, n) NumPy cost on the host: ``perm[j]`` = the row sent to column j."""
    if solver == "lapjv":
        from lapjv import lapjv  # pylint: disable=import-outside-toplevel

        # Jonker-Volgenant (src-d/lapjv, AVX2): float64 C-contiguous input; its second output maps columns to rows.
        return lambda c: lapjv(np.ascontiguousarray(c, dtype=np.float64))[1].astype(np.int32)
    from scipy.optimize import linear_sum_assignment  # pylint: disable=import-outside-toplevel

    def scipy_solve(c):
        rows, cols = linear_sum_assignment(c)
        return rows[np.argsort(cols)].astype(np.int32)

    return scipy_solve


def has_lapjv() -> bool:
    """Whether the optional ``lapjv`` package (``pip install 'otfusion-jax[fast]'``) can be imported."""
    return importlib.util.find_spec("lapjv") is not None


def exact_assignment_host(cost: jax.Array, solver: str = "scipy") -> tuple[jax.Array, jax.Array, PlanInfo]:
    """Like :func:`exact_assignment`, solved on the host. HOST CALLBACK.

    ``solver`` "scipy" (``linear_sum_assignment``, 2-5x faster than the device Hungarian on a CPU
    backend, ``bench/RESULTS.md``) or "lapjv" (the optional ``lapjv`` package's Jonker-Volgenant,
    1.5-10x faster again than scipy here, ``bench/RESULTS.md``). Both are exact: they differ only
    where several assignments tie. Works under jit and vmap (sequentially).
    """
    n = cost.shape[0]
    solve_one = _host_solver(solver)

    def solve(c):
        c = np.asarray(c)
        if c.ndim == 2:
            return solve_one(c)
        return np.stack([solve(ci) for ci in c])

    perm = jax.pure_callback(
        solve,
        jax.ShapeDtypeStruct((n,), jnp.int32),
        jax.lax.stop_gradient(cost),
        vmap_method="expand_dims",
    )
    return _permutation_result(cost, perm)


def exact_assignment_native(cost: jax.Array) -> tuple[jax.Array, jax.Array, PlanInfo]:
    """Like :func:`exact_assignment`, solved by the C++ solver of :mod:`otfusion_jax.native` (an XLA FFI call).

    CPU backend only. Unlike the host solvers it is no callback: programs that call it are loaded from the
    persistent compilation cache by a new process, and the solve skips the Python round trip (as fast as
    lapjv or faster on fusion's costs, ``bench/RESULTS.md``). Works under jit and vmap (one call for the batch).
    """
    return _permutation_result(cost, native.assign(cost))


def resolve_backend(backend: str) -> str:
    """The concrete exact solver of ``backend``; "auto" is read at trace time from ``jax.default_backend()``.

    "auto" on a CPU backend is "native" (the C++ solver of :mod:`otfusion_jax.native`, an XLA FFI call that the
    persistent compilation cache can hold, built on first use) where a C++ compiler is found; else a host solver
    through a callback: "lapjv" where the optional ``lapjv`` package is installed (1.5-10x faster than scipy),
    else "host" (scipy; 2.5-4x faster there than the device Hungarian and 1.6-2.4x faster than the auction;
    ``bench/RESULTS.md``, 2-core CPU). On accelerators "auto" is the on-device "auction", which runs its rounds
    in parallel and under ``vmap`` in lockstep (not yet measured on a GPU: ``bench/gpu_check.sh``). "lapjv"
    asked for without the package, or "native" where it cannot be built or off a CPU backend, is an error
    that says why.
    """
    if backend not in EXACT_BACKENDS:
        raise ValueError(f"exact_backend must be one of {EXACT_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if jax.default_backend() != "cpu":
            return "auction"
        if native.available():
            return "native"
        return "lapjv" if has_lapjv() else "host"
    if backend == "lapjv" and not has_lapjv():
        raise ValueError("exact_backend='lapjv' needs the lapjv package: pip install 'otfusion-jax[fast]'")
    if backend == "native":
        if jax.default_backend() != "cpu":
            raise ValueError(f"exact_backend='native' runs on a CPU backend only (this is {jax.default_backend()!r})")
        if not native.available():
            raise ValueError(f"exact_backend='native' cannot be used: {native.build_error()}")
    return backend


def assignment(
    cost: jax.Array, backend: str = "auto", *, bidders: int | None = None
) -> tuple[jax.Array, jax.Array, PlanInfo]:
    """Exact assignment of a square cost by the chosen solver: the one entry point every aligner uses.

    Args:
      cost: (n, n) cost (minimised; pass ``-S`` to maximise a similarity S).
      backend: one of ``EXACT_BACKENDS`` (see :func:`resolve_backend`).
      bidders: the auction's bidders per round (None: :func:`auction_bidders_default`).

    Returns:
      (plan, perm, info) as :func:`exact_assignment`.
    """
    backend = resolve_backend(backend)
    if backend == "auction":
        return exact_assignment_auction(cost, bidders=bidders)
    if backend == "native":
        return exact_assignment_native(cost)
    if backend in ("host", "lapjv"):
        return exact_assignment_host(cost, "scipy" if backend == "host" else "lapjv")
    return exact_assignment(cost)


AUCTION_LEVELS = 1 << 26  # integer cost resolution: levels * (n + 1) stays well inside int32
_IMIN = np.iinfo(np.int32).min


def auction_bidders_default(n: int) -> int:
    """How many free rows bid per auction round unless told: 16 on a CPU backend, all of them elsewhere.

    A round costs O(bidders * n). On a CPU that work is the time, and bidding in
    small batches is about 2x faster at n = 400-512 than all rows at once
    (``bench/RESULTS.md``); on an accelerator a round is latency-bound, so every
    free row bids. (The backend is read at trace time: ``jax.default_backend()``.)
    """
    return min(n, 16) if jax.default_backend() == "cpu" else n


def exact_assignment_auction(
    cost: jax.Array,
    *,
    bidders: int | None = None,
    theta: int = 8,
    slack: float = 0.0,
    max_rounds: int = 100_000,
) -> tuple[jax.Array, jax.Array, PlanInfo]:
    """Exact assignment by Bertsekas' auction with epsilon scaling, on device, parallel.

    The Hungarian algorithm (:func:`exact_assignment`) is a long chain of small
    sequential steps; the auction is a few hundred rounds of O(bidders * n)
    vectorised work, which suits accelerators and ``vmap`` (``bench/RESULTS.md``).

    Exactness: the cost is mapped affinely onto integers ``0..L`` with
    ``L = AUCTION_LEVELS // (n + 1)`` and multiplied by ``n + 1``; the last
    scaling phase runs with epsilon 1, which makes the assignment optimal for
    the integer costs (Bertsekas 1988). Integer arithmetic also guarantees
    termination (every bid raises a price by at least 1). Against the float
    costs the assignment is optimal up to the rounding: its total cost exceeds
    the optimum by at most ``n * (max(cost) - min(cost)) / L`` (half a grid
    step per entry, on its assignment and on the optimal one), about 2.4e-3 of
    the cost range at n = 400; in the tests it finds scipy's optimum on every
    problem.

    Phases: epsilon starts at an eighth of the scaled cost range and is divided
    by ``theta`` down to 1; assignments that still satisfy epsilon-complementary
    slackness are kept from one phase to the next.

    Ties are the slow case: k identical neurons (dead ReLUs, say) in both
    models make the auction raise their prices in steps of epsilon, so such
    problems take many more rounds (about 15,000 at n = 256-400 with 30 dead
    neurons each, against 500-1,500 without; ``bench/RESULTS.md``), but they
    still end optimal.

    Args:
      cost: (n, n) cost matrix (gradients are stopped: the plan is piecewise constant).
      bidders: free rows bidding per round (None: :func:`auction_bidders_default`).
      theta: epsilon reduction factor between phases.
      slack: fraction of rows intermediate phases may leave unassigned (0:
        every phase assigns all rows). Faster on problems without ties, but
        the rows it leaves free carry their whole price war into the final
        phase, where epsilon is 1: with tied neurons that ran out of rounds in
        review. Keep 0 unless measured on your costs.
      max_rounds: cap on bidding rounds. If reached, the free rows are matched
        to the free columns in index order (still a permutation, maybe not an
        optimal one) and ``info.converged`` is False, which
        ``otf.warn_unconverged`` reports (fuse.py does).

    Returns:
      (plan, perm, info) as :func:`exact_assignment`; ``info.n_iters`` counts rounds.
    """
    n = cost.shape[0]
    if cost.ndim != 2 or cost.shape != (n, n) or n == 0:
        raise ValueError(f"exact_assignment_auction needs a non-empty square cost, got shape {cost.shape}")
    k = min(n, auction_bidders_default(n) if bidders is None else int(bidders))
    if k < 1 or theta < 2 or not 0 <= slack < 1:
        raise ValueError(f"auction: need bidders >= 1, theta >= 2 and 0 <= slack < 1; got {bidders}, {theta}, {slack}")
    levels = max(1, AUCTION_LEVELS // (n + 1))
    c = jnp.nan_to_num(jax.lax.stop_gradient(cost).astype(jnp.float32))  # fuse rejects NaN/Inf parents first
    lo = jnp.min(c)
    span = jnp.max(c) - lo
    # A constant cost: every permutation is optimal. A span overflowing float32: no grid; any permutation.
    usable = jnp.isfinite(span) & (span > 0)
    # Divide by the span before scaling: levels / span can overflow for tiny spans.
    grid = jnp.clip(jnp.round((c - lo) / jnp.where(usable, span, 1.0) * levels), 0, levels)
    # Persons are the rows (source neurons), objects the columns (target neurons).
    benefit = -jnp.where(usable, grid, 0).astype(jnp.int32) * (n + 1)
    owner, holds, rounds = _auction_solver(n, k, theta, int(slack * n), max_rounds, levels)(benefit)
    converged = jnp.all(holds >= 0)
    # Out of rounds: pair the free columns with the free rows so the plan stays a permutation.
    free_cols = jnp.nonzero(owner < 0, size=n, fill_value=n)[0]
    free_rows = jnp.nonzero(holds < 0, size=n, fill_value=n)[0].astype(jnp.int32)
    perm = owner.at[free_cols].set(free_rows, mode="drop")
    plan, perm, info = _permutation_result(cost, perm)
    return plan, perm, info._replace(converged=converged, n_iters=rounds)


@functools.lru_cache(maxsize=None)
def _auction_solver(n: int, k: int, theta: int, allowed_free: int, max_rounds: int, levels: int):
    """The auction on integer benefits (n, n) -> (owner, holds, rounds); see :func:`_one_by_one_on_cpu` for vmap."""

    # Epsilon of each phase: fixed by n and theta alone, so the phases are a
    # fori_loop around a while_loop of bidding rounds. (A single while_loop
    # with a lax.cond between "bid" and "next phase" would, under vmap, pay
    # for both branches every round.)
    eps_list = [max(levels * (n + 1) // 8, 1)]
    while eps_list[-1] > 1:
        eps_list.append(max(eps_list[-1] // theta, 1))
    last_phase = len(eps_list) - 1

    class State(NamedTuple):
        prices: jax.Array  # (n,) object prices
        owner: jax.Array  # (n,) row holding each column, -1 if free
        holds: jax.Array  # (n,) column held by each row, -1 if free
        rounds: jax.Array

    def solve(benefit: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        ar = jnp.arange(n, dtype=jnp.int32)
        none = jnp.full((n,), -1, jnp.int32)
        eps_table = jnp.asarray(eps_list, jnp.int32)

        def start_phase(s: State, eps: jax.Array) -> State:
            values = benefit - s.prices[None, :]
            best = jnp.max(values, axis=1)
            mine = jnp.take_along_axis(values, jnp.maximum(s.holds, 0)[:, None], axis=1)[:, 0]
            # Still eps-complementary slack; out of rounds, keep what is assigned.
            keep = (s.holds >= 0) & ((mine >= best - eps) | (s.rounds >= max_rounds))
            holds = jnp.where(keep, s.holds, -1)
            owner = none.at[jnp.where(keep, holds, n)].set(ar, mode="drop")
            # Prices only matter up to a constant: shifting keeps them far from int32 limits.
            return State(s.prices - jnp.min(s.prices), owner, holds, s.rounds)

        def bid(s: State, eps: jax.Array) -> State:
            who = jnp.nonzero(s.holds < 0, size=k, fill_value=n)[0].astype(jnp.int32)
            valid = who < n
            values = benefit[jnp.minimum(who, n - 1)] - s.prices[None, :]  # (k, n)
            target = jnp.argmax(values, axis=1).astype(jnp.int32)
            best = jnp.max(values, axis=1)
            second = jnp.max(jnp.where(ar[None, :] == target[:, None], _IMIN, values), axis=1)
            second = jnp.where(n > 1, second, best)
            offer = jnp.where(valid, s.prices[target] + (best - second) + eps, _IMIN)
            top = jax.ops.segment_max(offer, target, num_segments=n)
            winner = jax.ops.segment_min(
                jnp.where(valid & (offer == top[target]), who, n), target, num_segments=n
            )  # lowest row among equal top offers
            sold = winner < n
            holds = s.holds.at[jnp.where(sold & (s.owner >= 0), s.owner, n)].set(-1, mode="drop")
            holds = holds.at[jnp.where(sold, winner, n)].set(ar, mode="drop")
            return State(jnp.where(sold, top, s.prices), jnp.where(sold, winner, s.owner), holds, s.rounds + 1)

        def phase(p: jax.Array, s: State) -> State:
            eps = eps_table[p]
            may_leave = jnp.where(p == last_phase, 0, allowed_free)  # only the last phase assigns every row
            s = start_phase(s, eps)
            return jax.lax.while_loop(
                lambda s: (jnp.sum(s.holds < 0) > may_leave) & (s.rounds < max_rounds), lambda s: bid(s, eps), s
            )

        s = jax.lax.fori_loop(0, last_phase + 1, phase, State(jnp.zeros((n,), jnp.int32), none, none, jnp.int32(0)))
        return s.owner, s.holds, s.rounds

    return _one_by_one_on_cpu(solve, 3)


def solved_info(cost: jax.Array, dtype: Any = None) -> PlanInfo:
    """The report of a direct (non-iterative) solve whose transport cost is ``cost``: converged, 0 iterations."""
    dtype = jnp.result_type(cost) if dtype is None else dtype
    return PlanInfo(
        cost=jnp.asarray(cost, dtype),
        converged=jnp.array(True),
        n_iters=jnp.array(0, jnp.int32),
        error=jnp.array(0.0, dtype),
    )


def _exact_info(cost: jax.Array, plan: jax.Array) -> PlanInfo:
    return solved_info(jnp.sum(plan * cost), cost.dtype)


def _permutation_result(cost: jax.Array, perm: jax.Array) -> tuple[jax.Array, jax.Array, PlanInfo]:
    """``(plan, perm, info)`` of a permutation: ``plan[perm[j], j] = 1/n`` (the A neuron sent to B neuron j)."""
    plan = jnp.zeros_like(cost).at[perm, jnp.arange(cost.shape[0])].set(1.0 / cost.shape[0])
    return plan, perm, _exact_info(cost, plan)


def _emd_numpy(a: np.ndarray, b: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Exact transport on the host: POT's network simplex if installed, else scipy's HiGHS LP."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    cost = np.asarray(cost, np.float64)
    a, b = a / a.sum(), b / b.sum()
    try:
        import ot as pot  # optional: much faster than the LP

        return pot.emd(a, b, cost).astype(np.float32)
    except ImportError:
        pass
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix, vstack

    n, m = cost.shape
    idx = np.arange(n * m)
    rows = coo_matrix((np.ones(n * m), (idx // m, idx)), shape=(n, n * m))
    cols = coo_matrix((np.ones(n * m), (idx % m, idx)), shape=(m, n * m))
    res = linprog(
        cost.ravel(), A_eq=vstack([rows, cols]), b_eq=np.concatenate([a, b]), bounds=(0, None), method="highs"
    )
    if not res.success:
        raise RuntimeError(f"exact transport LP failed: {res.message}")
    return res.x.reshape(n, m).astype(np.float32)


def exact_transport(cost: jax.Array, a: jax.Array, b: jax.Array) -> tuple[jax.Array, PlanInfo]:
    """Exact OT for any widths and marginals. HOST CALLBACK (``jax.pure_callback``).

    Works under jit and vmap (sequentially over the batch); gradients do not flow
    through the plan (it is piecewise constant anyway).

    Args:
      cost: (n, m) cost.
      a: (n,) source marginal; b: (m,) target marginal.

    Returns:
      (plan, info), plan of shape (n, m) with marginals a, b.
    """
    cost = jax.lax.stop_gradient(cost)
    shape = jax.ShapeDtypeStruct(cost.shape, cost.dtype)
    plan = jax.pure_callback(
        lambda a_, b_, c_: _emd_numpy(a_, b_, c_).astype(c_.dtype),
        shape,
        jax.lax.stop_gradient(a),
        jax.lax.stop_gradient(b),
        cost,
        vmap_method="sequential",
    )
    return plan, _exact_info(cost, plan)


def sinkhorn_plan(
    cost: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    epsilon: float,
    relative_epsilon: str | None,
    threshold: float,
    max_iterations: int,
    implicit_diff: bool,
    tau: float = 1.0,
) -> tuple[jax.Array, PlanInfo]:
    """Entropic OT with OTT-JAX's Sinkhorn (log domain).

    Args:
      cost: (n, m) cost.
      a, b: marginals.
      epsilon: entropic regularisation (absolute, or relative to the cost's
        mean/std when ``relative_epsilon`` is "mean"/"std").
      relative_epsilon: None, "mean" or "std".
      threshold: stop when the marginal error falls below it.
      max_iterations: at most this many iterations.
      implicit_diff: differentiate by implicit function theorem (True) or by
        unrolling the iterations (False; robust in float32).
      tau: 1.0 balanced; < 1 unbalanced (KL-relaxed marginals).

    Returns:
      (plan, info).
    """
    # pylint: disable=import-outside-toplevel
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import implicit_differentiation, sinkhorn

    geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon, relative_epsilon=relative_epsilon)
    prob = linear_problem.LinearProblem(geom, a=a, b=b, tau_a=tau, tau_b=tau)
    solver = sinkhorn.Sinkhorn(
        threshold=threshold,
        max_iterations=max_iterations,
        implicit_diff=implicit_differentiation.ImplicitDiff() if implicit_diff else None,
    )
    out = solver(prob)
    plan = out.matrix
    errors = out.errors
    valid = errors >= 0
    last = jnp.max(jnp.where(valid, jnp.arange(errors.shape[0]), 0))
    info = PlanInfo(
        cost=jnp.sum(plan * cost),
        converged=jnp.asarray(out.converged),
        n_iters=jnp.asarray(out.n_iters, jnp.int32),
        error=errors[last],
    )
    return plan, info


CORRECTION_EPS = 1e-7  # the original's guard against empty columns


def correct_plan(plan: jax.Array, *, proper_marginals: bool, eps: float = CORRECTION_EPS) -> jax.Array:
    """The original's correction: make each target neuron a barycentre of source neurons.

    With ``proper_marginals`` each column j is divided by its mass sum_i T_ij;
    otherwise by the uniform target mass 1/m (the original multiplies by n,
    which it only supports for n == m, where both agree). For a permutation
    plan either gives the permutation matrix.

    Args:
      plan: (n, m) raw plan.
      proper_marginals: divide by the plan's actual column sums.
      eps: guards empty columns.

    Returns:
      (n, m) corrected plan.
    """
    if proper_marginals:
        return plan / (jnp.sum(plan, axis=0, keepdims=True) + eps)
    return plan * plan.shape[1]
