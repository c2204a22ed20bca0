"""CCA Merge: the map of one layer, Linear plans, the permuted (and rescaled) copy property, refusals, the method row."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import otfusion_jax as otf
from otfusion_jax import cca, configs_util, data, experiment, plans
from otfusion_jax import spec as spec_lib
from otfusion_jax.models import build, capture_activations

from fusion_helpers import apply_jit, max_abs_diff, permute_numpy, random_permutations, random_variables, shipped_parents

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_cca_map_recovers_an_invertible_linear_relation():
    """Without shrinkage, target activations that are an invertible map A of the parent's give T = A."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 6)) @ (np.eye(6) + 0.3 * rng.standard_normal((6, 6))) + 3.0  # correlated, off-centre
    a = rng.standard_normal((6, 6)) + 3 * np.eye(6)
    t, t_inv, corr = jax.jit(cca.cca_map)(jnp.asarray(x, jnp.float32), jnp.asarray(x @ a, jnp.float32), 0.0)
    np.testing.assert_allclose(np.asarray(t), a, atol=2e-3)
    np.testing.assert_allclose(np.asarray(t @ t_inv), np.eye(6), atol=2e-3)
    assert float(corr) == pytest.approx(1.0, abs=1e-3)  # every canonical correlation is 1


def test_linear_plans_move_outputs_by_the_map_and_inputs_by_its_inverse():
    """A dense pair moved by a Linear plan computes the same affine map (what the ReLU between them breaks)."""
    model, spec = build("mlpnet", input_shape=(3, 3, 1), num_classes=4, widths=(5,), bias=True)
    v = random_variables(model, (3, 3, 1), 0)
    rng = np.random.default_rng(1)
    t = rng.standard_normal((5, 5)) + 3 * np.eye(5)
    linear = plans.Linear(jnp.asarray(t, jnp.float32), jnp.asarray(np.linalg.inv(t), jnp.float32))
    moved = plans.apply_plans(v, spec, {"fc1": linear, "fc2": plans.Permutation(jnp.arange(4))})
    p, q = v["params"], moved["params"]
    x = rng.standard_normal((7, 9))

    def affine(prm):
        h = x @ np.asarray(prm["fc1"]["kernel"]) + np.asarray(prm["fc1"]["bias"])
        return h, h @ np.asarray(prm["fc2"]["kernel"]) + np.asarray(prm["fc2"]["bias"])

    (h0, y0), (h1, y1) = affine(p), affine(q)
    np.testing.assert_allclose(h1, h0 @ t, rtol=1e-4, atol=1e-4)  # the produced neurons move by T
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-4)  # the next layer undoes it
    np.testing.assert_allclose(np.asarray(plans.as_matrix(linear)), t, rtol=1e-6)


@settings(max_examples=10, deadline=None)
@given(
    widths=st.lists(st.integers(2, 20), min_size=1, max_size=3),
    bias=st.booleans(),
    rescale=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_permuted_copy_is_recovered(widths, bias, rescale, seed):
    """Fusing a model with a permuted copy of itself gives the model back; without shrinkage, also a copy whose
    neurons are permuted and rescaled by positive factors (the same function through a ReLU, which no
    permutation method undoes).

    Widths non-increasing and at most the input's 36 pixels, pre-ReLU activations of 256 samples: every
    covariance is nonsingular, so the map is unique. The rescaled copy without shrinkage squares the scales'
    spread into the covariances' condition number, which float32 eigendecompositions pay for: a looser
    tolerance there (a wrong pairing of neurons would be off by the weights' own size, about 1).
    """
    widths = tuple(sorted(widths, reverse=True))
    model, spec = build("mlpnet", input_shape=(6, 6, 1), num_classes=3, widths=widths, bias=bias)
    v = random_variables(model, (6, 6, 1), seed)
    sizes = spec.check_variables(v)
    perms = random_permutations(spec, sizes, seed + 1)
    copy = permute_numpy(v, spec, perms)
    regularization = 0.5
    if rescale:
        regularization = 0.0
        rng = np.random.default_rng(seed + 2)
        scales = {name: rng.uniform(0.5, 2.0, n) for name, n in sizes.items() if name != spec.output_plan}
        copy = _rescaled(copy, spec, scales)
    x = jax.random.normal(jax.random.key(seed), (256, 6, 6, 1))
    np.testing.assert_allclose(apply_jit(model, copy, x), apply_jit(model, v, x), rtol=1e-4, atol=1e-4)
    acts = [capture_activations(model, w, x, "pre") for w in (copy, v)]
    fused, aux = otf.fuse([copy, v], spec, otf.CCAMerge(regularization, "pre"), activations=acts)
    assert max_abs_diff(fused, v) < (2e-2 if rescale else 2e-3)
    assert set(aux.plans[0]) == set(spec.plans) and aux.plans[1] is None


def _rescaled(variables, spec, scales):
    """Neuron j of each hidden layer times s_j on its producers (kernel column, bias), 1/s_j on its consumers."""
    flat = spec_lib.flatten_paths(variables)
    out = {}
    for path, ls in spec.leaves:
        x = np.asarray(flat[path])
        view = x.reshape(spec_lib.view_shape(ls, x.shape, path))
        last = len(ls.axes) - 1
        for ax, name in enumerate(ls.axes):
            if name in scales:
                s = scales[name] if ax == last else 1.0 / scales[name]
                view = view * s.reshape([-1 if i == ax else 1 for i in range(view.ndim)])
        out[path] = jnp.asarray(view.reshape(x.shape), x.dtype)
    return spec_lib.unflatten_paths(out)


def test_refuses_what_a_linear_map_cannot_move():
    x = jnp.ones((4, 32, 32, 1))
    model, spec = build("vgg11", input_shape=(32, 32, 1), width=0.0625, norm=True, bias=False)
    v = random_variables(model, (32, 32, 1), 0)
    with pytest.raises(otf.FusionError, match=r"CCA Merge: leaf .*BatchNorm|CCA Merge: leaf params/.* normalisation"):
        otf.fuse([v, v], spec, otf.CCAMerge(), activations=[capture_activations(model, v, x)] * 2)
    model, spec = build("mlpnet", input_shape=(3, 3, 1), widths=(4,), bias=False)
    wide, wide_spec = build("mlpnet", input_shape=(3, 3, 1), widths=(6,), bias=False)
    a, b = random_variables(model, (3, 3, 1)), random_variables(wide, (3, 3, 1))
    with pytest.raises(otf.FusionError, match=r"CCA Merge needs equal widths, but plan 'fc1' has 6 neurons in parent 0 and 4 in the target"):
        otf.fuse([b, a], spec, otf.CCAMerge(), activations=[{}, {}])
    with pytest.raises(otf.FusionError, match=r"regularization must be a number in \[0, 1\], got 1.5"):
        otf.CCAMerge(1.5)
    with pytest.raises(otf.FusionError, match=r"acts_kind must be one of"):
        otf.CCAMerge(0.5, "relu")


def test_refuses_attention_heads():
    model, spec = build("vit", input_shape=(8, 8, 1), num_classes=3, depth=1, embed_dim=8, num_heads=2, mlp_dim=8,
                        patch_size=4)
    v = random_variables(model, (8, 8, 1))
    acts = capture_activations(model, v, jnp.ones((2, 8, 8, 1)))
    with pytest.raises(otf.FusionError, match="CCA Merge: the spec has attention heads"):
        otf.fuse([v, v], spec, otf.CCAMerge(), activations=[acts, acts])


def test_config_section_is_validated_and_read():
    from configs import default

    config = default.get_config()
    config.cca.regularization = 1.5
    with pytest.raises(ValueError, match=r"config\.cca\.regularization"):
        configs_util.validate(config)
    config.cca.regularization = 0.25
    config.cca.acts_kind = "pre"
    assert configs_util.settings_from(configs_util.validate(config)).cca == otf.CCAMerge(0.25, "pre")


@pytest.mark.slow
def test_method_row_on_four_digits_parents():
    """The cca row of fuse.py's table: far above vanilla averaging on the shipped digits parents."""
    parents, spec = shipped_parents("digits_mlpnet", 4)
    settings = experiment.Settings(experiment=experiment.ExperimentConfig(method="cca", many_method="", plots=False))
    rows, fused = experiment.run_fusion_table(parents, spec, data.load("digits"), settings)
    acc = {r["method"]: r["accuracy"] for r in rows}
    label = "CCA Merge (post-ReLU activations, regularization 0.5)"
    assert acc[label] > acc["vanilla averaging"] + 0.2, acc
    assert fused[label].method == "cca"


def test_the_recommended_method_for_three_mlps_is_cca_merge():
    """Three MLPs of equal widths: CCA Merge on post-ReLU activations of config.cca.num_samples inputs (not
    experiment.num_samples), + the least-squares refit; two of different widths: OT by weights, Sinkhorn, + the refit."""
    model, spec = build("mlpnet", input_shape=(4, 4, 1), num_classes=3, widths=(6, 5), bias=False)
    parents = [experiment.Parent(f"parent {i}", model, random_variables(model, (4, 4, 1), i)) for i in range(3)]
    x = np.asarray(jax.random.normal(jax.random.key(5), (40, 4, 4, 1)))
    y = np.arange(40) % 3
    ds = data.Dataset("fashion_mnist", "idx", x[:30], y[:30], x[30:], y[30:], 3)
    exp = experiment.ExperimentConfig(method="recommended", num_samples=4, many_method="", plots=False)
    settings = experiment.Settings(exp, cca=otf.CCAMerge(num_samples=25))
    captured = []
    real = experiment.models.capture_activations
    experiment.models.capture_activations = lambda m, v, xs, kind: captured.append((len(xs), kind)) or real(m, v, xs, kind)
    try:
        rows, fused = experiment.run_fusion_table(parents, spec, ds, settings)
    finally:
        experiment.models.capture_activations = real
    labels = [r["method"] for r in rows if r["method"].startswith("recommended")]
    want = "recommended: CCA Merge (post-ReLU activations, regularization 0.5)"
    assert labels == [want, f"{want} + refit"], labels
    corr = next(r for r in rows if r["method"] == want)["cca_correlation"]
    assert set(corr) == {"fc1", "fc2"} and all(0.0 < c <= 0.5 for c in corr.values()), corr  # (1 - r) * mean corr
    assert captured[:3] == [(25, "post")] * 3, captured  # then the refit's: the parents' pre-activations
    assert fused[labels[0]].method == "recommended"
    wide, _ = build("mlpnet", input_shape=(4, 4, 1), num_classes=3, widths=(9, 5), bias=False)
    pair = [parents[0], experiment.Parent("wide", wide, random_variables(wide, (4, 4, 1), 7))]
    rows, _ = experiment.run_fusion_table(pair, spec, ds, settings)
    labels = [r["method"] for r in rows if r["method"].startswith("recommended")]
    assert labels[0].startswith("recommended: OT fusion (weights, sinkhorn 0.05") and labels[1:] == [f"{labels[0]} + refit"], labels


def test_moved_target_stats_equal_the_aligned_parents_for_permutations():
    """REPAIR's targets from the parents' own pre-activations moved by the plans are the aligned parents' when the
    plans permute (where a moved parent is the same function); the target's are its own."""
    from otfusion_jax import repair  # noqa: PLC0415

    model, spec = build("mlpnet", input_shape=(4, 4, 1), num_classes=3, widths=(7, 5), bias=True)
    a, b = random_variables(model, (4, 4, 1), 0), random_variables(model, (4, 4, 1), 1)
    perms = random_permutations(spec, spec.check_variables(a), 2)
    matrices = plans.perms_to_plans(perms)
    x = jax.random.normal(jax.random.key(3), (64, 4, 4, 1))
    want = repair.target_stats(model, [plans.apply_plans(a, spec, perms), b], x, weights=(0.3, 0.7))
    got = repair.moved_target_stats([(model, a), (model, b)], [matrices, None], x, weights=(0.3, 0.7))
    assert set(got) == set(want) == set(spec.plans)
    for name in want:
        for g, w in zip(got[name], want[name]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_repair_of_cca_merge_restores_the_moved_statistics():
    """The cca row's REPAIR: the repaired model's pre-activations have the moved targets' mean and std."""
    from otfusion_jax import repair  # noqa: PLC0415

    parents, spec = shipped_parents("digits_mlpnet", 2)
    ds = data.load("digits")
    exp = experiment.ExperimentConfig(method="cca", repair=True, repair_output=True, plots=False, num_samples=100)
    settings = experiment.Settings(exp, cca=otf.CCAMerge(num_samples=500))
    calls = []
    real = repair.moved_target_stats
    try:
        repair.moved_target_stats = lambda *a, **k: calls.append(1) or real(*a, **k)
        rows, fused = experiment.run_fusion_table(parents, spec, ds, settings)
    finally:
        repair.moved_target_stats = real
    assert calls == [1, 1]  # the REPAIR row's targets (compile, then timed): the moved statistics
    label = "CCA Merge (post-ReLU activations, regularization 0.5)"
    acc = {r["method"]: r["accuracy"] for r in rows}
    assert acc[f"{label} + REPAIR"] > acc["vanilla averaging"] + 0.2, acc
    acts = [capture_activations(p.module, p.variables, jnp.asarray(experiment.sample_inputs(ds.x_train, 500, 0)), "post")
            for p in parents]
    _, aux = otf.fuse([p.variables for p in parents], spec, otf.CCAMerge(), activations=acts)
    x = jnp.asarray(experiment.sample_inputs(ds.x_train, 100, 0))
    targets = repair.moved_target_stats([(p.module, p.variables) for p in parents], aux.plans, x)
    module, repaired = experiment.repair_fused(parents[1].module, spec, fused[label].variables, [], x,
                                               include_output=True, targets=targets)
    stats = repair.preactivation_stats(module, repaired, x)
    for name in spec.plans:
        np.testing.assert_allclose(np.asarray(stats[name][0]), np.asarray(targets[name][0]), atol=2e-3)
        np.testing.assert_allclose(np.asarray(stats[name][1]), np.asarray(targets[name][1]), rtol=2e-3, atol=2e-3)


def test_vmap_over_pairs_and_gradients():
    """CCA Merge under vmap equals the loop over pairs, and the fused weights are differentiable in the
    activations (through fuse) and in the regularization (eigendecompositions and the QDWH polar factor are)."""
    model, spec = build("mlpnet", input_shape=(4, 4, 1), num_classes=3, widths=(8, 6), bias=True)
    x = jax.random.normal(jax.random.key(0), (64, 4, 4, 1))
    pairs = [(random_variables(model, (4, 4, 1), 2 * i), random_variables(model, (4, 4, 1), 2 * i + 1)) for i in range(3)]
    acts = [[capture_activations(model, v, x, "post") for v in pair] for pair in pairs]
    stack = lambda trees: jax.tree_util.tree_map(lambda *t: jnp.stack(t), *trees)  # noqa: E731

    def fused(a, b, acts_a, acts_b):
        return otf.fuse([a, b], spec, cca.CCAMerge(), activations=[acts_a, acts_b])[0]

    batched = jax.vmap(fused)(*(stack([p[i] for p in pairs]) for i in range(2)), *(stack([q[i] for q in acts]) for i in range(2)))
    looped = stack([fused(*pair, *a) for pair, a in zip(pairs, acts)])
    assert max_abs_diff(batched, looped) < 1e-4

    a, b = pairs[0]
    g = jax.grad(lambda acts_a: jnp.sum(jnp.tanh(fused(a, b, acts_a, acts[0][1])["params"]["fc2"]["kernel"])))(acts[0][0])
    flat = jax.tree_util.tree_leaves(g)
    assert all(np.all(np.isfinite(np.asarray(t))) for t in flat) and max(float(jnp.abs(t).max()) for t in flat) > 0

    xa, xb = (jnp.concatenate(acts[0][i]["fc1"]) for i in range(2))
    g_r = jax.grad(lambda r: jnp.sum(jnp.tanh(cca.cca_map(xa, xb, r)[0])))(0.5)
    assert np.isfinite(float(g_r)) and float(g_r) != 0.0


def test_full_regularization_is_procrustes_of_the_raw_activations():
    """r = 1: no whitening; T is the orthogonal Procrustes map of the centred activations times their scale ratio."""
    from otfusion_jax import ot  # noqa: PLC0415

    rng = np.random.default_rng(3)
    xp = rng.standard_normal((300, 5)) * rng.uniform(0.5, 2.0, 5)
    xt = xp @ np.linalg.qr(rng.standard_normal((5, 5)))[0] + 0.1 * rng.standard_normal((300, 5))
    t, t_inv, _ = cca.cca_map(jnp.asarray(xp, jnp.float32), jnp.asarray(xt, jnp.float32), 1.0)
    cp, ct = xp - xp.mean(0), xt - xt.mean(0)
    rot = np.asarray(ot.procrustes(jnp.asarray(cp.T @ ct, jnp.float32))[0])
    scale = np.sqrt(np.trace(ct.T @ ct) / np.trace(cp.T @ cp))
    np.testing.assert_allclose(np.asarray(t), scale * rot, atol=1e-4)
    np.testing.assert_allclose(np.asarray(t @ t_inv), np.eye(5), atol=1e-4)


def test_barycentre_of_permuted_copies_returns_the_model():
    """The iterative barycentre with Linear plans (iterations > 1): a model and two permuted copies fuse back to
    the model, and the rounds stop once the maps stop changing."""
    model, spec = build("mlpnet", input_shape=(6, 6, 1), num_classes=3, widths=(12, 8), bias=True)
    v = random_variables(model, (6, 6, 1), 4)
    copies = [permute_numpy(v, spec, random_permutations(spec, spec.check_variables(v), s)) for s in (5, 6)]
    x = jax.random.normal(jax.random.key(7), (256, 6, 6, 1))
    acts = [capture_activations(model, w, x, "pre") for w in (*copies, v)]
    fused, aux = otf.fuse([*copies, v], spec, otf.CCAMerge(0.5, "pre"), activations=acts, iterations=4)
    assert max_abs_diff(fused, v) < 2e-3
    assert 2 <= int(aux.iterations) <= 4 and float(aux.plan_change) < 1e-2


def test_the_recommended_method_sends_only_what_cca_merge_can_fuse():
    from otfusion_jax.experiment import _cca_fits  # noqa: PLC0415

    def group(name, shape=(8, 8, 1), **opts):
        model, spec = build(name, input_shape=shape, num_classes=3, **opts)
        v = random_variables(model, shape)
        return types.SimpleNamespace(spec=spec, variables=[v, v], settings=experiment.Settings(), target=1)

    assert _cca_fits(group("mlpnet", widths=(6,), bias=False))
    assert not _cca_fits(group("vit", depth=1, embed_dim=8, num_heads=2, mlp_dim=8, patch_size=4))
    assert not _cca_fits(group("vgg11", (32, 32, 1), width=0.0625, norm=True, bias=False))
    wide = group("mlpnet", widths=(7,), bias=False)
    narrow = group("mlpnet", widths=(6,), bias=False)
    assert not _cca_fits(types.SimpleNamespace(
        spec=narrow.spec, variables=[wide.variables[0], narrow.variables[0]], settings=experiment.Settings(), target=1))


def test_polar_factor_derivative_matches_finite_differences():
    from otfusion_jax import ot  # noqa: PLC0415

    rng = np.random.default_rng(0)
    m = jnp.asarray(rng.standard_normal((5, 5)) + 2 * np.eye(5), jnp.float32)
    dm = jnp.asarray(rng.standard_normal((5, 5)), jnp.float32)
    r, dr = jax.jvp(ot.polar_factor, (m,), (dm,))
    u, _, vt = np.linalg.svd(np.asarray(m, np.float64))
    np.testing.assert_allclose(np.asarray(r), u @ vt, atol=1e-5)
    h = 1e-3
    fd = []
    for sign in (1, -1):
        u, _, vt = np.linalg.svd(np.asarray(m, np.float64) + sign * h * np.asarray(dm, np.float64))
        fd.append(u @ vt)
    np.testing.assert_allclose(np.asarray(dr), (fd[0] - fd[1]) / (2 * h), atol=2e-3)
