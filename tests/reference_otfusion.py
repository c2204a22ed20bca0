"""Test-only NumPy + POT reference implementation of OTFusion for two parents.

This module re-states the published algorithm of Singh & Jaggi, "Model Fusion via
Optimal Transport" (NeurIPS 2020), as computed by its public PyTorch code
(``wasserstein_ensemble.py`` and ``ground_metric.py`` of ``sidak/otfusion``), in plain
NumPy and POT. It exists so that tests can check the JAX library against an independent
statement of the method; it deliberately imports nothing from ``otfusion_jax`` and uses
the original PyTorch layouts:

* dense weight ``(out, in)``; conv weight ``(out, in, kh, kw)``; bias ``(out,)``;
* dense activations ``(S, n)``; conv activations ``(S, C, H, W)`` (NCHW).

Model A is aligned onto model B (the target); the fused model has B's shapes. For each
layer ``l`` (see ``/work/shared/ALGORITHM.md``):

1. align A's incoming side with the previous *corrected* plan
   (``W_A_aligned[:, j] = sum_i W_A[:, i] T[i, j]``; per tap for convs, per spatial
   location at a conv->dense flatten);
2. compute the ground cost between A's and B's neurons (weights or activations) and
   normalise it;
3. solve OT with marginals ``mu`` (A) and ``nu`` (B): ``ot.emd`` or log-domain Sinkhorn;
4. correct the plan (multiply by ``n_B``, or divide each column by its mass);
5. fuse ``W = (1 - s) * T_c^T W_A_aligned + s * W_B``;
6. carry ``T_c`` to the next layer.

Deliberate differences from the original code (all documented where they occur):

* float64 throughout by default (``dtype=np.float32`` computes in float32 like the
  original, whose plans are cast to float32; the benchmark uses it);
* the correction divides exactly (the original adds ``eps=1e-7`` to the marginals it
  divides by, which shrinks the corrected plan by a relative ``n * 1e-7``);
* biases are supported (the original models have none, and its loop over
  ``named_parameters`` would treat a bias as a layer of its own);
* the Sinkhorn solver is POT's ``method="sinkhorn_log"`` (the original calls
  ``ot.bregman.sinkhorn``, i.e. the non-log ``sinkhorn_knopp`` with 1000 iterations).

Two small forward-pass helpers (:func:`forward_mlp`, :func:`forward_cnn`) produce
activations for tests; they are independent of the fusion code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import ot

__all__ = [
    "align_incoming",
    "correct_plan",
    "forward_cnn",
    "forward_mlp",
    "fuse_reference",
    "ground_cost",
    "neuron_features_from_acts",
    "neuron_features_from_weights",
    "neuron_marginals",
    "normalize_cost_matrix",
    "solve_ot",
    "transport_outgoing",
]

#: ``eps`` of the original ``GroundMetric._normed_vecs`` (unit-norm rows).
UNIT_NORM_EPS = 1e-9
#: ``eps`` of the original ``_get_neuron_importance_histogram``.
IMPORTANCE_EPS = 1e-9

_MODES = ("weights", "activations")
_SOLVERS = ("exact", "sinkhorn")
_METRICS = ("euclidean", "cosine")
_COST_NORMS = ("none", "log", "max", "median", "mean")
_IMPORTANCES = (None, "l1", "l2")

FlattenShape = tuple[int, int, int]


# --------------------------------------------------------------------------------------
# Layout helpers: the two contractions of a plan with a weight tensor.
# --------------------------------------------------------------------------------------


def align_incoming(
    weight: np.ndarray, plan: np.ndarray, flatten_shape: FlattenShape | None = None
) -> np.ndarray:
    """Applies a plan to the incoming (input) axis of a layer's weight.

    Computes ``aligned[:, j, ...] = sum_i weight[:, i, ...] * plan[i, j]``: for a dense
    weight this is ``weight @ plan``; for a conv weight the same product at every kernel
    tap; for a dense layer fed by a flattened ``(C, H, W)`` tensor (PyTorch C-major
    order) the weight is viewed as ``(out, C, H*W)`` and the product is taken on the
    ``C`` axis at every spatial location, then flattened back.

    Args:
        weight: Layer weight, ``(out, in)`` or ``(out, in, kh, kw)``.
        plan: Corrected plan of the previous layer, ``(n_prev_A, n_prev_B)``.
        flatten_shape: ``(C, H, W)`` of the tensor flattened into this dense layer, or
            None if there is no flatten. Only ``H * W`` is used; the channel count is
            taken from ``plan`` (A's side before, B's side after), so either parent's
            ``C`` may be given.

    Returns:
        The aligned weight, with ``in`` replaced by B's input size.

    Raises:
        ValueError: If the input size does not match the plan.
    """
    n_in_a, n_in_b = plan.shape
    if flatten_shape is not None:
        if weight.ndim != 2:
            raise ValueError("a flatten is only supported into a dense layer")
        _, height, width = flatten_shape
        positions = height * width
        if weight.shape[1] != n_in_a * positions:
            raise ValueError(
                f"dense input {weight.shape[1]} != {n_in_a} channels x {positions} positions"
            )
        unflattened = weight.reshape(weight.shape[0], n_in_a, positions)
        aligned = _contract_axis(unflattened, plan, 1)
        return aligned.reshape(weight.shape[0], n_in_b * positions)
    if weight.shape[1] != n_in_a:
        raise ValueError(
            f"input size {weight.shape[1]} != plan rows {n_in_a}; "
            "a conv->dense switch needs an entry in flatten_shapes"
        )
    return _contract_axis(weight, plan, 1)


def _contract_axis(array: np.ndarray, plan: np.ndarray, axis: int) -> np.ndarray:
    """``out[.., j, ..] = sum_i array[.., i, ..] * plan[i, j]`` on ``axis``, as one BLAS matmul.

    (``np.einsum`` without ``optimize`` runs such products in its own loops, about
    10x slower than BLAS on a VGG11 512-channel conv, 1.8 s against 0.17 s here; the original multiplies with
    torch matmuls.)
    """
    # Contiguous, so that the reshapes of the cost and the transport that follow are views.
    return np.ascontiguousarray(np.moveaxis(np.tensordot(array, plan, axes=([axis], [0])), -1, axis))


def transport_outgoing(array: np.ndarray, plan: np.ndarray) -> np.ndarray:
    """Moves A's neurons (leading axis) onto B's: ``out[j] = sum_i plan[i, j] array[i]``.

    This is ``plan.T @ array`` on the leading (output-neuron) axis, applied alike to
    weights of any rank and to biases.

    Args:
        array: A weight ``(n_A, ...)`` or bias ``(n_A,)``.
        plan: Corrected plan ``(n_A, n_B)``.

    Returns:
        Array of shape ``(n_B, ...)``.
    """
    return (plan.T @ array.reshape(array.shape[0], -1)).reshape((plan.shape[1],) + array.shape[1:])


# --------------------------------------------------------------------------------------
# Ground cost.
# --------------------------------------------------------------------------------------


def neuron_features_from_weights(weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """One feature row per neuron for the weight-mode cost.

    The row is the neuron's (already aligned) incoming weights flattened (``in * kh * kw``
    for a conv, in PyTorch order), with the neuron's bias appended as one extra column
    when biases are given. The original has no biases; appending the bias is this
    reference's rule (a bias is one more incoming "weight", from a constant input 1).

    Args:
        weight: Aligned weight ``(out, in)`` or ``(out, in, kh, kw)``.
        bias: Bias ``(out,)`` or None.

    Returns:
        Array ``(out, features)``.
    """
    rows = weight.reshape(weight.shape[0], -1)
    if bias is None:
        return rows
    return np.concatenate([rows, bias.reshape(-1, 1)], axis=1)


def neuron_features_from_acts(acts: np.ndarray) -> np.ndarray:
    """One feature row per neuron for the activation-mode cost.

    Dense ``(S, n)`` becomes ``(n, S)``; conv ``(S, C, H, W)`` becomes
    ``(C, S * H * W)``: a channel's feature vector is all its values over samples and
    positions (the original permutes to ``(C, H, W, S)`` and flattens; the order of the
    features does not change a Euclidean or cosine cost).

    Args:
        acts: Activations, samples first.

    Returns:
        Array ``(neurons, features)``.
    """
    neurons_first = np.moveaxis(acts, 1, 0)
    return neurons_first.reshape(neurons_first.shape[0], -1)


def _unit_rows(features: np.ndarray) -> np.ndarray:
    """Scales each row to unit L2 norm, as the original ``_normed_vecs`` (with its eps)."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / (norms + UNIT_NORM_EPS)


def ground_cost(
    x: np.ndarray, y: np.ndarray, metric: str = "euclidean", squared: bool = False
) -> np.ndarray:
    """Pairwise cost between the rows of ``x`` (A's neurons) and ``y`` (B's neurons).

    Args:
        x: ``(n_A, d)`` features.
        y: ``(n_B, d)`` features.
        metric: ``"euclidean"`` (``||x_i - y_j||``, squared or not) or ``"cosine"``
            (``1 - cos(x_i, y_j)``, clipped below at 0 as in the original).
        squared: Euclidean only: keep the squared distance.

    Returns:
        Cost matrix ``(n_A, n_B)``.
    """
    if metric == "euclidean":
        # The expansion ||x||^2 + ||y||^2 - 2 x.y with one matmul, like the
        # original's efficient ground metric (``--ground-metric-eff``,
        # ``_pairwise_distances``), in float64 and on rows centred on their
        # joint mean (distances do not change; the expansion then does not
        # cancel for large offset rows such as activations). Clipped at 0.
        center = (x.sum(axis=0) + y.sum(axis=0)) / (x.shape[0] + y.shape[0])
        xc, yc = x - center, y - center
        sq = (xc * xc).sum(axis=1)[:, None] + (yc * yc).sum(axis=1)[None, :] - 2.0 * (xc @ yc.T)
        sq = np.maximum(sq, 0.0)
        return sq if squared else np.sqrt(sq)
    if metric == "cosine":
        norms = np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1))
        return np.maximum(1.0 - (x @ y.T) / norms, 0.0)
    raise ValueError(f"unknown ground metric {metric!r}")


def normalize_cost_matrix(cost: np.ndarray, how: str = "none") -> np.ndarray:
    """Normalises a cost matrix as the original ``GroundMetric._normalize``.

    Args:
        cost: Cost matrix.
        how: ``"none"``, ``"log"`` (``log1p``), or ``"max"`` / ``"median"`` /
            ``"mean"`` (divide by that statistic of all entries). The median is NumPy's
            (mean of the two middle values for an even count); ``torch.median`` in the
            original returns the lower one. This only matters for Sinkhorn: an exact
            plan does not change when the cost is scaled.

    Returns:
        The normalised cost.
    """
    if how == "none":
        return cost
    if how == "log":
        return np.log1p(cost)
    statistic = {"max": np.max, "median": np.median, "mean": np.mean}.get(how)
    if statistic is None:
        raise ValueError(f"unknown cost normalisation {how!r}")
    return cost / statistic(cost)


# --------------------------------------------------------------------------------------
# Marginals, OT solve, correction.
# --------------------------------------------------------------------------------------


def neuron_marginals(weight: np.ndarray, importance: str | None = None) -> np.ndarray:
    """Marginal over a layer's neurons: uniform, or proportional to incoming-weight norms.

    As the original ``_get_neuron_importance_histogram``: the norm of each neuron's
    *raw* (not aligned) incoming weights, flattened, plus ``1e-9``, normalised to sum 1.
    Biases do not enter. The caller uses uniform marginals for the last layer.

    Args:
        weight: Raw layer weight ``(out, ...)``.
        importance: None (uniform ``1/out``), ``"l1"`` or ``"l2"``.

    Returns:
        Probability vector ``(out,)``.
    """
    n = weight.shape[0]
    if importance is None:
        return np.ones(n) / n
    order = {"l1": 1, "l2": 2}.get(importance)
    if order is None:
        raise ValueError(f"unknown importance {importance!r}")
    hist = np.linalg.norm(weight.reshape(n, -1), ord=order, axis=1) + IMPORTANCE_EPS
    return hist / hist.sum()


def solve_ot(
    mu: np.ndarray,
    nu: np.ndarray,
    cost: np.ndarray,
    *,
    solver: str = "exact",
    reg: float = 1e-2,
    max_iter: int = 5000,
    threshold: float = 1e-9,
) -> np.ndarray:
    """Solves the transport problem between ``mu`` and ``nu`` for ``cost``.

    Args:
        mu: Source marginal ``(n_A,)``.
        nu: Target marginal ``(n_B,)``.
        cost: Cost ``(n_A, n_B)``.
        solver: ``"exact"`` (``ot.emd``, network simplex) or ``"sinkhorn"``
            (``ot.sinkhorn`` with ``method="sinkhorn_log"``).
        reg: Entropic regularisation, absolute: it multiplies the cost as given.
        max_iter: Sinkhorn iteration cap.
        threshold: Sinkhorn stopping threshold on the marginal error.

    Returns:
        The raw plan ``(n_A, n_B)``; its rows sum to ``mu`` and columns to ``nu``.
    """
    if solver == "exact":
        return ot.emd(mu, nu, cost, numItermax=1_000_000)
    if solver == "sinkhorn":
        return ot.sinkhorn(
            mu, nu, cost, reg, method="sinkhorn_log", numItermax=max_iter, stopThr=threshold
        )
    raise ValueError(f"unknown solver {solver!r}")


def correct_plan(
    plan: np.ndarray, *, correction: bool = True, proper_marginals: bool = False
) -> np.ndarray:
    """Rescales a raw plan so that each of B's neurons is a combination of A's.

    * ``correction=False``: the plan is used as is (the original then fuses and carries
      the raw plan, whose entries are about ``1/n``).
    * ``proper_marginals=True``: column ``j`` is divided by its actual mass
      ``sum_i plan[i, j]``, so every column sums to 1 (a barycentric combination).
    * otherwise: the plan is multiplied by ``n_B``. The original multiplies by
      ``n_A`` (``T @ diag(1 / (1/n_A + eps))``), which only type-checks for
      ``n_A == n_B``; ``n_B`` is the same there and makes columns sum to 1 under uniform
      marginals for any widths.

    The original adds ``eps=1e-7`` to the marginal it divides by; this does not.

    Args:
        plan: Raw plan ``(n_A, n_B)``.
        correction: Whether to correct at all.
        proper_marginals: Divide by actual column masses instead of scaling by ``n_B``.

    Returns:
        The corrected plan ``(n_A, n_B)``.
    """
    if not correction:
        return plan
    if proper_marginals:
        return plan / plan.sum(axis=0, keepdims=True)
    return plan * plan.shape[1]


# --------------------------------------------------------------------------------------
# Fusion.
# --------------------------------------------------------------------------------------


def _check_choices(mode: str, solver: str, ground_metric: str, normalize_cost: str,
                   importance: str | None) -> None:
    """Raises ValueError for an unknown option string."""
    for name, value, allowed in (
        ("mode", mode, _MODES),
        ("solver", solver, _SOLVERS),
        ("ground_metric", ground_metric, _METRICS),
        ("normalize_cost", normalize_cost, _COST_NORMS),
        ("importance", importance, _IMPORTANCES),
    ):
        if value not in allowed:
            raise ValueError(f"{name}={value!r}; expected one of {allowed}")


def _check_inputs(
    weights_a: Sequence[np.ndarray],
    weights_b: Sequence[np.ndarray],
    biases_a: Sequence[np.ndarray] | None,
    biases_b: Sequence[np.ndarray] | None,
    acts_a: Sequence[np.ndarray] | None,
    acts_b: Sequence[np.ndarray] | None,
    mode: str,
    align_last: bool,
) -> None:
    """Raises ValueError for inconsistent layer lists."""
    n_layers = len(weights_a)
    if n_layers == 0 or len(weights_b) != n_layers:
        raise ValueError("weights_a and weights_b must be non-empty and of equal length")
    if (biases_a is None) != (biases_b is None):
        raise ValueError("give biases for both parents or for neither")
    if biases_a is not None and not (len(biases_a) == len(biases_b) == n_layers):
        raise ValueError("one bias per layer is needed")
    if mode == "activations":
        if acts_a is None or acts_b is None:
            raise ValueError("activation mode needs acts_a and acts_b")
        needed = n_layers if align_last else n_layers - 1
        if len(acts_a) < needed or len(acts_b) < needed:
            raise ValueError(f"activations for the first {needed} layers are needed")
    for w_a, w_b in zip(weights_a, weights_b):
        if w_a.ndim != w_b.ndim or w_a.ndim not in (2, 4) or w_a.shape[2:] != w_b.shape[2:]:
            raise ValueError(f"incompatible layer shapes {w_a.shape} and {w_b.shape}")


def _fuse_pair(
    plan: np.ndarray, source: np.ndarray, target: np.ndarray, ensemble_step: float
) -> np.ndarray:
    """Returns ``(1 - s) * plan^T source + s * target`` on the leading axis."""
    moved = transport_outgoing(source, plan)
    if moved.shape != target.shape:
        raise ValueError(
            f"transported A has shape {moved.shape}, B has {target.shape} "
            "(past_correction=False needs equal input widths)"
        )
    moved *= 1.0 - ensemble_step  # a fresh array: scaled in place
    moved += ensemble_step * target
    return moved


def fuse_reference(
    weights_a: list[np.ndarray],
    weights_b: list[np.ndarray],
    *,
    biases_a: list[np.ndarray] | None = None,
    biases_b: list[np.ndarray] | None = None,
    acts_a: list[np.ndarray] | None = None,
    acts_b: list[np.ndarray] | None = None,
    mode: str = "weights",
    solver: str = "exact",
    reg: float = 1e-2,
    sinkhorn_max_iter: int = 5000,
    sinkhorn_threshold: float = 1e-9,
    ground_metric: str = "euclidean",
    squared: bool = False,
    normalize_cost: str = "none",
    unit_norm_rows: bool = False,
    correction: bool = True,
    proper_marginals: bool = False,
    past_correction: bool = True,
    ensemble_step: float = 0.5,
    importance: str | None = None,
    align_last: bool = True,
    flatten_shapes: Mapping[int, FlattenShape] | None = None,
    dtype: type = np.float64,
) -> tuple[list[np.ndarray], list[np.ndarray] | None, list[np.ndarray]]:
    """Fuses model A onto model B (the target) layer by layer, as the original OTFusion.

    Layers form a chain (no skips): dense ``(out, in)`` or conv ``(out, in, kh, kw)``
    weights, PyTorch layouts. The fused model has B's shapes.

    Args:
        weights_a: A's weights, one per layer.
        weights_b: B's weights, one per layer.
        biases_a: A's biases ``(out,)`` or None (then ``biases_b`` must be None too).
            Biases are transported with the layer's corrected plan like the weight rows
            and, in weight mode, appended as one feature column to each neuron's row for
            the cost.
        biases_b: B's biases or None.
        acts_a: Activation mode: A's activations per layer, ``(S, n)`` or
            ``(S, C, H, W)``, on the same S inputs as ``acts_b``. The last layer's entry
            may be omitted when ``align_last`` is False.
        acts_b: B's activations per layer.
        mode: ``"weights"`` (cost between rows of aligned ``W_A`` and ``W_B``) or
            ``"activations"`` (cost between the neurons' activations).
        solver: ``"exact"`` or ``"sinkhorn"``; see :func:`solve_ot`.
        reg: Sinkhorn regularisation, absolute (applied to the normalised cost).
        sinkhorn_max_iter: Sinkhorn iteration cap.
        sinkhorn_threshold: Sinkhorn stopping threshold.
        ground_metric: ``"euclidean"`` or ``"cosine"``.
        squared: Squared Euclidean distance (the original's default; ``--not-squared``
            is ``False`` here, as in every published command).
        normalize_cost: See :func:`normalize_cost_matrix`.
        unit_norm_rows: Weight mode only (ignored with activations, as in the original):
            scale each feature row (bias column included) to unit norm before the metric.
        correction: Rescale the plan before fusing; see :func:`correct_plan`.
        proper_marginals: Correct by actual column masses.
        past_correction: Fuse from the incoming-side-aligned ``W_A`` (True, as every
            published command) or from the raw ``W_A`` (False). The cost always uses the
            aligned ``W_A``.
        ensemble_step: ``s`` in ``(1 - s) * aligned_A + s * B``.
        importance: None, ``"l1"`` or ``"l2"``: marginals from incoming-weight norms,
            every layer but the last. The original asserts ``proper_marginals`` with it;
            this reference allows any correction.
        align_last: False: the output layer gets the identity plan, only its incoming
            side is aligned, and it is fused from the aligned ``W_A`` whatever
            ``past_correction`` says (the original's ``--skip-last-layer`` averaging).
        flatten_shapes: Layer index -> ``(C, H, W)`` of the tensor flattened (C-major)
            into that dense layer; see :func:`align_incoming`.
        dtype: ``np.float64`` (default: the tests' tight tolerances) or ``np.float32``
            (as the original: weights, costs and plans in float32; the OT solvers
            still run on float64 costs).

    Returns:
        ``(fused_weights, fused_biases, plans)``: fused weights in B's shapes; fused
        biases or None; and ``plans[l]``, the *raw* plan ``T_l`` (``n_A x n_B``, before
        correction), which is ``np.eye(n)`` for an unaligned last layer.
    """
    _check_choices(mode, solver, ground_metric, normalize_cost, importance)
    _check_inputs(weights_a, weights_b, biases_a, biases_b, acts_a, acts_b, mode, align_last)
    flatten_shapes = dict(flatten_shapes or {})
    n_layers = len(weights_a)
    with_bias = biases_a is not None

    fused_weights: list[np.ndarray] = []
    fused_biases: list[np.ndarray] = []
    plans: list[np.ndarray] = []
    previous_plan: np.ndarray | None = None  # corrected plan of the layer before

    for layer in range(n_layers):
        w_a = np.asarray(weights_a[layer], dtype=dtype)
        w_b = np.asarray(weights_b[layer], dtype=dtype)
        b_a = np.asarray(biases_a[layer], dtype=dtype) if with_bias else None
        b_b = np.asarray(biases_b[layer], dtype=dtype) if with_bias else None
        is_last = layer == n_layers - 1

        # 1. Align A's incoming side with the previous corrected plan.
        if previous_plan is None:
            aligned_a = w_a
        else:
            aligned_a = align_incoming(w_a, previous_plan, flatten_shapes.get(layer))

        if is_last and not align_last:
            if w_a.shape[0] != w_b.shape[0]:
                raise ValueError("align_last=False needs equal output widths")
            raw_plan = np.eye(w_a.shape[0], dtype=dtype)
            plan = raw_plan
            source = aligned_a
        else:
            # 2. Ground cost between neurons.
            if mode == "weights":
                x = neuron_features_from_weights(aligned_a, b_a)
                y = neuron_features_from_weights(w_b, b_b)
                if unit_norm_rows:
                    x, y = _unit_rows(x), _unit_rows(y)
            else:
                x = neuron_features_from_acts(np.asarray(acts_a[layer], dtype=dtype))
                y = neuron_features_from_acts(np.asarray(acts_b[layer], dtype=dtype))
            cost = normalize_cost_matrix(ground_cost(x, y, ground_metric, squared),
                                         normalize_cost)

            # 3. Marginals and transport plan.
            layer_importance = None if is_last else importance
            mu = neuron_marginals(w_a, layer_importance)
            nu = neuron_marginals(w_b, layer_importance)
            raw_plan = solve_ot(mu, nu, cost.astype(np.float64), solver=solver, reg=reg,
                                max_iter=sinkhorn_max_iter, threshold=sinkhorn_threshold)
            raw_plan = raw_plan.astype(dtype, copy=False)

            # 4. Correction.
            plan = correct_plan(raw_plan, correction=correction,
                                proper_marginals=proper_marginals)
            source = aligned_a if past_correction else w_a

        # 5. Fuse (biases have no incoming side: past_correction does not apply).
        fused_weights.append(_fuse_pair(plan, source, w_b, ensemble_step))
        if with_bias:
            fused_biases.append(_fuse_pair(plan, b_a, b_b, ensemble_step))
        plans.append(raw_plan)

        # 6. Carry the corrected plan.
        previous_plan = plan

    return fused_weights, (fused_biases if with_bias else None), plans


# --------------------------------------------------------------------------------------
# Forward passes (test helpers, to produce activations). Independent of the fusion code.
# --------------------------------------------------------------------------------------


def _relu(x: np.ndarray) -> np.ndarray:
    """Elementwise ReLU."""
    return np.maximum(x, 0.0)


def _dense(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``x @ weight.T + bias`` for a PyTorch ``(out, in)`` weight."""
    out = x @ weight.T
    return out if bias is None else out + bias


def _conv_same(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Stride-1 'same' cross-correlation (PyTorch ``Conv2d``, odd kernel), NCHW."""
    _, _, height, width = x.shape
    kh, kw = weight.shape[2:]
    padded = np.pad(x, ((0, 0), (0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)))
    out = np.zeros((x.shape[0], weight.shape[0], height, width))
    for dy in range(kh):
        for dx in range(kw):
            window = padded[:, :, dy:dy + height, dx:dx + width]
            out += np.einsum("sihw,oi->sohw", window, weight[:, :, dy, dx])
    return out if bias is None else out + bias[None, :, None, None]


def _max_pool_2x2(x: np.ndarray) -> np.ndarray:
    """2x2 max pool, stride 2, NCHW (even H and W)."""
    s, c, h, w = x.shape
    return x.reshape(s, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def forward_mlp(
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray] | None,
    x: np.ndarray,
    *,
    pre_relu: bool = True,
) -> list[np.ndarray]:
    """Runs an MLP (ReLU between layers, none after the last) and records activations.

    Args:
        weights: Dense weights ``(out, in)``.
        biases: Biases ``(out,)`` or None.
        x: Inputs ``(S, in)``.
        pre_relu: Record each hidden layer's pre-activation (the original's
            ``--prelu-acts``) instead of its ReLU output.

    Returns:
        One ``(S, out)`` array per layer; the last is the network output (logits).
    """
    acts = []
    h = np.asarray(x, dtype=np.float64)
    for layer, weight in enumerate(weights):
        z = _dense(h, weight, None if biases is None else biases[layer])
        if layer == len(weights) - 1:
            acts.append(z)
            break
        h = _relu(z)
        acts.append(z if pre_relu else h)
    return acts


def forward_cnn(
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray] | None,
    x: np.ndarray,
    *,
    pool_after: Sequence[int] = (),
    pre_relu: bool = True,
) -> list[np.ndarray]:
    """Runs a chain of 'same' convs, then dense layers, and records activations.

    Each conv (4-D weight, odd kernel, stride 1) is followed by ReLU and, if its index is
    in ``pool_after``, a 2x2 max pool. Before the first dense (2-D weight) layer the
    tensor is flattened in PyTorch (C, H, W) order. Dense layers are as in
    :func:`forward_mlp`: ReLU between them, none after the last.

    Args:
        weights: Conv weights ``(out, in, kh, kw)`` followed by dense ``(out, in)``.
        biases: Biases or None.
        x: Inputs ``(S, C, H, W)``.
        pool_after: Indices of conv layers followed by a 2x2 max pool.
        pre_relu: Record pre-ReLU outputs (conv: before ReLU and pool) instead of
            post-ReLU (conv: after ReLU, before pool).

    Returns:
        One array per layer: ``(S, C, H, W)`` for convs, ``(S, out)`` for dense layers.
    """
    acts = []
    h = np.asarray(x, dtype=np.float64)
    for layer, weight in enumerate(weights):
        bias = None if biases is None else biases[layer]
        if weight.ndim == 4:
            z = _conv_same(h, weight, bias)
            h = _relu(z)
            acts.append(z if pre_relu else h)
            if layer in pool_after:
                h = _max_pool_2x2(h)
            continue
        z = _dense(h.reshape(h.shape[0], -1), weight, bias)
        if layer == len(weights) - 1:
            acts.append(z)
            break
        h = _relu(z)
        acts.append(z if pre_relu else h)
    return acts
