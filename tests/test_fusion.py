"""The OT fusion engine: exact recovery, solvers, vmap/jit, gradients, K parents, widths, bad input."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import otfusion_jax as otf
from otfusion_jax import engine
from otfusion_jax.models import build, capture_activations, recompute_batch_stats
from otfusion_jax.plans import as_matrix

from fusion_helpers import apply_jit, init_jit, max_abs_diff, permuted_copy, random_variables

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _mlp(widths, bias, seed=0, shape=(4, 4, 1), classes=5):
    model, spec = build("mlpnet", input_shape=shape, num_classes=classes, widths=widths, bias=bias)
    return model, spec, init_jit(model, jax.random.key(seed), shape)


def _fuse_pair(model, spec, a, b, config, x=None):
    acts = None
    if config.mode == "activations":
        acts = [capture_activations(model, v, x) for v in (a, b)]
    return otf.fuse([a, b], spec, config, activations=acts)


@settings(max_examples=12, deadline=None)
@given(
    widths=st.lists(st.integers(2, 24), min_size=1, max_size=3),
    bias=st.booleans(),
    mode=st.sampled_from(["weights", "activations"]),
    seed=st.integers(0, 2**16),
)
def test_permuted_mlp_copy_is_recovered_exactly(widths, bias, mode, seed):
    """Fusing a model with a randomly permuted copy of itself gives the model back.

    NumPy-drawn variables (biases nonzero too); every example has new shapes, so nothing but the
    forward pass and the fusion is compiled.
    """
    model, spec = build("mlpnet", input_shape=(4, 4, 1), num_classes=5, widths=tuple(widths), bias=bias)
    v = random_variables(model, (4, 4, 1), seed)
    vp = permuted_copy(v, spec, seed + 1)
    x = jax.random.normal(jax.random.key(seed), (16, 4, 4, 1))
    np.testing.assert_allclose(apply_jit(model, vp, x), apply_jit(model, v, x), atol=1e-5)
    fused, aux = _fuse_pair(model, spec, vp, v, otf.FusionConfig(mode=mode), x)
    assert max_abs_diff(fused, v) == 0.0
    assert set(aux.plans[0]) == set(spec.plans) and aux.plans[1] is None


_recompute_batch_stats = jax.jit(recompute_batch_stats, static_argnums=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["weights", "activations"])
@pytest.mark.parametrize(
    "name,shape,opts",
    [
        ("vgg11", (32, 32, 3), dict(width=0.125, bias=True, norm=True)),
        ("resnet18", (16, 16, 3), dict(width=0.125, bias=True, norm=True)),
        ("resnet18", (16, 16, 3), dict(width=0.125, bias=False, norm=False)),
    ],
)
def test_permuted_convnet_copy_is_recovered_exactly(name, shape, opts, mode):
    """Same for VGG11 and ResNet18 (BatchNorm statistics, biases and residual streams included).

    NumPy-drawn variables (flax's init of a ResNet compiles for seconds), then the BatchNorm
    statistics of the samples.
    """
    model, spec = build(name, input_shape=shape, **opts)
    x = jax.random.normal(jax.random.key(1), (24, *shape))
    v = _recompute_batch_stats(model, random_variables(model, shape), x)
    vp = permuted_copy(v, spec, seed=3)
    np.testing.assert_allclose(apply_jit(model, vp, x), apply_jit(model, v, x), atol=1e-4)
    fused, _ = _fuse_pair(model, spec, vp, v, otf.FusionConfig(mode=mode), x)
    assert max_abs_diff(fused, v) == 0.0


def test_three_permuted_copies_fuse_to_the_model():
    model, spec, v = _mlp((12, 8), bias=True)
    parents = [permuted_copy(v, spec, s) for s in (1, 2)] + [v]
    fused, aux = otf.fuse(parents, spec, otf.FusionConfig())
    assert max_abs_diff(fused, v) < 1e-6
    np.testing.assert_allclose(aux.weights, np.full(3, 1 / 3), rtol=1e-6)


def test_ensemble_step_and_weights():
    model, spec, a = _mlp((10,), bias=False, seed=0)
    _, _, b = _mlp((10,), bias=False, seed=1)
    (aligned, _), _ = otf.align_parents([a, b], spec, otf.FusionConfig())
    for s in (0.0, 0.3, 1.0):
        fused, _ = otf.fuse([a, b], spec, otf.FusionConfig(), weights=otf.ensemble_weights(s))
        expect = jax.tree_util.tree_map(lambda x, y: (1 - s) * x + s * y, aligned, b)
        assert max_abs_diff(fused, expect) < 1e-6
    fused_w, aux = otf.fuse([a, b], spec, otf.FusionConfig(), weights=jnp.array([1.0, 3.0]))
    expect = jax.tree_util.tree_map(lambda x, y: 0.25 * x + 0.75 * y, aligned, b)
    assert max_abs_diff(fused_w, expect) < 1e-6


def _noisy_permuted_pair(widths, seed=0, noise=0.05):
    """A and a permuted copy of A plus noise: an OT problem with a clear optimum."""
    model, spec, a = _mlp(widths, bias=False, seed=seed)
    b = permuted_copy(a, spec, seed + 1)
    leaves, tree = jax.tree_util.tree_flatten(b)
    keys = jax.random.split(jax.random.key(seed + 2), len(leaves))
    b = jax.tree_util.tree_unflatten(tree, [x + noise * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return model, spec, a, b


@pytest.mark.slow
def test_small_epsilon_sinkhorn_agrees_with_exact():
    model, spec, a, b = _noisy_permuted_pair((16, 12))
    exact, aux_e = otf.fuse([a, b], spec, otf.FusionConfig(normalize_cost="max"))
    sk, aux_s = otf.fuse(
        [a, b], spec, otf.FusionConfig(solver="sinkhorn", normalize_cost="max", epsilon=2e-3, sinkhorn_threshold=1e-4)
    )
    assert set(aux_s.info[0]) == set(spec.plans) - {spec.output_plan}  # the class layer keeps its order
    for name in aux_s.info[0]:
        assert bool(aux_s.info[0][name].converged), name
        np.testing.assert_allclose(aux_s.plans[0][name], aux_e.plans[0][name], atol=0.02)
    assert max_abs_diff(sk, exact) < 0.01


def test_large_epsilon_sinkhorn_blurs_the_plan():
    """The comparison above can fail: a large epsilon gives a diffuse plan far from the permutation."""
    model, spec, a, b = _noisy_permuted_pair((16,))
    _, aux = otf.fuse([a, b], spec, otf.FusionConfig(solver="sinkhorn", relative_epsilon="mean", epsilon=10.0))
    assert float(jnp.max(aux.plans[0]["fc1"])) < 0.5


def test_exact_backends_agree():
    model, spec, a = _mlp((20, 10), bias=True, seed=0)
    _, _, b = _mlp((20, 10), bias=True, seed=1)
    dev, _ = otf.fuse([a, b], spec, otf.FusionConfig(exact_backend="device"))
    host, _ = otf.fuse([a, b], spec, otf.FusionConfig(exact_backend="host"))
    assert max_abs_diff(dev, host) < 1e-6


def test_exact_transport_without_pot_uses_scipy(monkeypatch):
    """The host LP fallback (no POT installed) gives the same plan as POT's network simplex."""
    import builtins

    rng = np.random.default_rng(0)
    cost = rng.random((7, 5)).astype(np.float32)
    a, b = np.full(7, 1 / 7, np.float32), rng.dirichlet(np.ones(5)).astype(np.float32)
    with_pot = np.asarray(otf.ot._emd_numpy(a, b, cost))
    real_import = builtins.__import__

    def no_pot(name, *args, **kw):
        if name == "ot":
            raise ImportError("no POT")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pot)
    without = np.asarray(otf.ot._emd_numpy(a, b, cost))
    np.testing.assert_allclose(without, with_pot, atol=1e-6)
    np.testing.assert_allclose(without.sum(1), a, atol=1e-6)
    np.testing.assert_allclose(without.sum(0), b, atol=1e-6)


def test_hungarian_plans_are_optimal_against_scipy():
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(0)
    for n in (3, 17, 64):
        cost = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)
        plan, perm, _ = jax.jit(otf.ot.exact_assignment)(cost)
        r, c = linear_sum_assignment(np.asarray(cost))
        assert np.isclose(float(jnp.sum(plan * cost)) * n, np.asarray(cost)[r, c].sum(), rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(perm), r[np.argsort(c)])


def test_different_widths_fuse_into_target_widths():
    model_a, spec, a = _mlp((24, 16), bias=True, seed=0)
    _, _, b = _mlp((12, 8), bias=True, seed=1)
    for cfg in (otf.FusionConfig(proper_marginals=True), otf.FusionConfig(solver="sinkhorn", proper_marginals=True)):
        fused, aux = otf.fuse([a, b], spec, cfg)
        assert jax.tree_util.tree_map(jnp.shape, fused) == jax.tree_util.tree_map(jnp.shape, b)
        assert aux.plans[0]["fc1"].shape == (24, 12)
        # every target neuron is a barycentre of the source neurons
        np.testing.assert_allclose(aux.plans[0]["fc1"].sum(0), 1.0, atol=1e-3)


@pytest.mark.slow
def test_vmap_over_pairs_equals_loop():
    model, spec, _ = _mlp((10, 6), bias=True)
    pairs = [(init_jit(model, jax.random.key(2 * i), (4, 4, 1)), init_jit(model, jax.random.key(2 * i + 1), (4, 4, 1))) for i in range(3)]
    stack = lambda trees: jax.tree_util.tree_map(lambda *x: jnp.stack(x), *trees)  # noqa: E731
    for cfg in (otf.FusionConfig(), otf.FusionConfig(solver="sinkhorn", relative_epsilon="mean", epsilon=0.05)):
        batched = jax.vmap(lambda a, b: otf.fuse([a, b], spec, cfg)[0])(stack([p[0] for p in pairs]), stack([p[1] for p in pairs]))
        looped = stack([otf.fuse([a, b], spec, cfg)[0] for a, b in pairs])
        assert max_abs_diff(batched, looped) < 1e-5


def test_jitted_pass_does_not_retrace_for_same_shapes():
    model, spec, a = _mlp((9, 7), bias=False, seed=0)
    _, _, b = _mlp((9, 7), bias=False, seed=1)
    _, _, c = _mlp((9, 7), bias=False, seed=2)
    cfg = otf.FusionConfig(normalize_cost="mean")
    otf.fuse([a, b], spec, cfg)
    before = engine._fuse_jit._cache_size()
    otf.fuse([c, b], spec, cfg)
    otf.fuse([a, c], spec, cfg)
    assert engine._fuse_jit._cache_size() == before


@pytest.mark.slow
@pytest.mark.parametrize("implicit", [False, True])
def test_gradients_through_sinkhorn_are_finite(implicit):
    """d(loss of the fused model)/d(parent params, ensemble weights) through Sinkhorn, float32.

    Implicit differentiation is known to fail in float32 at small absolute
    epsilons (lineax: non-finite output); a relative epsilon of 0.05 of the mean
    cost works for both modes, and unrolling (the default) works throughout.
    """
    model, spec, a = _mlp((8, 6), bias=True, seed=0)
    _, _, b = _mlp((8, 6), bias=True, seed=1)
    x = jax.random.normal(jax.random.key(0), (32, 4, 4, 1))
    y = jnp.arange(32) % 5
    cfg = otf.FusionConfig(solver="sinkhorn", relative_epsilon="mean", epsilon=0.05, implicit_diff=implicit)

    def loss(parent_a, w):
        fused, _ = otf.fuse([parent_a, b], spec, cfg, weights=w)
        logits = model.apply(fused, x)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(32), y])

    ga, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, jnp.array([0.5, 0.5]))
    leaves = jax.tree_util.tree_leaves(ga)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
    assert bool(jnp.all(jnp.isfinite(gw))) and float(jnp.sum(jnp.abs(gw))) > 0


# ----------------------------------------------------------------------------- bad input


def test_different_architectures_are_rejected_with_the_leaf_named():
    _, spec, a = _mlp((8,), bias=False)
    _, _, b = _mlp((8,), bias=True)
    with pytest.raises(otf.FusionError, match=r"parent 1.*not in spec.*fc1/bias"):
        otf.fuse([a, b], spec)


def test_widths_that_do_not_fit_are_rejected():
    _, spec, a = _mlp((8,), bias=False, shape=(4, 4, 1))
    _, _, b = _mlp((8,), bias=False, shape=(5, 5, 1))
    with pytest.raises(otf.FusionError, match=r"params/fc1/kernel.*axis 0"):
        otf.fuse([a, b], spec)


def test_nan_parameters_are_rejected():
    _, spec, a = _mlp((8,), bias=False)
    b = jax.tree_util.tree_map(lambda x: x, a)
    b["params"]["fc2"]["kernel"] = b["params"]["fc2"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(otf.FusionError, match=r"parent 1: leaf params/fc2/kernel has 1 NaN/Inf"):
        otf.fuse([a, b], spec)


def test_missing_activations_are_rejected():
    model, spec, a = _mlp((8,), bias=False)
    with pytest.raises(otf.FusionError, match="needs one activation dict per parent"):
        otf.fuse([a, a], spec, otf.FusionConfig(mode="activations"))
    acts = capture_activations(model, a, jnp.ones((4, 4, 4, 1)))
    partial = {k: v for k, v in acts.items() if k != "fc1"}
    with pytest.raises(otf.FusionError, match="no activations for layer 'fc1'"):
        otf.fuse([a, a], spec, otf.FusionConfig(mode="activations"), activations=[partial, acts])
    fewer = capture_activations(model, a, jnp.ones((3, 4, 4, 1)))
    with pytest.raises(otf.FusionError, match=r"layer 'fc1': activations have 3 and 4 values per neuron"):
        otf.fuse([a, a], spec, otf.FusionConfig(mode="activations"), activations=[fewer, acts])
    channels_first = {**acts, "fc1": tuple(t.T for t in acts["fc1"])}  # (8, 4): neurons first
    with pytest.raises(otf.FusionError, match=r"layer 'fc1': target activations have shapes \[\(8, 4\)\].*8 neurons on the last"):
        otf.fuse([a, a], spec, otf.FusionConfig(mode="activations"), activations=[acts, channels_first])


# Jitted (metric and squared static): one XLA program per example and function, where eager calls
# compile every primitive again for each new shape.
_pairwise_cost = jax.jit(otf.ot.pairwise_cost, static_argnums=(2, 3))
_pairwise_cost_columns = jax.jit(otf.ot.pairwise_cost_columns, static_argnums=(2, 3))


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 9),
    m=st.integers(1, 9),
    lead=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=3),
    metric=st.sampled_from(["euclidean", "cosine"]),
    squared=st.booleans(),
    offset=st.sampled_from([0.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_cost_from_activation_tensors_equals_cost_from_rows(n, m, lead, metric, squared, offset, seed):
    """pairwise_cost_columns (no transposes) == pairwise_cost on each neuron's concatenated values."""
    rng = np.random.default_rng(seed)
    xs = [rng.normal(offset, 1.0, (*shape, n)).astype(np.float32) for shape in lead]
    ys = [rng.normal(offset, 1.0, (*shape, m)).astype(np.float32) for shape in lead]
    rows = lambda ts, k: np.concatenate([np.moveaxis(t, -1, 0).reshape(k, -1) for t in ts], axis=1)
    want = _pairwise_cost(jnp.asarray(rows(xs, n)), jnp.asarray(rows(ys, m)), metric, squared)
    got = _pairwise_cost_columns([jnp.asarray(x) for x in xs], [jnp.asarray(y) for y in ys], metric, squared)
    assert got.shape == (n, m)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5 * (1 + float(np.max(want))))
    # and both against float64 NumPy
    xr, yr = rows(xs, n).astype(np.float64), rows(ys, m).astype(np.float64)
    if metric == "euclidean":
        exact = ((xr[:, None] - yr[None]) ** 2).sum(-1)
        exact = exact if squared else np.sqrt(exact)
    else:
        norm = lambda r: r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
        exact = 1.0 - norm(xr) @ norm(yr).T
    np.testing.assert_allclose(np.asarray(got), exact, rtol=1e-4, atol=1e-3 * (1 + np.max(np.abs(exact))))


def test_bad_options_are_rejected():
    with pytest.raises(otf.FusionError, match="FusionConfig.solver"):
        otf.FusionConfig(solver="emd")
    with pytest.raises(otf.FusionError, match="epsilon"):
        otf.FusionConfig(epsilon=0)


def test_unconverged_sinkhorn_warns_naming_the_layer():
    _, spec, a = _mlp((8,), bias=False, seed=0)
    _, _, b = _mlp((8,), bias=False, seed=1)
    cfg = otf.FusionConfig(solver="sinkhorn", epsilon=1e-4, sinkhorn_max_iterations=20, sinkhorn_threshold=1e-9)
    _, aux = otf.fuse([a, b], spec, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        messages = otf.warn_unconverged(aux)
    assert messages and "layer 'fc1'" in messages[0]
    assert any("did not converge" in str(w.message) for w in caught)


def test_vanilla_average_is_the_plain_mean():
    _, spec, a = _mlp((8,), bias=True, seed=0)
    _, _, b = _mlp((8,), bias=True, seed=1)
    avg = otf.vanilla_average([a, b])
    assert max_abs_diff(avg, jax.tree_util.tree_map(lambda x, y: (x + y) / 2, a, b)) < 1e-7
    _, _, c = _mlp((9,), bias=True)
    with pytest.raises(otf.FusionError, match="identical shapes"):
        otf.vanilla_average([a, c])


@pytest.mark.slow
def test_unbalanced_sinkhorn_relaxes_the_marginals():
    model, spec, a, b = _noisy_permuted_pair((10,))
    base = dict(solver="sinkhorn", relative_epsilon="mean", epsilon=0.05, correction=False)
    _, bal = otf.fuse([a, b], spec, otf.FusionConfig(**base))
    _, unb = otf.fuse([a, b], spec, otf.FusionConfig(**base, tau=0.5))
    for name in bal.info[0]:  # the computed plans (the class layer keeps its order)
        np.testing.assert_allclose(bal.plans[0][name].sum(0), 1 / 10, atol=2e-3)
        assert float(jnp.abs(unb.plans[0][name].sum(0) - 1 / 10).max()) > 1e-3  # mass is no longer forced
        assert bool(jnp.all(jnp.isfinite(unb.plans[0][name])))


# ----------------------------------------------------------------------------- many parents: the iterative barycentre


@pytest.mark.slow
@pytest.mark.parametrize(
    "aligner",
    [otf.FusionConfig(exact_backend="host"), otf.WeightMatching(start="greedy", restarts=1),
     otf.FusionConfig(mode="activations", exact_backend="host")],
    ids=["ot-weights", "wm", "ot-acts"],
)
def test_barycentre_of_permuted_copies_is_the_model(aligner):
    """K = 4 permuted copies of one model: round 1 recovers it, round 2 changes no plan, the loop stops."""
    model, spec, v = _mlp((12, 8), bias=True, seed=0)
    parents = [permuted_copy(v, spec, s) for s in (1, 2, 3)] + [v]
    acts = None
    if aligner.needs_activations:
        x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 4, 4, 1)), jnp.float32)
        acts = [capture_activations(model, p, x) for p in parents]
    fused, aux = otf.fuse(parents, spec, aligner, iterations=10, activations=acts)
    assert max_abs_diff(fused, v) < 1e-6
    assert int(aux.iterations) == 2 and float(aux.plan_change) == 0.0
    assert all(p is not None for p in aux.plans)  # every parent, the target too, has plans onto the result
    for name in spec.plans:
        np.testing.assert_allclose(aux.plans[-1][name], np.eye(aux.plans[-1][name].shape[0]), atol=1e-6)
    aligned, aux_a = otf.align_parents(parents, spec, aligner, iterations=10, activations=acts)
    assert all(max_abs_diff(a, v) < 1e-6 for a in aligned) and int(aux_a.iterations) == 2


@pytest.mark.slow
def test_the_barycentre_by_activations_ends_at_its_fixed_point():
    """Independent parents: at convergence each parent's plans are its OT plans onto the mean of the others'
    activations, each moved by its own plans (the barycentre in activation space)."""
    model, spec, _ = _mlp((12, 8), bias=True, seed=0)
    parents = [_mlp((12, 8), bias=True, seed=s)[2] for s in range(4)]
    x = jnp.asarray(np.random.default_rng(1).standard_normal((32, 4, 4, 1)), jnp.float32)
    acts = [capture_activations(model, p, x) for p in parents]
    cfg = otf.FusionConfig(mode="activations", exact_backend="host")
    one_shot, _ = otf.fuse(parents, spec, cfg, activations=acts)
    fused, aux = otf.fuse(parents, spec, cfg, activations=acts, iterations=30)
    assert float(aux.plan_change) == 0.0 and int(aux.iterations) >= 2
    assert max_abs_diff(fused, one_shot) > 1e-3  # the rounds moved some parent
    for i in range(4):
        moved = [{n: tuple(a @ aux.plans[j][n] for a in acts[j][n]) for n in acts[j]} for j in range(4) if j != i]
        mean = {n: tuple(sum(m[n][q] for m in moved) / 3 for q in range(len(acts[i][n]))) for n in acts[i]}
        again = cfg.align(parents[i], parents[-1], spec, parent_acts=acts[i], target_acts=mean)
        for n in spec.plans:
            np.testing.assert_allclose(as_matrix(again.plans[n], aux.plans[i][n].shape[0]), aux.plans[i][n], atol=1e-6)


@pytest.mark.slow
def test_barycentre_rounds_and_bad_iterations():
    """Trained-like random parents: it runs at most `iterations` rounds."""
    _, spec, a = _mlp((12, 8), bias=True, seed=0)
    parents = [_mlp((12, 8), bias=True, seed=s)[2] for s in (1, 2)] + [a]
    fused_1, aux_1 = otf.fuse(parents, spec, otf.FusionConfig(exact_backend="host"))
    assert int(aux_1.iterations) == 1 and aux_1.plan_change is None and aux_1.plans[-1] is None
    fused, aux = otf.fuse(parents, spec, otf.FusionConfig(exact_backend="host"), iterations=3)
    assert 2 <= int(aux.iterations) <= 3
    assert jax.tree_util.tree_structure(fused) == jax.tree_util.tree_structure(fused_1)
    with pytest.raises(otf.FusionError, match="iterations must be an int >= 1"):
        otf.fuse(parents, spec, otf.FusionConfig(), iterations=0)
