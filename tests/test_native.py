"""The native exact assignment (C++ through an XLA FFI call): optimal, batched, cacheable, the CPU default."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import otfusion_jax as otf
from fusion_helpers import max_abs_diff, random_variables
from otfusion_jax import native, ot
from otfusion_jax.models import build

if not native.available():  # no C++ compiler on this machine: "auto" falls back to the host solvers
    pytest.skip(f"native solver unavailable: {native.build_error()}", allow_module_level=True)

_assign = jax.jit(native.assign)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _objective(cost, perm):
    return float(cost[perm, np.arange(cost.shape[0])].sum())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**31 - 1), levels=st.sampled_from([0, 2, 5, 1000]))
def test_native_is_an_optimal_permutation(n, seed, levels):
    """Same objective as scipy on random costs, ties included (levels: how many distinct values; 0: all equal)."""
    rng = np.random.default_rng(seed)
    cost = rng.integers(0, max(levels, 1), (n, n)).astype(np.float32) if levels else np.zeros((n, n), np.float32)
    cost += 0.0 if levels != 1000 else rng.standard_normal((n, n)).astype(np.float32)
    perm = np.asarray(_assign(jnp.asarray(cost)))
    assert perm.dtype == np.int32 and sorted(perm.tolist()) == list(range(n))
    rows, cols = linear_sum_assignment(cost)
    np.testing.assert_allclose(_objective(cost, perm), cost[rows, cols].sum(), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("family", ["uniform", "distances", "rank1", "integers", "permuted"])
def test_native_is_optimal_on_harder_families(family):
    """Larger problems of the kinds that stress the row reduction: near-constant distances, rank-one costs
    (many reduced costs tie), few distinct values, and a noisy permutation (what aligned neurons look like)."""
    rng = np.random.default_rng(["uniform", "distances", "rank1", "integers", "permuted"].index(family))
    for n in (63, 128, 200):
        if family == "uniform":
            cost = rng.random((n, n))
        elif family == "distances":
            x, y = rng.standard_normal((2, n, 300))
            cost = np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1))
        elif family == "rank1":
            cost = np.outer(rng.random(n), rng.random(n))
        elif family == "integers":
            cost = rng.integers(0, 4, (n, n)).astype(float)
        else:
            x = rng.standard_normal((n, 50))
            cost = ((x[:, None] - x[rng.permutation(n)][None] - 0.3 * rng.standard_normal((1, n, 50))) ** 2).sum(-1)
        cost = cost.astype(np.float32)
        perm = np.asarray(_assign(jnp.asarray(cost)))
        assert sorted(perm.tolist()) == list(range(n))
        rows, cols = linear_sum_assignment(cost)
        np.testing.assert_allclose(_objective(cost, perm), cost[rows, cols].sum(), rtol=1e-5, atol=1e-4)


def test_native_float64_and_exact_assignment_api():
    rng = np.random.default_rng(0)
    cost = rng.standard_normal((30, 30))
    with jax.enable_x64(True):  # jax >= 0.7 (earlier: jax.experimental.enable_x64())
        perm64 = np.asarray(jax.jit(native.assign)(jnp.asarray(cost, jnp.float64)))
    rows, cols = linear_sum_assignment(cost)
    assert _objective(cost, perm64) == pytest.approx(cost[rows, cols].sum(), abs=1e-9)
    plan, perm, info = jax.jit(ot.exact_assignment_native)(jnp.asarray(cost, jnp.float32))
    host_plan, host_perm, _ = jax.jit(lambda c: ot.exact_assignment_host(c, "scipy"))(jnp.asarray(cost, jnp.float32))
    np.testing.assert_array_equal(np.asarray(perm), np.asarray(host_perm))  # no ties: the optimum is unique
    np.testing.assert_array_equal(np.asarray(plan), np.asarray(host_plan))
    assert np.isfinite(float(info.cost))


def test_native_under_vmap_solves_each_problem():
    rng = np.random.default_rng(1)
    costs = jnp.asarray(rng.standard_normal((3, 5, 17, 17)), jnp.float32)
    batched = np.asarray(jax.jit(jax.vmap(jax.vmap(native.assign)))(costs))
    assert batched.shape == (3, 5, 17)
    for i in range(3):
        for j in range(5):
            np.testing.assert_array_equal(batched[i, j], np.asarray(_assign(costs[i, j])))


def test_native_bad_input_errors():
    with pytest.raises(ValueError, match=r"square cost.*\(4, 5\)"):
        native.assign(jnp.zeros((4, 5)))
    with pytest.raises(ValueError, match="floating-point costs, got int32"):
        native.assign(jnp.zeros((4, 4), jnp.int32))
    half = jnp.asarray(np.random.default_rng(0).standard_normal((9, 9)), jnp.bfloat16)  # solved in float32
    np.testing.assert_array_equal(np.asarray(native.assign(half)), np.asarray(native.assign(half.astype(jnp.float32))))
    assert native.assign(jnp.zeros((2, 0, 0))).shape == (2, 0) and native.assign(jnp.zeros((0, 3, 3))).shape == (0, 3)
    cost = np.zeros((6, 6), np.float32)
    cost[2, 3] = np.nan
    with pytest.raises(Exception, match=r"cost entry \(2, 3\) is not finite"):
        np.asarray(_assign(jnp.asarray(cost)))


def test_auto_picks_native_on_a_cpu_and_falls_back(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert ot.resolve_backend("auto") == "native" and ot.resolve_backend("native") == "native"
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "build_error", lambda: "no C++ compiler found")
    assert ot.resolve_backend("auto") == ("lapjv" if ot.has_lapjv() else "host")
    with pytest.raises(ValueError, match="exact_backend='native' cannot be used: no C\\+\\+ compiler found"):
        ot.resolve_backend("native")


@pytest.mark.parametrize(
    "backend", ["native", pytest.param("lapjv", marks=pytest.mark.skipif(not ot.has_lapjv(), reason="no lapjv"))]
)
def test_fusion_with_a_fast_solver_equals_scipy(backend):
    """OTFusion and weight matching give the same fused weights whichever exact solver (no ties here)."""
    model, spec = build("mlpnet", input_shape=(4, 4, 1), num_classes=5, widths=(20, 10), bias=True)
    a, b = random_variables(model, (4, 4, 1), 0), random_variables(model, (4, 4, 1), 1)
    host, _ = otf.fuse([a, b], spec, otf.FusionConfig(exact_backend="host"))
    fast, _ = otf.fuse([a, b], spec, otf.FusionConfig(exact_backend=backend))
    assert max_abs_diff(fast, host) == 0.0
    wm_host, _ = otf.fuse([a, b], spec, otf.WeightMatching(restarts=3, backend="host"))
    wm_fast, _ = otf.fuse([a, b], spec, otf.WeightMatching(restarts=3, backend=backend))
    assert max_abs_diff(wm_fast, wm_host) == 0.0


_CACHED_RUN = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    from otfusion_jax import cli, ot
    cli.enable_compilation_cache(sys.argv[1])
    before = cli.CompileLog.snapshot()
    cost = jnp.asarray(jax.random.normal(jax.random.key(0), (12, 12)))
    perm = jax.jit(lambda c: ot.assignment(c * 2.0 + 1.0, sys.argv[2])[1])(cost)
    print(json.dumps({"perm": [int(p) for p in perm], **cli.CompileLog.since(before)}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["native", "host"])
def test_a_second_process_loads_native_programs_from_the_cache(tmp_path, backend):
    """The point of the FFI solver: a new process compiles nothing. The host callback (control) compiles again."""

    def run():
        out = subprocess.run(
            [sys.executable, "-c", _CACHED_RUN, str(tmp_path / "cache"), backend],
            capture_output=True, text=True, check=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["perm"] == second["perm"]
    assert first["written"] >= 1
    if backend == "native":
        assert second["loaded"] == second["programs"] >= 1
    else:
        assert second["loaded"] < second["programs"]


_BUILD = "from otfusion_jax import native; print(native.available()); print(native.build_error()); print(native.library_path())"


def _probe(env):
    out = subprocess.run([sys.executable, "-c", _BUILD], capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    return out.stdout.splitlines()


def test_native_build_without_a_compiler_says_why(tmp_path):
    ok, why, _ = _probe({native.NATIVE_ENV: str(tmp_path), "CXX": "no-such-compiler-xyz"})
    assert ok == "False" and "$CXX='no-such-compiler-xyz' is not an executable" in why


@pytest.mark.slow
def test_native_builds_fresh_readable_and_rebuilds_a_bad_file(tmp_path):
    """A fresh cache folder gets a library others can read; a corrupt cached file is rebuilt, not fatal."""
    ok, why, path = _probe({native.NATIVE_ENV: str(tmp_path)})
    assert ok == "True" and why == "None" and os.path.dirname(path) == str(tmp_path)
    assert os.stat(path).st_mode & 0o044 == 0o044 & ~_umask()
    with open(path, "wb") as f:
        f.write(b"not a shared library")
    ok, why, again = _probe({native.NATIVE_ENV: str(tmp_path)})
    assert (ok, why, again) == ("True", "None", path)
    assert [n for n in os.listdir(tmp_path) if n.startswith("tmp")] == []  # no temporary files left behind


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_native_off_by_environment(tmp_path):
    code = "from otfusion_jax import native, ot; print(native.available(), ot.resolve_backend('auto')); print(native.build_error())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
        env={**os.environ, native.NATIVE_ENV: "off", "JAX_PLATFORMS": "cpu"},
    ).stdout.splitlines()
    assert out[0] == "False " + ("lapjv" if ot.has_lapjv() else "host")
    assert "turned off" in out[1] and native.NATIVE_ENV in out[1]
