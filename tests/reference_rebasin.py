"""An independent NumPy + scipy reference of Git Re-Basin's weight matching (Ainsworth et al., 2023).

A transcription of ``weight_matching`` in samuela/git-re-basin ``src/weight_matching.py``
on plain NumPy arrays, sharing no code with ``otfusion_jax``:

* a permutation spec is ``perm_to_axes``: permutation name -> list of
  (parameter key, axis) it acts on (written by hand per architecture here,
  like the repository's ``mlp_permutation_spec``);
* ``perm[p][i]`` is the model-B neuron that takes A's place i: B is permuted
  onto A (the repository's convention; ``otfusion_jax`` permutes the parent onto
  the target, so call this with ``params_a=target, params_b=parent``);
* start at the identity; each iteration visits the permutations in a random
  order (here: given, ``orders[iteration]``, so a test can feed the order
  ``otfusion_jax`` used; the repository draws it from ``rngmix(rng, iteration)``),
  builds ``A = sum_(key, axis) w_a[key] (axis first) @ w_b[key] (other axes permuted, axis first)^T``,
  solves ``linear_sum_assignment(A, maximize=True)`` and always takes the new
  permutation; it stops after an iteration without progress (``newL > oldL + 1e-12``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["mlp_perm_to_axes", "permute", "weight_matching", "objective"]


def mlp_perm_to_axes(num_hidden: int, bias: bool) -> dict[str, list[tuple[str, int]]]:
    """Flax MLP ``fc1..fc{L+1}`` (kernels (in, out)): P_i permutes fc_i's outputs and fc_{i+1}'s inputs.

    The output layer has no permutation (its classes keep their order), as in the repository's specs.
    """
    spec = {}
    for i in range(1, num_hidden + 1):
        axes = [(f"fc{i}/kernel", 1), (f"fc{i + 1}/kernel", 0)]
        if bias:
            axes.append((f"fc{i}/bias", 0))
        spec[f"P{i}"] = axes
    return spec


def _axes_to_perm(perm_to_axes):
    out: dict[str, dict[int, str]] = {}
    for p, axes in perm_to_axes.items():
        for key, axis in axes:
            out.setdefault(key, {})[axis] = p
    return out


def permute(params: Mapping[str, np.ndarray], perm_to_axes, perm, except_key=None, except_axis=None) -> dict:
    """``params`` with every permuted axis taken in ``perm`` order (``except`` one (key, axis))."""
    a2p = _axes_to_perm(perm_to_axes)
    out = {}
    for key, w in params.items():
        w = np.asarray(w)
        for axis, p in a2p.get(key, {}).items():
            if key == except_key and axis == except_axis:
                continue
            w = np.take(w, perm[p], axis=axis)
        out[key] = w
    return out


def objective(params_a, params_b, perm_to_axes, perm) -> float:
    """sum over parameters of <A, B permuted> (float64)."""
    pb = permute(params_b, perm_to_axes, perm)
    return float(sum(np.vdot(np.asarray(params_a[k], np.float64), np.asarray(pb[k], np.float64)) for k in params_a))


def weight_matching(
    params_a: Mapping[str, np.ndarray],
    params_b: Mapping[str, np.ndarray],
    perm_to_axes: Mapping[str, Sequence[tuple[str, int]]],
    orders: Sequence[Sequence[int]],
    init_perm: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """Git Re-Basin's coordinate descent. Returns (perm, iterations run).

    Args:
      params_a, params_b: flat parameter dicts (``"fc1/kernel"`` -> array), float.
      perm_to_axes: the permutation spec.
      orders: one visiting order (indices into ``list(perm_to_axes)``) per
        iteration; at most ``len(orders)`` iterations.
      init_perm: starting permutations (default identity).
    """
    names = list(perm_to_axes)
    sizes = {p: np.shape(params_a[axes[0][0]])[axes[0][1]] for p, axes in perm_to_axes.items()}
    perm = {p: np.arange(n) for p, n in sizes.items()} if init_perm is None else {p: np.asarray(v) for p, v in init_perm.items()}
    params_a = {k: np.asarray(v, np.float64) for k, v in params_a.items()}
    params_b = {k: np.asarray(v, np.float64) for k, v in params_b.items()}
    done = 0
    for order in orders:
        done += 1
        progress = False
        for p_ix in order:
            p = names[p_ix]
            n = sizes[p]
            a = np.zeros((n, n))
            for key, axis in perm_to_axes[p]:
                w_a = np.moveaxis(params_a[key], axis, 0).reshape(n, -1)
                w_b = permute({key: params_b[key]}, perm_to_axes, perm, except_key=key, except_axis=axis)[key]
                w_b = np.moveaxis(w_b, axis, 0).reshape(n, -1)
                a += w_a @ w_b.T
            ri, ci = linear_sum_assignment(a, maximize=True)
            assert (ri == np.arange(len(ri))).all()
            old = np.sum(a[np.arange(n), perm[p]])
            new = np.sum(a[np.arange(n), ci])
            progress = progress or new > old + 1e-12
            perm[p] = ci
        if not progress:
            break
    return perm, done
