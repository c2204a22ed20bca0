"""Where the time of one fusion goes, and what cheaper formulations would save.

Usage: ``python bench/engine_probe.py [--out bench/probe.json] [--repeats 5]``

Measures on one device (figures printed as Markdown and written as JSON with
the device info of ``bench_fusion.device_info``):

1. ``apply_plans`` with the dense corrected plans (what ``fusion`` does: one
   ``tensordot`` with an (n, n) matrix per plan axis, O(n^2 d)) against a
   gather (``jnp.take`` with the permutation, O(n d)), for exact plans on
   equal widths, where the corrected plan is a permutation matrix;
2. the host exact solver: POT's network simplex (``ot.emd``, what
   ``exact_backend="host"`` calls) against scipy's ``linear_sum_assignment``
   for square uniform problems, and optax's Hungarian under jit;
3. the host-side checks ``otf.fuse`` runs on concrete inputs;
4. activation-mode cost: rows built by transposing (S, H, W, C) to (C, S*H*W)
   and centring (as ``fusion._act_rows`` + ``ot.pairwise_cost``) against a Gram
   matrix contracted directly over the sample and spatial axes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fusion as bf  # noqa: E402

from otfusion_jax import fusion, ot  # noqa: E402
from otfusion_jax import spec as spec_lib  # noqa: E402
from otfusion_jax.models import build, capture_activations, init  # noqa: E402


def _median_ms(fn, repeats):
    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts))


def apply_gather(parent, spec, perms):
    """``apply_plans`` for permutation plans: target neuron j takes source neuron perms[name][j]."""
    flat = spec_lib.flatten_paths(parent)
    out = {}
    for path, ls in spec.leaves:
        leaf = flat[path]
        x = leaf.reshape(spec_lib.view_shape(ls, leaf.shape))
        for ax, name in enumerate(ls.axes):
            if name is not None:
                x = jnp.take(x, perms[name], axis=ax)
        out[path] = x.reshape(leaf.shape[: len(leaf.shape) - 1] + x.shape[-1:]) if ls.view else x
    return spec_lib.unflatten_paths(out)


def probe_apply(name, shape, options, repeats):
    model, spec = build(name, input_shape=shape, num_classes=10, **options)
    v = init(model, jax.random.key(0), shape)
    sizes = spec.check_variables(v)
    rng = np.random.default_rng(0)
    perms = {p: jnp.asarray(rng.permutation(sizes[p])) for p in spec.plans}
    plans = {p: jnp.eye(sizes[p], dtype=jnp.float32)[:, perms[p]] for p in spec.plans}
    dense = jax.jit(lambda v_, pl: fusion.apply_plans(v_, spec, pl))
    gather = jax.jit(lambda v_, pm: apply_gather(v_, spec, pm))
    a, b = dense(v, plans), gather(v, perms)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    return {
        "model": name,
        "dense_ms": _median_ms(lambda: dense(v, plans), repeats),
        "gather_ms": _median_ms(lambda: gather(v, perms), repeats),
        "max_abs_diff": diff,
        "n_params": int(sum(x.size for x in jax.tree_util.tree_leaves(v))),
    }


def probe_solvers(repeats):
    import ot as pot
    from optax import assignment
    from scipy.optimize import linear_sum_assignment

    rows = []
    rng = np.random.default_rng(0)
    hung = jax.jit(lambda c: assignment.hungarian_algorithm(c))
    for n, d in ((100, 200), (400, 784), (512, 4608)):
        x, y = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)
        cost = np.asarray(ot.pairwise_cost(jnp.asarray(x), jnp.asarray(y)))
        u = np.full(n, 1.0 / n)
        c64 = cost.astype(np.float64)
        plan = pot.emd(u, u, c64)
        r, c = linear_sum_assignment(cost)
        hr, hc = hung(jnp.asarray(cost))
        rows.append(
            {
                "n": n,
                "features": d,
                "pot_emd_ms": _median_ms(lambda: pot.emd(u, u, c64), repeats),
                "scipy_lsa_ms": _median_ms(lambda: linear_sum_assignment(cost), repeats),
                "optax_hungarian_jit_ms": _median_ms(lambda: hung(jnp.asarray(cost)), repeats),
                "same_optimum": bool(
                    np.isclose((plan * c64).sum() * n, cost[r, c].sum(), rtol=1e-5)
                    and np.isclose(cost[np.asarray(hr), np.asarray(hc)].sum(), cost[r, c].sum(), rtol=1e-5)
                ),
            }
        )
    return rows


def probe_checks(repeats):
    rows = []
    for name, shape, options in (
        ("mlpnet", (28, 28, 1), {}),
        ("vgg11", (32, 32, 3), {}),
        ("resnet18", (32, 32, 3), {"norm": True}),
    ):
        model, spec = build(name, input_shape=shape, num_classes=10, **options)
        ps = [init(model, jax.random.key(i), shape) for i in range(2)]
        rows.append(
            {
                "model": name,
                "check_parents_ms": _median_ms(lambda: fusion.check_parents(ps, spec), repeats),
                "check_finite_ms": _median_ms(lambda: fusion.check_finite(ps), repeats),
            }
        )
    return rows


def probe_act_cost(repeats, samples):
    model, _ = build("vgg11", input_shape=(32, 32, 3), num_classes=10)
    x = jax.random.normal(jax.random.key(1), (samples, 32, 32, 3))
    acts = [capture_activations(model, init(model, jax.random.key(i), (32, 32, 3)), x) for i in range(2)]
    rows = []
    for layer in ("conv1", "conv3", "conv5"):
        a, b = acts[0][layer][0], acts[1][layer][0]

        def current(a_, b_):
            xa, xb = fusion._act_rows({"l": (a_,)}, "l", "a"), fusion._act_rows({"l": (b_,)}, "l", "b")
            return ot.pairwise_cost(xa, xb)

        def gram(a_, b_):
            # Same centring as ot.pairwise_cost (joint mean row), without the transpose to rows.
            axes = tuple(range(a_.ndim - 1))
            center = (jnp.sum(a_, -1) + jnp.sum(b_, -1)) / (a_.shape[-1] + b_.shape[-1])
            a_, b_ = a_ - center[..., None], b_ - center[..., None]
            g = jnp.tensordot(a_, b_, axes=(axes, axes))
            sq = jnp.sum(a_ * a_, axes)[:, None] + jnp.sum(b_ * b_, axes)[None, :] - 2.0 * g
            return jnp.sqrt(jnp.maximum(sq, 0.0))

        fc, fg = jax.jit(current), jax.jit(gram)
        rows.append(
            {
                "layer": layer,
                "acts_shape": list(a.shape),
                "rows_then_cost_ms": _median_ms(lambda: fc(a, b), repeats),
                "gram_over_axes_ms": _median_ms(lambda: fg(a, b), repeats),
                "max_rel_diff": float(jnp.max(jnp.abs(fc(a, b) - fg(a, b))) / jnp.max(fc(a, b))),
            }
        )
    return rows


def probe_breakdown(repeats):
    """VGG11 weights pair: full fusion (exact-host) vs its plan application alone."""
    model, spec = build("vgg11", input_shape=(32, 32, 3), num_classes=10)
    ps = [init(model, jax.random.key(i), (32, 32, 3)) for i in range(2)]
    out = {}
    for solver in ("exact-host", "exact-device", "sinkhorn"):
        cfg = bf._config(solver, "weights")
        f = jax.jit(bf._pair_fn(spec, cfg))
        out[f"fuse_{solver}_ms"] = _median_ms(lambda: f(ps, None), repeats)
    _, aux = jax.jit(bf._pair_fn(spec, bf._config("exact-host", "weights")))(ps, None)
    plans = aux.plans[0]
    dense = jax.jit(lambda v_, pl: fusion.apply_plans(v_, spec, pl))
    out["apply_plans_dense_ms"] = _median_ms(lambda: dense(ps[0], plans), repeats)
    return out


def _emd_or_assignment(a, b, cost):
    """Host solver as proposed: scipy's assignment for square uniform problems, else POT/LP as now."""
    from scipy.optimize import linear_sum_assignment

    n, m = cost.shape
    if n == m and np.allclose(a, 1.0 / n) and np.allclose(b, 1.0 / m):
        r, c = linear_sum_assignment(np.asarray(cost, np.float64))
        plan = np.zeros((n, m), np.float32)
        plan[r, c] = 1.0 / n
        return plan
    return _ORIGINAL_EMD(a, b, cost)


_ORIGINAL_EMD = ot._emd_numpy


def probe_host_assignment(repeats):
    """Whole pairs with exact_backend="host": POT emd (now) vs linear_sum_assignment (proposed)."""
    rows = []
    for name, shape, options in (("mlpnet", (28, 28, 1), {}), ("vgg11", (32, 32, 3), {})):
        model, spec = build(name, input_shape=shape, num_classes=10, **options)
        ps = [init(model, jax.random.key(i), shape) for i in range(2)]
        f = jax.jit(bf._pair_fn(spec, bf._config("exact-host", "weights")))
        row = {"model": name}
        try:
            ot._emd_numpy = _ORIGINAL_EMD
            row["pot_emd_ms"] = _median_ms(lambda: f(ps, None), repeats)
            a = f(ps, None)[0]
            ot._emd_numpy = _emd_or_assignment
            row["assignment_ms"] = _median_ms(lambda: f(ps, None), repeats)
            b = f(ps, None)[0]
        finally:
            ot._emd_numpy = _ORIGINAL_EMD
        row["max_abs_diff"] = max(
            float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
        )
        rows.append(row)
    return rows


def probe_vmap_hungarian(repeats, n=400, batch=8):
    """optax's Hungarian: one (n, n) problem vs ``batch`` of them under vmap, per problem."""
    from optax import assignment

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(batch, n, 784)).astype(np.float32), rng.normal(size=(batch, n, 784)).astype(np.float32)
    costs = jax.vmap(ot.pairwise_cost)(jnp.asarray(x), jnp.asarray(y))
    single = jax.jit(assignment.hungarian_algorithm)
    batched = jax.jit(jax.vmap(assignment.hungarian_algorithm))
    loop_ms = _median_ms(lambda: [single(c) for c in costs], max(1, repeats // 2))
    vmap_ms = _median_ms(lambda: batched(costs), max(1, repeats // 2))
    return {"n": n, "batch": batch, "loop_ms_per_problem": loop_ms / batch, "vmap_ms_per_problem": vmap_ms / batch}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "probe.json")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--samples", type=int, default=200)
    args = p.parse_args(argv)
    report = {"device": bf.device_info(), "loadavg_start": bf._loadavg()}
    report["apply_plans"] = [
        probe_apply("mlpnet", (28, 28, 1), {}, args.repeats),
        probe_apply("vgg11", (32, 32, 3), {}, args.repeats),
        probe_apply("resnet18", (32, 32, 3), {"norm": True}, args.repeats),
    ]
    print(report["apply_plans"], flush=True)
    report["vgg11_breakdown"] = probe_breakdown(args.repeats)
    print(report["vgg11_breakdown"], flush=True)
    report["solvers"] = probe_solvers(args.repeats)
    print(report["solvers"], flush=True)
    report["host_assignment"] = probe_host_assignment(args.repeats)
    print(report["host_assignment"], flush=True)
    report["vmap_hungarian"] = probe_vmap_hungarian(args.repeats)
    print(report["vmap_hungarian"], flush=True)
    report["checks"] = probe_checks(args.repeats)
    print(report["checks"], flush=True)
    report["activation_cost"] = probe_act_cost(args.repeats, args.samples)
    print(report["activation_cost"], flush=True)
    report["loadavg_end"] = bf._loadavg()
    bf.write_json_atomic(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
