"""The auction assignment solver (``exact_assignment_auction``) against scipy, and as a fusion backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import otfusion_jax as otf
from otfusion_jax import matching, ot
from otfusion_jax.models import build

from fusion_helpers import init_jit, max_abs_diff, permuted_copy, random_variables

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_auction = jax.jit(ot.exact_assignment_auction, static_argnames=("bidders", "theta", "slack", "max_rounds"))


def _optimum(cost: np.ndarray) -> float:
    rows, cols = linear_sum_assignment(cost.astype(np.float64))
    return float(cost.astype(np.float64)[rows, cols].sum())


def _total(cost: np.ndarray, perm) -> float:
    perm = np.asarray(perm)
    assert sorted(perm.tolist()) == list(range(cost.shape[0])), "not a permutation"
    return float(cost.astype(np.float64)[perm, np.arange(cost.shape[0])].sum())


# Sizes from a fixed set: the solver is compiled once per (n, bidders), so 40 examples pay for at
# most 5 x 4 compiles instead of one each. 1 and 2: the edge cases; 5 < 64 bidders; 40: the largest.
AUCTION_SIZES = (1, 2, 5, 16, 40)


@settings(max_examples=40, deadline=None)
@given(
    n=st.sampled_from(AUCTION_SIZES),
    top=st.integers(0, 60),
    bidders=st.sampled_from([None, 1, 3, 64]),
    seed=st.integers(0, 2**16),
)
def test_integer_costs_reach_scipys_optimum(n, top, bidders, seed):
    """Small integer costs (many ties) are solved exactly: the rounding to the auction's grid is lossless."""
    cost = np.random.default_rng(seed).integers(0, top + 1, (n, n)).astype(np.float32)
    plan, perm, info = _auction(jnp.asarray(cost), bidders=bidders)
    assert bool(info.converged)
    assert _total(cost, perm) == _optimum(cost)
    np.testing.assert_array_equal(np.asarray(plan), _plan(perm, n))
    np.testing.assert_allclose(float(info.cost), _optimum(cost) / n, rtol=1e-6, atol=1e-6)


def _plan(perm, n):
    p = np.zeros((n, n), np.float32)
    p[np.asarray(perm), np.arange(n)] = 1.0 / n
    return p


@pytest.mark.parametrize("n,d", [(50, 30), (200, 784), (300, 64)])
def test_float_costs_match_scipy(n, d):
    """Euclidean costs between random points (near-ties everywhere): the optimum, within the stated bound."""
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)
    cost = np.asarray(ot.pairwise_cost(jnp.asarray(x), jnp.asarray(y)))
    _, perm, info = _auction(jnp.asarray(cost))
    bound = n * float(cost.max() - cost.min()) / (ot.AUCTION_LEVELS // (n + 1))
    gap = _total(cost, perm) - _optimum(cost)
    assert -1e-3 <= gap <= bound + 1e-3
    if jax.default_backend() == "cpu":  # in practice scipy's very assignment (another backend's costs may near-tie)
        rows, cols = linear_sum_assignment(cost)
        np.testing.assert_array_equal(np.asarray(perm), rows[np.argsort(cols)])
    assert 0 < int(info.n_iters) < 100_000


@pytest.mark.slow
def test_vmap_equals_one_by_one_and_bidders_do_not_change_the_answer():
    costs = jax.random.uniform(jax.random.key(0), (6, 40, 40))
    batched = jax.vmap(lambda c: ot.exact_assignment_auction(c)[1])(costs)
    for bidders in (1, 7, 40):
        single = [_auction(c, bidders=bidders)[1] for c in costs]
        np.testing.assert_array_equal(np.asarray(batched), np.stack(single))
    for c, p in zip(np.asarray(costs), np.asarray(batched)):
        assert abs(_total(c, p) - _optimum(c)) < 1e-4


def test_lockstep_vmap_of_accelerators_gives_the_same_plans(monkeypatch):
    """Off the CPU a batch runs in lockstep instead of ``lax.map``: same answers (checked here by faking the backend)."""
    costs = jax.random.uniform(jax.random.key(3), (4, 24, 24))
    on_cpu = jax.jit(jax.vmap(lambda c: ot.exact_assignment_auction(c, bidders=24)[1]))(costs)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    lockstep = jax.jit(jax.vmap(lambda c: ot.exact_assignment_auction(c, bidders=24, theta=9)[1]))(costs)
    np.testing.assert_array_equal(np.asarray(lockstep), np.asarray(on_cpu))
    jaxpr = str(jax.make_jaxpr(jax.vmap(lambda c: ot.exact_assignment_auction(c, theta=9)[1]))(costs))
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    cpu_jaxpr = str(jax.make_jaxpr(jax.vmap(lambda c: ot.exact_assignment_auction(c, theta=9)[1]))(costs))
    assert cpu_jaxpr.count("scan[") == jaxpr.count("scan[") + 1  # the lax.map, on the CPU only


@pytest.mark.slow
@pytest.mark.parametrize("n", [256, 400])
def test_tied_neurons_are_slow_but_optimal(n):
    """Dead ReLUs: 30 identical neurons in each model (regression: a slack > 0 ran out of rounds here)."""
    rng = np.random.default_rng(n)

    def acts():
        a = np.maximum(rng.normal(size=(200, n)) + rng.normal(size=(1, n)), 0).astype(np.float32)
        a[:, :30] = 0.0
        return jnp.asarray(a)

    cost = np.asarray(ot.pairwise_cost(acts().T, acts().T))
    _, perm, info = _auction(jnp.asarray(cost))
    assert bool(info.converged)
    assert _total(cost, perm) - _optimum(cost) <= 1e-3


def test_tiny_cost_ranges_are_not_overflowed():
    """levels / span would overflow float32 for a span of 1e-32; the optimum must still come out."""
    cost = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0]], np.float32) * np.float32(1e-32)
    _, perm, info = _auction(jnp.asarray(cost))
    np.testing.assert_array_equal(np.asarray(perm), [1, 0, 2])
    assert bool(info.converged)


def test_warn_unconverged_names_the_auction():
    info = ot.PlanInfo(jnp.array(0.1), jnp.array(False), jnp.array(123, jnp.int32), jnp.array(0.0))
    aux = otf.FusionAux(plans=[{"fc1": None}, None], info=[{"fc1": info}, None], weights=jnp.ones(2) / 2)
    with pytest.warns(RuntimeWarning, match=r"auction ran out of rounds for parent 0, layer 'fc1' after 123"):
        messages = otf.warn_unconverged(aux, config=otf.FusionConfig(exact_backend="auction"))
    assert len(messages) == 1


def test_out_of_rounds_still_gives_a_permutation_and_says_so():
    cost = jax.random.uniform(jax.random.key(1), (30, 30))
    plan, perm, info = _auction(cost, max_rounds=3)
    assert not bool(info.converged) and int(info.n_iters) == 3
    _total(np.asarray(cost), perm)
    np.testing.assert_allclose(np.asarray(plan).sum(0), 1 / 30, rtol=1e-6)


def test_constant_and_non_square_costs():
    _, perm, info = ot.exact_assignment_auction(jnp.ones((5, 5)))
    assert bool(info.converged) and sorted(np.asarray(perm).tolist()) == list(range(5))
    with pytest.raises(ValueError, match=r"non-empty square cost, got shape \(4, 5\)"):
        ot.exact_assignment_auction(jnp.ones((4, 5)))
    with pytest.raises(ValueError, match="bidders >= 1"):
        ot.exact_assignment_auction(jnp.ones((4, 4)), bidders=0)


@pytest.mark.slow
def test_gradient_is_stopped_not_nan():
    g = jax.grad(lambda c: ot.exact_assignment_auction(c)[2].cost)(jax.random.uniform(jax.random.key(2), (8, 8)))
    assert np.isfinite(np.asarray(g)).all()


@pytest.mark.slow
@settings(max_examples=4, deadline=None)
@given(widths=st.lists(st.integers(2, 24), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_auction_backend_recovers_a_permuted_copy(widths, seed):
    model, spec = build("mlpnet", input_shape=(4, 4, 1), num_classes=5, widths=tuple(widths), bias=True)
    v = random_variables(model, (4, 4, 1), seed)  # NumPy-drawn: nothing but the fusion to compile per example
    vp = permuted_copy(v, spec, seed + 1)
    fused, aux = otf.fuse([vp, v], spec, otf.FusionConfig(exact_backend="auction"))
    assert max_abs_diff(fused, v) == 0.0
    assert all(bool(i.converged) for i in aux.info[0].values())


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,shape,opts",
    [
        ("mlpnet", (6, 6, 1), dict(widths=(40, 20), bias=True)),
        ("vgg11", (32, 32, 3), dict(width=0.125, bias=True, norm=True)),
    ],
)
def test_auction_backend_fuses_like_scipy(name, shape, opts):
    """Two different random parents (NumPy-drawn; flax's eager init of VGG11 alone took 7 s)."""
    model, spec = build(name, input_shape=shape, num_classes=10, **opts)
    a, b = (random_variables(model, shape, s) for s in (0, 1))
    auction, _ = otf.fuse([a, b], spec, otf.FusionConfig(exact_backend="auction"))
    host, _ = otf.fuse([a, b], spec, otf.FusionConfig(exact_backend="host"))
    assert max_abs_diff(auction, host) < 1e-6


def test_config_rejects_bad_bidders():
    for bad in (0, True, 2.5, "8"):
        with pytest.raises(otf.FusionError, match="auction_bidders"):
            otf.FusionConfig(exact_backend="auction", auction_bidders=bad)
    assert otf.FusionConfig(exact_backend="auction", auction_bidders=np.int64(4)).auction_bidders == 4


@pytest.mark.slow
def test_weight_matching_with_the_auction():
    model, spec = build("mlpnet", input_shape=(6, 6, 1), num_classes=10, widths=(24, 12), bias=True)
    a, b = (init_jit(model, jax.random.key(s), (6, 6, 1)) for s in (3, 4))
    host, info_h = matching.weight_matching(a, b, spec, seed=0, backend="host")
    auc, info_a = matching.weight_matching(a, b, spec, seed=0, backend="auction")
    for name in spec.plans:
        np.testing.assert_array_equal(host[name], auc[name])
    np.testing.assert_allclose(info_a.objective, info_h.objective, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["device", "auction"])
def test_vmap_of_grad_through_the_batched_exact_solvers(backend):
    """The solvers' custom vmap rule (lax.map on a CPU) must not break vmap(grad(fuse)): the plan is constant."""
    model, spec = build("mlpnet", input_shape=(4, 4, 1), num_classes=5, widths=(8,), bias=True)
    vs = [init_jit(model, jax.random.key(i), (4, 4, 1)) for i in range(4)]
    stack = lambda trees: jax.tree_util.tree_map(lambda *x: jnp.stack(x), *trees)
    pa, pb = stack(vs[:2]), stack(vs[2:])
    x = jnp.ones((3, 4, 4, 1))
    cfg = otf.FusionConfig(exact_backend=backend)

    def loss(w, a, b):
        fused, _ = otf.fuse([a, b], spec, cfg, weights=w)
        return jnp.sum(model.apply(fused, x) ** 2)

    w = jnp.array([0.5, 0.5])
    per_pair = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(w, pa, pb)
    total = jax.grad(lambda w: jnp.sum(jax.vmap(loss, in_axes=(None, 0, 0))(w, pa, pb)))(w)
    one = [jax.grad(loss)(w, vs[i], vs[2 + i]) for i in range(2)]
    np.testing.assert_allclose(np.asarray(per_pair), np.stack(one), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(per_pair).sum(0), np.asarray(total), rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(per_pair))) and np.any(np.asarray(per_pair) != 0)
