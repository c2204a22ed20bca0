"""Self-checks of the NumPy + POT OTFusion reference (``reference_otfusion.py``).

These tests check the reference itself, not the JAX library: fusing a model with a
neuron-permuted copy of itself must give the copy back, the ensemble step must
interpolate between aligned A and B, marginals must hold, and different widths must
yield B's shapes.
"""

from __future__ import annotations

import numpy as np
import pytest

try:  # tests/ as a plain directory (pytest's default "prepend" import mode)
    import reference_otfusion as ref
except ModuleNotFoundError:  # tests/ made a package
    from tests import reference_otfusion as ref

TIGHT = {"rtol": 1e-10, "atol": 1e-12}

# A small CNN: 3x8x8 input, conv 3x3 -> pool -> conv 3x3 -> pool -> flatten (C, 2, 2)
# -> dense -> dense. Layer 2 is the dense layer fed by the flatten.
CNN_POOL_AFTER = (0, 1)
CNN_SPATIAL = (2, 2)
CNN_FLATTEN_LAYER = 2


# --------------------------------------------------------------------------------------
# Model builders.
# --------------------------------------------------------------------------------------


def random_mlp(rng, widths, with_bias):
    """Random dense weights (out, in) for the given widths [in, h1, ..., out]."""
    weights = [rng.normal(size=(n_out, n_in)) / np.sqrt(n_in)
               for n_in, n_out in zip(widths[:-1], widths[1:])]
    biases = [rng.normal(size=w.shape[0]) * 0.5 for w in weights] if with_bias else None
    return weights, biases


def random_cnn(rng, channels, hidden, n_out, with_bias):
    """Random CNN weights: convs with `channels` = [in, c1, c2], then two dense layers."""
    weights = [rng.normal(size=(c_out, c_in, 3, 3)) / np.sqrt(9 * c_in)
               for c_in, c_out in zip(channels[:-1], channels[1:])]
    n_flat = channels[-1] * CNN_SPATIAL[0] * CNN_SPATIAL[1]
    weights.append(rng.normal(size=(hidden, n_flat)) / np.sqrt(n_flat))
    weights.append(rng.normal(size=(n_out, hidden)) / np.sqrt(hidden))
    biases = [rng.normal(size=w.shape[0]) * 0.5 for w in weights] if with_bias else None
    return weights, biases


def cnn_flatten(channels):
    """flatten_shapes for random_cnn."""
    return {CNN_FLATTEN_LAYER: (channels[-1], *CNN_SPATIAL)}


def permute_chain(rng, weights, biases, flatten_shapes=None):
    """Permutes every hidden neuron of a chain model; returns (weights, biases, perms).

    B's neuron j is A's neuron perm[j] (so the plan A->B is 1 at (perm[j], j)). The last
    layer's outputs are not permuted.
    """
    flatten_shapes = flatten_shapes or {}
    perms = [rng.permutation(w.shape[0]) for w in weights[:-1]]
    perms.append(np.arange(weights[-1].shape[0]))
    new_weights, new_biases = [], []
    for layer, weight in enumerate(weights):
        w = weight[perms[layer]]
        if layer > 0:
            if layer in flatten_shapes:
                _, h, wd = flatten_shapes[layer]
                w = w.reshape(w.shape[0], -1, h * wd)[:, perms[layer - 1], :]
                w = w.reshape(w.shape[0], -1)
            else:
                w = w[:, perms[layer - 1]]
        new_weights.append(w)
        if biases is not None:
            new_biases.append(biases[layer][perms[layer]])
    return new_weights, (new_biases if biases is not None else None), perms


def perm_plan(perm):
    """The corrected plan of a permutation: 1 at (perm[j], j)."""
    n = len(perm)
    plan = np.zeros((n, n))
    plan[perm, np.arange(n)] = 1.0
    return plan


def assert_lists_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, **(tol or TIGHT))


def manual_fusion(weights_a, weights_b, plans, *, s, correct, flatten_shapes=None,
                  past_correction=True):
    """Fusion recomputed from the returned raw plans, written out independently."""
    flatten_shapes = flatten_shapes or {}
    fused, previous = [], None
    for layer, (w_a, w_b, raw) in enumerate(zip(weights_a, weights_b, plans)):
        plan = correct(raw)
        aligned = w_a
        if previous is not None:
            if layer in flatten_shapes:
                _, h, wd = flatten_shapes[layer]
                blocks = w_a.reshape(w_a.shape[0], previous.shape[0], h * wd)
                aligned = np.stack([blocks[:, :, p] @ previous for p in range(h * wd)],
                                   axis=2).reshape(w_a.shape[0], -1)
            elif w_a.ndim == 4:
                aligned = np.stack(
                    [np.stack([w_a[:, :, y, x] @ previous for x in range(w_a.shape[3])],
                              axis=2) for y in range(w_a.shape[2])], axis=2)
            else:
                aligned = w_a @ previous
        source = aligned if past_correction else w_a
        moved = (plan.T @ source.reshape(source.shape[0], -1)).reshape(
            (plan.shape[1],) + source.shape[1:])
        fused.append((1 - s) * moved + s * w_b)
        previous = plan
    return fused


# --------------------------------------------------------------------------------------
# Sanity of the helpers themselves.
# --------------------------------------------------------------------------------------


def test_permuted_copies_compute_the_same_function():
    rng = np.random.default_rng(0)
    w, b = random_mlp(rng, [7, 9, 6, 4], with_bias=True)
    w_p, b_p, _ = permute_chain(rng, w, b)
    x = rng.normal(size=(5, 7))
    np.testing.assert_allclose(ref.forward_mlp(w, b, x)[-1], ref.forward_mlp(w_p, b_p, x)[-1],
                               **TIGHT)

    channels = [3, 5, 4]
    w, b = random_cnn(rng, channels, hidden=6, n_out=3, with_bias=True)
    w_p, b_p, _ = permute_chain(rng, w, b, cnn_flatten(channels))
    x = rng.normal(size=(4, 3, 8, 8))
    out = ref.forward_cnn(w, b, x, pool_after=CNN_POOL_AFTER)
    out_p = ref.forward_cnn(w_p, b_p, x, pool_after=CNN_POOL_AFTER)
    assert out[0].shape == (4, 5, 8, 8) and out[1].shape == (4, 4, 4, 4)
    np.testing.assert_allclose(out[-1], out_p[-1], **TIGHT)


def test_conv_helper_matches_naive_loops():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 4, 5))
    w = rng.normal(size=(2, 3, 3, 3))
    bias = rng.normal(size=2)
    out = ref.forward_cnn([w, np.eye(2 * 4 * 5)], [bias, np.zeros(40)], x)[0]
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    naive = np.zeros_like(out)
    for s in range(2):
        for o in range(2):
            for i in range(4):
                for j in range(5):
                    naive[s, o, i, j] = np.sum(padded[s, :, i:i + 3, j:j + 3] * w[o]) + bias[o]
    np.testing.assert_allclose(out, naive, **TIGHT)


def test_flatten_alignment_matches_per_location_product():
    rng = np.random.default_rng(2)
    c_a, c_b, h, w = 3, 2, 2, 3
    weight = rng.normal(size=(4, c_a * h * w))
    plan = rng.random(size=(c_a, c_b))
    aligned = ref.align_incoming(weight, plan, (c_a, h, w))
    assert aligned.shape == (4, c_b * h * w)
    for o in range(4):
        for j in range(c_b):
            for p in range(h * w):
                expected = sum(weight[o, i * h * w + p] * plan[i, j] for i in range(c_a))
                assert aligned[o, j * h * w + p] == pytest.approx(expected, rel=1e-12)


def test_ground_costs_match_definitions():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(4, 6)), rng.normal(size=(5, 6))
    sq = np.array([[np.sum((a - b) ** 2) for b in y] for a in x])
    cos = np.array([[1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in y] for a in x])
    np.testing.assert_allclose(ref.ground_cost(x, y, "euclidean", squared=True), sq, **TIGHT)
    np.testing.assert_allclose(ref.ground_cost(x, y, "euclidean"), np.sqrt(sq), **TIGHT)
    np.testing.assert_allclose(ref.ground_cost(x, y, "cosine"), np.maximum(cos, 0), **TIGHT)
    np.testing.assert_allclose(ref.normalize_cost_matrix(sq, "log"), np.log1p(sq), **TIGHT)
    assert ref.normalize_cost_matrix(sq, "max").max() == pytest.approx(1.0)
    assert ref.normalize_cost_matrix(sq, "mean").mean() == pytest.approx(1.0)
    assert np.median(ref.normalize_cost_matrix(sq, "median")) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------
# Fusing with a permuted copy gives the copy back.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mlp_permuted_copy_weights_mode(seed, with_bias):
    rng = np.random.default_rng(seed)
    widths = [int(rng.integers(5, 12)), *rng.integers(3, 16, size=2).tolist(), 4]
    w_a, b_a = random_mlp(rng, widths, with_bias)
    w_b, b_b, perms = permute_chain(rng, w_a, b_a)
    fused_w, fused_b, plans = ref.fuse_reference(w_a, w_b, biases_a=b_a, biases_b=b_b)
    assert_lists_close(fused_w, w_b)
    if with_bias:
        assert_lists_close(fused_b, b_b)
    else:
        assert fused_b is None
    for plan, perm in zip(plans, perms):
        np.testing.assert_allclose(plan * len(perm), perm_plan(perm), **TIGHT)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("seed", [3, 4])
def test_mlp_permuted_copy_activation_mode(seed, with_bias):
    rng = np.random.default_rng(seed)
    widths = [int(rng.integers(5, 12)), *rng.integers(3, 16, size=3).tolist(), 3]
    w_a, b_a = random_mlp(rng, widths, with_bias)
    w_b, b_b, perms = permute_chain(rng, w_a, b_a)
    x = rng.normal(size=(30, widths[0]))
    acts_a = ref.forward_mlp(w_a, b_a, x)
    acts_b = ref.forward_mlp(w_b, b_b, x)
    fused_w, fused_b, plans = ref.fuse_reference(
        w_a, w_b, biases_a=b_a, biases_b=b_b, acts_a=acts_a, acts_b=acts_b, mode="activations")
    assert_lists_close(fused_w, w_b)
    if with_bias:
        assert_lists_close(fused_b, b_b)
    for plan, perm in zip(plans, perms):
        np.testing.assert_allclose(plan * len(perm), perm_plan(perm), **TIGHT)


@pytest.mark.parametrize("mode", ["weights", "activations"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cnn_permuted_copy_with_flatten(mode, with_bias):
    rng = np.random.default_rng(5)
    channels = [3, 6, 5]
    w_a, b_a = random_cnn(rng, channels, hidden=7, n_out=3, with_bias=with_bias)
    flatten = cnn_flatten(channels)
    w_b, b_b, perms = permute_chain(rng, w_a, b_a, flatten)
    acts = {}
    if mode == "activations":
        x = rng.normal(size=(6, 3, 8, 8))
        acts = {"acts_a": ref.forward_cnn(w_a, b_a, x, pool_after=CNN_POOL_AFTER),
                "acts_b": ref.forward_cnn(w_b, b_b, x, pool_after=CNN_POOL_AFTER)}
    fused_w, fused_b, plans = ref.fuse_reference(
        w_a, w_b, biases_a=b_a, biases_b=b_b, mode=mode, flatten_shapes=flatten, **acts)
    assert_lists_close(fused_w, w_b)
    if with_bias:
        assert_lists_close(fused_b, b_b)
    for plan, perm in zip(plans, perms):
        np.testing.assert_allclose(plan * len(perm), perm_plan(perm), **TIGHT)


@pytest.mark.parametrize(
    "options",
    [
        {"ground_metric": "cosine"},
        {"squared": True},
        {"normalize_cost": "log"},
        {"normalize_cost": "max"},
        {"normalize_cost": "median"},
        {"normalize_cost": "mean"},
        {"unit_norm_rows": True},
        {"proper_marginals": True},
        {"importance": "l1", "proper_marginals": True},
        {"importance": "l2", "proper_marginals": True},
    ],
)
def test_options_still_recover_a_permuted_copy(options):
    rng = np.random.default_rng(6)
    w_a, b_a = random_mlp(rng, [8, 10, 9, 4], with_bias=True)
    w_b, b_b, _ = permute_chain(rng, w_a, b_a)
    fused_w, fused_b, _ = ref.fuse_reference(w_a, w_b, biases_a=b_a, biases_b=b_b, **options)
    assert_lists_close(fused_w, w_b, rtol=1e-8, atol=1e-10)
    assert_lists_close(fused_b, b_b, rtol=1e-8, atol=1e-10)


def test_weight_mode_cost_sees_the_bias_column():
    # All of layer 0's incoming weight rows are equal: only the biases tell neurons apart.
    rng = np.random.default_rng(16)
    w_a, b_a = random_mlp(rng, [5, 7, 3], with_bias=True)
    w_a[0] = np.tile(rng.normal(size=(1, 5)), (7, 1))
    w_b, b_b, perms = permute_chain(rng, w_a, b_a)
    assert not np.array_equal(perms[0], np.arange(7))
    fused_w, fused_b, plans = ref.fuse_reference(w_a, w_b, biases_a=b_a, biases_b=b_b)
    np.testing.assert_allclose(plans[0] * 7, perm_plan(perms[0]), **TIGHT)
    assert_lists_close(fused_w, w_b)
    assert_lists_close(fused_b, b_b)


# --------------------------------------------------------------------------------------
# Solver, ensemble step, corrections.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["weights", "activations"])
def test_sinkhorn_with_small_reg_is_close_to_exact(mode):
    rng = np.random.default_rng(7)
    w_a, b_a = random_mlp(rng, [10, 12, 8, 3], with_bias=True)
    w_b, b_b, _ = permute_chain(rng, w_a, b_a)
    w_b = [w + 0.01 * rng.normal(size=w.shape) for w in w_b]
    x = rng.normal(size=(25, 10))
    acts = {"acts_a": ref.forward_mlp(w_a, b_a, x), "acts_b": ref.forward_mlp(w_b, b_b, x)}
    common = dict(biases_a=b_a, biases_b=b_b, mode=mode, normalize_cost="max", **acts)
    exact_w, exact_b, exact_plans = ref.fuse_reference(w_a, w_b, **common)
    sk_w, sk_b, sk_plans = ref.fuse_reference(w_a, w_b, solver="sinkhorn", reg=2e-3, **common)
    assert_lists_close(sk_w, exact_w, rtol=0, atol=1e-6)
    assert_lists_close(sk_b, exact_b, rtol=0, atol=1e-6)
    assert_lists_close(sk_plans, exact_plans, rtol=0, atol=1e-7)
    # A large reg blurs the plan: no longer the exact one.
    _, _, blurred = ref.fuse_reference(w_a, w_b, solver="sinkhorn", reg=10.0, **common)
    assert np.abs(blurred[0] - exact_plans[0]).max() > 1e-3


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_ensemble_step_endpoints(solver):
    rng = np.random.default_rng(8)
    w_a, b_a = random_mlp(rng, [6, 9, 7, 3], with_bias=True)
    w_b, b_b = random_mlp(rng, [6, 9, 7, 3], with_bias=True)  # independent model
    opts = dict(biases_a=b_a, biases_b=b_b, solver=solver, reg=0.05)

    ones_w, ones_b, _ = ref.fuse_reference(w_a, w_b, ensemble_step=1.0, **opts)
    assert_lists_close(ones_w, w_b)
    assert_lists_close(ones_b, b_b)

    zero_w, zero_b, plans = ref.fuse_reference(w_a, w_b, ensemble_step=0.0, **opts)
    expected = manual_fusion(w_a, w_b, plans, s=0.0, correct=lambda t: t * t.shape[1])
    assert_lists_close(zero_w, expected)
    expected_b = [(t * t.shape[1]).T @ b for t, b in zip(plans, b_a)]
    assert_lists_close(zero_b, expected_b)

    half_w, _, half_plans = ref.fuse_reference(w_a, w_b, ensemble_step=0.5, **opts)
    assert_lists_close(half_plans, plans)
    assert_lists_close(half_w, [(z + b) / 2 for z, b in zip(zero_w, w_b)])


def test_exact_plans_of_independent_models_are_permutations():
    rng = np.random.default_rng(9)
    w_a, _ = random_mlp(rng, [6, 9, 7, 3], with_bias=False)
    w_b, _ = random_mlp(rng, [6, 9, 7, 3], with_bias=False)
    _, _, plans = ref.fuse_reference(w_a, w_b)
    for plan in plans:
        corrected = plan * plan.shape[1]
        np.testing.assert_allclose(np.sort(corrected, axis=None)[-plan.shape[0]:], 1.0, **TIGHT)
        np.testing.assert_allclose(corrected.sum(axis=0), 1.0, **TIGHT)
        np.testing.assert_allclose(corrected.sum(axis=1), 1.0, **TIGHT)


@pytest.mark.parametrize("mode", ["weights", "activations"])
@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_float32_reference_agrees_with_float64(mode, solver):
    """``dtype=np.float32`` (the benchmark's, as the original) computes in float32 and agrees with float64."""
    rng = np.random.default_rng(11)
    channels = [3, 6, 5]
    w_a, b_a = random_cnn(rng, channels, hidden=7, n_out=4, with_bias=True)
    w_b, b_b = random_cnn(rng, channels, hidden=7, n_out=4, with_bias=True)
    kwargs = dict(biases_a=b_a, biases_b=b_b, mode=mode, solver=solver, flatten_shapes=cnn_flatten(channels),
                  normalize_cost="mean", reg=0.1, sinkhorn_threshold=1e-8, sinkhorn_max_iter=20_000)
    if mode == "activations":
        x = rng.normal(size=(6, 3, 8, 8))
        kwargs["acts_a"] = ref.forward_cnn(w_a, b_a, x, pool_after=CNN_POOL_AFTER)
        kwargs["acts_b"] = ref.forward_cnn(w_b, b_b, x, pool_after=CNN_POOL_AFTER)
    w64, b64, p64 = ref.fuse_reference(w_a, w_b, **kwargs)
    w32, b32, p32 = ref.fuse_reference(w_a, w_b, **kwargs, dtype=np.float32)
    for got, want in zip(w32 + b32 + p32, w64 + b64 + p64):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_euclidean_cost_keeps_its_digits_for_offset_rows():
    """The matmul expansion is computed on centred rows: small distances between far-off rows stay accurate."""
    rng = np.random.default_rng(12)
    x = 1e3 + rng.normal(size=(5, 40))
    y = 1e3 + rng.normal(size=(6, 40))
    direct = np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1))
    np.testing.assert_allclose(ref.ground_cost(x, y), direct, **TIGHT)
    np.testing.assert_allclose(ref.ground_cost(x.astype(np.float32), y.astype(np.float32)), direct, rtol=1e-5)


def test_correction_off_and_past_correction_off():
    rng = np.random.default_rng(10)
    w_a, _ = random_mlp(rng, [6, 8, 7, 3], with_bias=False)
    w_b, _ = random_mlp(rng, [6, 8, 7, 3], with_bias=False)

    raw_w, _, plans = ref.fuse_reference(w_a, w_b, correction=False, ensemble_step=0.3)
    assert_lists_close(raw_w, manual_fusion(w_a, w_b, plans, s=0.3, correct=lambda t: t))
    # Without correction the plan carries mass 1/n per neuron: A's part shrinks.
    assert np.abs(raw_w[0] - 0.7 * (plans[0] * 8).T @ w_a[0] - 0.3 * w_b[0]).max() > 1e-3

    past_w, _, past_plans = ref.fuse_reference(w_a, w_b, past_correction=False)
    # The plans do not depend on past_correction (the cost always uses aligned W_A).
    assert_lists_close(past_plans, ref.fuse_reference(w_a, w_b)[2])
    expected = manual_fusion(w_a, w_b, past_plans, s=0.5, correct=lambda t: t * t.shape[1],
                             past_correction=False)
    assert_lists_close(past_w, expected)


def test_align_last_false_uses_identity_on_outputs():
    rng = np.random.default_rng(11)
    w_a, b_a = random_mlp(rng, [6, 8, 7, 3], with_bias=True)
    w_b, b_b = random_mlp(rng, [6, 8, 7, 3], with_bias=True)
    x = rng.normal(size=(20, 6))
    acts_a = ref.forward_mlp(w_a, b_a, x)[:-1]  # the last layer's activations are unused
    acts_b = ref.forward_mlp(w_b, b_b, x)[:-1]
    for past_correction in (True, False):
        fused_w, fused_b, plans = ref.fuse_reference(
            w_a, w_b, biases_a=b_a, biases_b=b_b, acts_a=acts_a, acts_b=acts_b,
            mode="activations", align_last=False, ensemble_step=0.25,
            past_correction=past_correction)
        np.testing.assert_array_equal(plans[-1], np.eye(3))
        previous = plans[-2] * plans[-2].shape[1]
        # Aligned incoming side whatever past_correction says (original --skip-last-layer).
        np.testing.assert_allclose(fused_w[-1], 0.75 * w_a[-1] @ previous + 0.25 * w_b[-1],
                                   **TIGHT)
        np.testing.assert_allclose(fused_b[-1], 0.75 * b_a[-1] + 0.25 * b_b[-1], **TIGHT)


# --------------------------------------------------------------------------------------
# Marginals.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
@pytest.mark.parametrize("importance", [None, "l1", "l2"])
@pytest.mark.parametrize("widths_a", [[6, 9, 7, 3], [6, 14, 11, 3]])
def test_plans_respect_marginals(solver, importance, widths_a):
    rng = np.random.default_rng(12)
    w_a, b_a = random_mlp(rng, widths_a, with_bias=True)
    w_b, b_b = random_mlp(rng, [6, 9, 7, 3], with_bias=True)
    fused_w, _, plans = ref.fuse_reference(
        w_a, w_b, biases_a=b_a, biases_b=b_b, solver=solver, reg=0.05,
        importance=importance, proper_marginals=True, ensemble_step=0.0)
    tol = {"rtol": 0, "atol": 1e-9 if solver == "exact" else 1e-6}
    for layer, plan in enumerate(plans):
        is_last = layer == len(plans) - 1
        if importance is None or is_last:
            mu = np.full(w_a[layer].shape[0], 1 / w_a[layer].shape[0])
            nu = np.full(w_b[layer].shape[0], 1 / w_b[layer].shape[0])
        else:
            order = 1 if importance == "l1" else 2
            mu = np.linalg.norm(w_a[layer], ord=order, axis=1) + 1e-9
            nu = np.linalg.norm(w_b[layer], ord=order, axis=1) + 1e-9
            mu, nu = mu / mu.sum(), nu / nu.sum()
        assert plan.shape == (w_a[layer].shape[0], w_b[layer].shape[0])
        assert np.all(plan >= 0)
        np.testing.assert_allclose(plan.sum(axis=1), mu, **tol)
        np.testing.assert_allclose(plan.sum(axis=0), nu, **tol)
        corrected = ref.correct_plan(plan, proper_marginals=True)
        np.testing.assert_allclose(corrected.sum(axis=0), 1.0, **TIGHT)
    # With s = 0, every fused row is a barycentric combination of aligned A's rows.
    expected = manual_fusion(w_a, w_b, plans, s=0.0,
                             correct=lambda t: t / t.sum(axis=0, keepdims=True))
    assert_lists_close(fused_w, expected)


# --------------------------------------------------------------------------------------
# Different widths.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("proper_marginals", [False, True])
@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
@pytest.mark.parametrize("mode", ["weights", "activations"])
def test_wider_mlp_fuses_into_b_shapes(mode, solver, proper_marginals):
    rng = np.random.default_rng(13)
    w_a, b_a = random_mlp(rng, [6, 16, 12, 3], with_bias=True)
    w_b, b_b = random_mlp(rng, [6, 8, 5, 3], with_bias=True)
    x = rng.normal(size=(20, 6))
    fused_w, fused_b, plans = ref.fuse_reference(
        w_a, w_b, biases_a=b_a, biases_b=b_b, mode=mode, solver=solver, reg=0.05,
        normalize_cost="max",  # activation costs are large: keep reg meaningful
        acts_a=ref.forward_mlp(w_a, b_a, x), acts_b=ref.forward_mlp(w_b, b_b, x),
        proper_marginals=proper_marginals)
    assert [w.shape for w in fused_w] == [w.shape for w in w_b]
    assert [b.shape for b in fused_b] == [b.shape for b in b_b]
    assert [p.shape for p in plans] == [(16, 8), (12, 5), (3, 3)]
    for plan in plans:  # uniform marginals: both corrections give unit column sums
        corrected = ref.correct_plan(plan, proper_marginals=proper_marginals)
        np.testing.assert_allclose(corrected.sum(axis=0), 1.0, rtol=0, atol=1e-6)
    assert all(np.all(np.isfinite(w)) for w in fused_w)


@pytest.mark.parametrize("mode", ["weights", "activations"])
def test_wider_cnn_fuses_into_b_shapes(mode):
    rng = np.random.default_rng(14)
    ch_a, ch_b = [3, 10, 8], [3, 5, 4]
    w_a, b_a = random_cnn(rng, ch_a, hidden=12, n_out=3, with_bias=True)
    w_b, b_b = random_cnn(rng, ch_b, hidden=6, n_out=3, with_bias=True)
    x = rng.normal(size=(5, 3, 8, 8))
    fused_w, fused_b, plans = ref.fuse_reference(
        w_a, w_b, biases_a=b_a, biases_b=b_b, mode=mode,
        acts_a=ref.forward_cnn(w_a, b_a, x, pool_after=CNN_POOL_AFTER),
        acts_b=ref.forward_cnn(w_b, b_b, x, pool_after=CNN_POOL_AFTER),
        flatten_shapes=cnn_flatten(ch_b))
    assert [w.shape for w in fused_w] == [w.shape for w in w_b]
    assert [b.shape for b in fused_b] == [b.shape for b in b_b]
    assert [p.shape for p in plans] == [(10, 5), (8, 4), (12, 6), (3, 3)]
    expected = manual_fusion(w_a, w_b, plans, s=0.5, correct=lambda t: t * t.shape[1],
                             flatten_shapes=cnn_flatten(ch_b))
    assert_lists_close(fused_w, expected)


def test_bad_inputs_are_rejected():
    rng = np.random.default_rng(15)
    w, _ = random_mlp(rng, [4, 5, 3], with_bias=False)
    with pytest.raises(ValueError):
        ref.fuse_reference(w, w, mode="acts")
    with pytest.raises(ValueError):
        ref.fuse_reference(w, w, mode="activations")
    with pytest.raises(ValueError):
        ref.fuse_reference(w, w, biases_a=[np.zeros(5), np.zeros(3)])
    channels = [3, 4, 4]
    w_c, _ = random_cnn(rng, channels, hidden=5, n_out=2, with_bias=False)
    with pytest.raises(ValueError, match="flatten_shapes"):
        ref.fuse_reference(w_c, w_c)
