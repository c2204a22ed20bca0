"""Git Re-Basin weight matching: exact recovery, monotone descent, no retracing, refinement, soft plans."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import otfusion_jax as otf
from otfusion_jax import matching
from otfusion_jax import spec as spec_lib
from otfusion_jax.models import build, init

from fusion_helpers import max_abs_diff, permuted_copy

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SHAPE = (4, 4, 1)
WIDTHS = (24, 16, 12)


def _mlp(widths, bias, seed=0, classes=5):
    model, spec = build("mlpnet", input_shape=SHAPE, num_classes=classes, widths=widths, bias=bias)
    return model, spec, init(model, jax.random.key(seed), SHAPE)


def _pair(seed):
    model, spec, a = _mlp(WIDTHS, True, seed=2 * seed)
    _, _, b = _mlp(WIDTHS, True, seed=2 * seed + 1)
    return model, spec, a, b


@pytest.mark.slow
@settings(max_examples=5, deadline=None)
@given(
    widths=st.lists(st.integers(2, 16), min_size=1, max_size=3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_permuted_mlp_copy_is_recovered_exactly(widths, bias, seed):
    """Random widths; the host solver (cheap to compile: every example has new shapes).

    The device Hungarian does the same on fixed shapes below and on the conv nets.
    """
    model, spec = build("mlpnet", input_shape=SHAPE, num_classes=5, widths=tuple(widths), bias=bias)
    v = _random_variables(model, SHAPE, seed)
    vp = permuted_copy(v, spec, seed + 1)
    fused, aux = otf.fuse([vp, v], spec, matching.WeightMatching(start="greedy", restarts=1, backend="host"), key=seed)
    assert _np_max_abs_diff(fused, v) == 0.0
    assert bool(aux.stats[0].converged) and int(aux.stats[0].n_sweeps) == 1  # the greedy start is exact
    assert aux.stats[1] is None and aux.plans[1] is None and set(aux.stats[0].perms) == set(spec.plans)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,shape,opts",
    [
        ("vgg11", (32, 32, 3), dict(width=0.125, bias=True, norm=True)),
        ("resnet18", (16, 16, 3), dict(width=0.125, bias=True, norm=True)),
    ],
)
def test_permuted_convnet_copy_is_recovered_exactly(name, shape, opts):
    """Flatten views, BatchNorm leaves and residual streams (many members per plan).

    Random variables of the model's shapes (``jax.eval_shape``: no forward pass
    to compile); running variances positive.
    """
    model, spec = build(name, input_shape=shape, **opts)
    v = _random_variables(model, shape)
    vp = permuted_copy(v, spec, seed=3)
    fused, aux = otf.fuse([vp, v], spec, matching.WeightMatching(start="greedy", restarts=1, backend="device"))
    assert _np_max_abs_diff(fused, v) == 0.0
    assert all(bool(i.converged) for i in aux.stats if i is not None)


def _random_variables(model, shape, seed=0):
    """NumPy-drawn variables of the model's shapes: nothing to compile per leaf."""
    shapes = spec_lib.flatten_paths(jax.eval_shape(lambda: init(model, jax.random.key(0), shape)))
    rng = np.random.default_rng(seed)
    flat = {}
    for path, sd in sorted(shapes.items()):
        x = rng.standard_normal(sd.shape).astype(np.float32)
        flat[path] = jnp.asarray(0.5 + np.abs(x) if path.endswith("/var") else x)
    return spec_lib.unflatten_paths(flat)


def _np_max_abs_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )


@pytest.mark.slow
@pytest.mark.parametrize("start", ["greedy", "identity"])
def test_objective_never_decreases(start):
    """Different random parents: a real descent over several sweeps."""
    _, spec, _, _ = _pair(0)
    identity = {name: jnp.arange(n) for name, n in zip(spec.plans, (*WIDTHS, 5))}
    for seed in range(3):
        _, _, a, b = _pair(seed)
        perms, info = matching.weight_matching(a, b, spec, seed=seed, start=start, restarts=1)
        obj = np.asarray(info.objective)
        n = int(info.n_sweeps)
        assert 1 <= n <= 20
        assert np.all(np.diff(obj) >= -1e-6 * np.abs(obj[:-1])), obj
        assert obj[n] > float(matching.matching_objective(a, b, spec, identity))
        np.testing.assert_allclose(obj[n], matching.matching_objective(a, b, spec, perms), rtol=1e-5)
        np.testing.assert_array_equal(perms["fc4"], np.arange(5))  # output plan kept


def test_greedy_start_alone_recovers_apermuted_copy():
    """Objective entry 0 (after the greedy start, before any sweep) is already the optimum J(a, a)."""
    _, spec, a, _ = _pair(4)
    ap = permuted_copy(a, spec, 9)
    perms, info = matching.weight_matching(ap, a, spec, start="greedy", restarts=1)
    identity = {name: jnp.arange(n) for name, n in zip(spec.plans, (*WIDTHS, 5))}
    np.testing.assert_allclose(info.objective[0], matching.matching_objective(a, a, spec, identity), rtol=1e-6)
    assert int(info.n_sweeps) == 1 and bool(info.converged)
    assert max_abs_diff(otf.apply_plans(ap, spec, perms), a) == 0.0


@pytest.mark.slow
def test_no_retrace_for_same_shapes():
    _, spec, a, b = _pair(0)
    matching.weight_matching(a, b, spec, seed=0)
    before = matching._match_jit._cache_size()
    for seed in (1, 2):
        _, _, a2, b2 = _pair(seed)
        init_plans = {"fc1": jnp.asarray(np.random.default_rng(seed).permutation(WIDTHS[0]))}
        matching.weight_matching(a2, b2, spec, seed=seed + 10, init_plans=init_plans)
    assert matching._match_jit._cache_size() == before


@pytest.mark.slow
def test_refinement_of_otfusion_plans_does_not_lose():
    for seed in range(3):
        _, spec, a, b = _pair(seed)
        _, aux = otf.fuse([a, b], spec, otf.FusionConfig(mode="weights", solver="exact", align_output=False))
        plans = aux.plans[0]
        perms = otf.plans_to_perms(plans)
        assert max_abs_diff(otf.apply_plans(a, spec, perms), otf.apply_plans(a, spec, plans)) == 0.0
        j_otf = float(matching.matching_objective(a, b, spec, perms))
        refined, info = matching.weight_matching(a, b, spec, init_plans=plans, seed=seed)
        np.testing.assert_allclose(info.objective[0], j_otf, rtol=1e-6)
        assert float(info.objective[int(info.n_sweeps)]) >= j_otf * (1 - 1e-6)


def test_perms_to_plans_matches_apply_plans_bitwise():
    """A permutation applied as a gather and as its matrix (a matmul) give the same bits."""
    _, spec, a, b = _pair(1)
    perms, info = matching.weight_matching(a, b, spec)
    plans = otf.perms_to_plans(perms)
    for name in spec.plans:
        np.testing.assert_array_equal(info.plans[name], plans[name])
        np.testing.assert_array_equal(info.perms[name], perms[name])
        np.testing.assert_allclose(plans[name].sum(0), 1.0)
    assert max_abs_diff(otf.apply_plans(a, spec, plans), otf.apply_plans(a, spec, perms)) == 0.0


@pytest.mark.slow
def test_device_and_host_solvers_agree():
    for seed in range(2):
        _, spec, a, b = _pair(seed)
        dev, info_d = matching.weight_matching(a, b, spec, seed=seed, backend="device", restarts=1)
        host, info_h = matching.weight_matching(a, b, spec, seed=seed, backend="host", restarts=1)
        for name in spec.plans:
            np.testing.assert_array_equal(dev[name], host[name])
        np.testing.assert_allclose(info_d.objective, info_h.objective, rtol=1e-6)


@pytest.mark.slow
def test_soft_variant_runs_and_is_finite():
    model, spec, a, b = _pair(2)
    fused, aux = otf.fuse([a, b], spec, matching.WeightMatching(soft=True, restarts=1), params={"epsilon": 0.5})
    info = aux.stats[0]
    perms = info.perms
    for name in spec.plans:
        np.testing.assert_allclose(aux.plans[0][name], info.plans[name])  # the soft plans are what was applied
    assert int(info.n_sweeps) >= 1
    blurred = False
    for name in spec.plans:
        t = np.asarray(info.plans[name])
        assert np.all(np.isfinite(t))
        if name != spec.output_plan:
            np.testing.assert_allclose(t.sum(0), 1.0, atol=1e-2)  # columns: barycentres
            np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-2)  # doubly stochastic (x n)
            blurred |= bool(t.max() < 0.99)
        assert sorted(np.asarray(perms[name]).tolist()) == list(range(t.shape[0]))
    assert blurred  # epsilon 0.5 gives genuinely soft plans
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(fused))
    expect = jax.tree_util.tree_map(lambda x, y: 0.5 * (x + y), otf.apply_plans(a, spec, info.plans), b)
    assert max_abs_diff(fused, expect) < 1e-5


def test_soft_with_small_epsilon_recovers_apermuted_copy():
    """Same compilation as above (epsilon is traced through ``params``)."""
    _, spec, a, _ = _pair(3)
    ap = permuted_copy(a, spec, 5)
    fused, aux = otf.fuse([ap, a], spec, matching.WeightMatching(soft=True, restarts=1), params={"epsilon": 0.01})
    hard, _ = matching.weight_matching(ap, a, spec, start="greedy", restarts=1)
    for name in spec.plans:
        np.testing.assert_array_equal(aux.stats[0].perms[name], hard[name])
    assert max_abs_diff(fused, a) < 1e-4


def test_unequal_widths_are_refused_naming_the_plan():
    model, spec = build("mlpnet", input_shape=SHAPE, num_classes=5, widths=(8, 6), bias=True)
    a = _random_variables(model, SHAPE)
    b = _random_variables(build("mlpnet", input_shape=SHAPE, num_classes=5, widths=(8, 7), bias=True)[0], SHAPE)
    with pytest.raises(otf.FusionError, match="'fc2'"):
        matching.weight_matching(a, b, spec)
    with pytest.raises(otf.FusionError, match="'fc2'"):
        otf.fuse([a, b], spec, matching.WeightMatching())


# ----------------------------------------------------------------------------- Git Re-Basin's own loop, restarts


def _plain(v):
    """Flax variables -> the reference's flat dict without the "params/" prefix."""
    return {k.removeprefix("params/"): np.asarray(x) for k, x in spec_lib.flatten_paths(v).items()}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_identity_start_matches_the_git_rebasin_reference(seed):
    """Same start (identity) and same sweep orders: the same permutations and iterations as Git Re-Basin's loop.

    The reference (tests/reference_rebasin.py) transcribes samuela/git-re-basin's
    ``weight_matching`` in NumPy + scipy; it is fed the sweep orders our descent
    draws (``permutation(fold_in(key, sweep))``). ``tol=0`` accepts any strict
    improvement, as the reference does.
    """
    import reference_rebasin as ref  # pylint: disable=import-outside-toplevel

    _, spec, a, b = _pair(seed)
    wm = matching.WeightMatching(start="identity", restarts=1, tol=0.0, backend="host")
    perms, info = matching.weight_matching(b, a, spec, wm, seed=seed)
    key = jax.random.key(jnp.asarray(seed, jnp.uint32))
    hidden = [p for p in spec.plans if p != spec.output_plan]
    orders = [np.asarray(jax.random.permutation(jax.random.fold_in(key, i), len(hidden))) for i in range(wm.max_sweeps)]
    want, iterations = ref.weight_matching(_plain(a), _plain(b), ref.mlp_perm_to_axes(len(hidden), bias=True), orders)
    assert int(info.n_sweeps) == iterations and iterations >= 2  # a real descent, not the start alone
    for k, name in enumerate(hidden):
        np.testing.assert_array_equal(np.asarray(perms[name]), want[f"P{k + 1}"], err_msg=name)
    np.testing.assert_array_equal(np.asarray(perms[spec.output_plan]), np.arange(5))
    perm_to_axes = ref.mlp_perm_to_axes(len(hidden), bias=True)
    np.testing.assert_allclose(
        float(info.objective[-1]), ref.objective(_plain(a), _plain(b), perm_to_axes, want), rtol=1e-5
    )


@pytest.mark.slow
def test_restarts_keep_the_best_and_equal_single_runs():
    """R restarts under vmap: each equals the single run with its key, and the best objective wins."""
    _, spec, a, b = _pair(5)
    key = jax.random.key(3)
    batched, info = matching.weight_matching(a, b, spec, matching.WeightMatching(restarts=4), seed=key)
    singles = []
    for r in range(4):
        k = key if r == 0 else jax.random.fold_in(key, r)
        perms_r, info_r = matching.weight_matching(a, b, spec, matching.WeightMatching(restarts=1), seed=k)
        singles.append((float(info_r.objective[-1]), perms_r))
    np.testing.assert_allclose(np.asarray(info.restart_objectives), [o for o, _ in singles], rtol=1e-6)
    best = int(np.argmax([o for o, _ in singles]))
    assert float(info.objective[-1]) >= max(o for o, _ in singles) * (1 - 1e-6)
    for name in spec.plans:
        np.testing.assert_array_equal(np.asarray(batched[name]), np.asarray(singles[best][1][name]))
    assert len({round(o, 3) for o, _ in singles}) > 1  # the sweep orders matter on this pair


def test_restart_perms_are_every_restart():
    _, spec, a, b = _pair(5)
    perms, info = matching.weight_matching(a, b, spec, matching.WeightMatching(restarts=3), seed=1)
    best = int(np.argmax(np.asarray(info.restart_objectives)))
    for name in spec.plans:
        assert info.restart_perms[name].shape == (3, perms[name].shape[0])
        np.testing.assert_array_equal(info.restart_perms[name][best], perms[name])
        for r in range(3):
            assert sorted(np.asarray(info.restart_perms[name][r]).tolist()) == list(range(perms[name].shape[0]))
