"""fuse_sharded: a batch of pairs split over devices gives the vmap/loop result, really sharded.

Eight CPU devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before JAX is imported, so those checks run in a subprocess (a background job: it
starts when collection ends and runs beside the other tests).
"""

from __future__ import annotations

import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import background

import otfusion_jax as otf
from otfusion_jax import sharding
from otfusion_jax.models import build, init

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_EIGHT_DEVICES = textwrap.dedent(
    """
    import json, os
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp
    import otfusion_jax as otf
    from otfusion_jax import sharding
    from otfusion_jax.models import build, capture_activations, init

    model, spec = build("mlpnet", input_shape=(4, 4, 1), num_classes=5, widths=(10, 6), bias=True)
    stack = lambda trees: jax.tree_util.tree_map(lambda *x: jnp.stack(x), *trees)
    leaves = jax.tree_util.tree_leaves
    diff = lambda a, b: max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(leaves(a), leaves(b)))
    mesh = sharding.make_pair_mesh()
    x = jax.random.normal(jax.random.key(99), (6, 4, 4, 1))
    cases = [
        (8, otf.FusionConfig()),
        (5, otf.FusionConfig()),
        (8, otf.FusionConfig(solver="sinkhorn", relative_epsilon="mean", epsilon=0.05)),
        (5, otf.FusionConfig(mode="activations", exact_backend="host")),
        (5, otf.FusionConfig(exact_backend="auction")),
    ]
    report = {"n_devices": len(jax.devices()), "cases": []}
    for b, cfg in cases:
        vs = [init(model, k, (4, 4, 1)) for k in jax.random.split(jax.random.key(b), 2 * b)]
        pa, pb = stack(vs[:b]), stack(vs[b:])
        acts = None
        if cfg.mode == "activations":
            acts = [stack([capture_activations(model, v, x) for v in half]) for half in (vs[:b], vs[b:])]
        fused, aux = sharding.fuse_sharded([pa, pb], spec, cfg, mesh=mesh, activations=acts)
        one = lambda a, b_, acts_: otf.fuse([a, b_], spec, cfg, activations=acts_)
        vmapped = jax.jit(jax.vmap(lambda a, b_, acts_: one(a, b_, acts_)[0]))(pa, pb, acts)
        # The loop only once (test_fusion already checks vmap against the loop).
        looped = None
        if not report["cases"]:
            looped = stack([one(vs[i], vs[b + i], None)[0] for i in range(b)])
        kernel = fused["params"]["fc1"]["kernel"]
        case = {
            "b": b, "solver": cfg.solver, "backend": cfg.exact_backend, "mode": cfg.mode,
            "shape0": kernel.shape[0], "plan_shape0": aux.plans[0]["fc1"].shape[0],
            "vs_vmap": diff(fused, vmapped), "vs_loop": None if looped is None else diff(fused, looped),
            "n_shard_devices": len(kernel.sharding.device_set),
            "shard_rows": sorted(s.data.shape[0] for s in kernel.addressable_shards),
            "spec": str(getattr(kernel.sharding, "spec", None)),
        }
        if b % 8:
            padded, _ = sharding.fuse_sharded([pa, pb], spec, cfg, mesh=mesh, activations=acts, trim=False)
            pk = padded["params"]["fc1"]["kernel"]
            case["untrimmed_shape0"] = pk.shape[0]
            case["untrimmed_shard_rows"] = sorted(s.data.shape[0] for s in pk.addressable_shards)
            case["untrimmed_head_vs_vmap"] = diff(jax.tree_util.tree_map(lambda t: t[:b], padded), vmapped)
        report["cases"].append(case)
    print("REPORT" + json.dumps(report))
    """
)


def _eight_device_commands(folder):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    return [background.Command(["-c", _EIGHT_DEVICES], cwd=folder, env=env)]


# Started when collection ends, beside the in-process tests (tests/background.py).
EIGHT_DEVICES = background.register("eight_devices", _eight_device_commands, fixture="eight_device_report", timeout=300)


@pytest.fixture(scope="module")
def eight_device_report():
    (proc,) = EIGHT_DEVICES.result().procs
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")][-1]
    return json.loads(line[len("REPORT") :])


@pytest.mark.slow
def test_eight_devices_are_visible(eight_device_report):
    assert eight_device_report["n_devices"] == 8


@pytest.mark.slow
def test_sharded_equals_vmap_and_loop(eight_device_report):
    for case in eight_device_report["cases"]:
        assert case["shape0"] == case["b"] and case["plan_shape0"] == case["b"], case
        tol = 1e-5 if case["solver"] == "sinkhorn" else 0.0
        assert case["vs_vmap"] <= tol, case
        assert case["vs_loop"] is None or case["vs_loop"] <= tol, case
    assert eight_device_report["cases"][0]["vs_loop"] == 0.0


@pytest.mark.slow
def test_output_is_sharded_over_eight_devices(eight_device_report):
    full = [c for c in eight_device_report["cases"] if c["b"] == 8]
    assert full
    for case in full:
        assert case["n_shard_devices"] == 8, case
        assert case["shard_rows"] == [1] * 8, case
        assert "pairs" in case["spec"], case


@pytest.mark.slow
def test_uneven_batch_is_padded_then_trimmed(eight_device_report):
    uneven = [c for c in eight_device_report["cases"] if c["b"] == 5]
    assert uneven
    for case in uneven:
        assert case["untrimmed_shape0"] == 8 and case["untrimmed_shard_rows"] == [1] * 8, case
        assert case["untrimmed_head_vs_vmap"] == 0.0, case


def _pairs(b):
    model, spec = build("mlpnet", input_shape=(4, 4, 1), num_classes=5, widths=(7, 5), bias=False)
    vs = [init(model, k, (4, 4, 1)) for k in jax.random.split(jax.random.key(3), 2 * b)]
    stack = lambda trees: jax.tree_util.tree_map(lambda *x: jnp.stack(x), *trees)  # noqa: E731
    return spec, vs, stack(vs[:b]), stack(vs[b:])


@pytest.mark.slow
def test_default_mesh_in_process_matches_loop():
    spec, vs, pa, pb = _pairs(3)
    mesh = sharding.make_pair_mesh()
    assert mesh.axis_names == (sharding.PAIR_AXIS,) and mesh.devices.size == len(jax.devices())
    weights = jnp.array([[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]])
    fused, aux = sharding.fuse_sharded([pa, pb], spec, otf.FusionConfig(), weights=weights)
    for i in range(3):
        ref, _ = otf.fuse([vs[i], vs[3 + i]], spec, otf.FusionConfig(), weights=weights[i])
        for x, y in zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_allclose(np.asarray(x[i]), np.asarray(y), atol=1e-6)
    np.testing.assert_allclose(np.asarray(aux.weights), np.asarray(weights) / 1.0, atol=1e-6)


def test_mismatched_batch_sizes_are_rejected():
    spec, _, pa, pb = _pairs(3)
    pb = jax.tree_util.tree_map(lambda x: x[:2], pb)
    with pytest.raises(otf.FusionError, match="disagree on the number of pairs"):
        sharding.fuse_sharded([pa, pb], spec)


def test_mesh_must_be_one_dimensional_over_pairs():
    spec, _, pa, pb = _pairs(2)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("batch",))
    with pytest.raises(ValueError, match="axis 'pairs'"):
        sharding.fuse_sharded([pa, pb], spec, mesh=mesh)
