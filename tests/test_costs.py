"""Ground costs read in the stored layout (``ot.pairwise_cost_columns``): accuracy, unit norms, vmap, grad, no copies."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from otfusion_jax import ot


@pytest.fixture(params=["cond", "always-centred"])
def centring(request, monkeypatch):
    """Both code paths on small tensors: the data-dependent ``lax.cond`` (forced) and the unconditional centring."""
    if request.param == "cond":
        monkeypatch.setattr(ot, "CENTER_ALWAYS_BELOW", 0)
    return request.param


def _rows(tensors):
    return np.concatenate([np.moveaxis(t, -1, 0).reshape(t.shape[-1], -1) for t in tensors], axis=1).astype(np.float64)


def _exact(xs, ys, metric="euclidean", squared=False, unit_norm=False):
    xr, yr = _rows(xs), _rows(ys)
    if metric == "cosine":
        unit = lambda r: r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
        return 1.0 - unit(xr) @ unit(yr).T
    if unit_norm:
        xr = xr / np.maximum(np.linalg.norm(xr, axis=1, keepdims=True), 1e-12)
        yr = yr / np.maximum(np.linalg.norm(yr, axis=1, keepdims=True), 1e-12)
    sq = ((xr[:, None] - yr[None]) ** 2).sum(-1)
    return sq if squared else np.sqrt(sq)


def _kernel_and_bias(rng, n, offset, spread=1.0):
    """An HWIO kernel (3, 3, 16, n) and a bias (n,), the neurons on the last axis."""
    return [rng.normal(offset, spread, (3, 3, 16, n)).astype(np.float32), rng.normal(offset, spread, (n,)).astype(np.float32)]


@pytest.mark.parametrize("offset", [0.0, 0.3, 1.0, 50.0])
@pytest.mark.parametrize("unit_norm", [False, True])
@pytest.mark.parametrize("squared", [False, True])
def test_kernel_columns_match_float64_rows(offset, unit_norm, squared, centring):
    """Small relative errors whatever the offset: large offsets take the centred branch."""
    rng = np.random.default_rng(int(offset * 10) + 2 * unit_norm + squared)
    xs, ys = _kernel_and_bias(rng, 20, offset), _kernel_and_bias(rng, 24, offset)
    got = np.asarray(jax.jit(lambda a, b: ot.pairwise_cost_columns(a, b, squared=squared, unit_norm=unit_norm))(xs, ys))
    want = _exact(xs, ys, squared=squared, unit_norm=unit_norm)
    assert got.shape == (20, 24)
    np.testing.assert_allclose(got, want, rtol=2e-6 if squared else 1e-6)
    # pairwise_cost on the rows is the same function
    rows = ot.pairwise_cost(jnp.asarray(_rows(xs), jnp.float32), jnp.asarray(_rows(ys), jnp.float32),
                            squared=squared, unit_norm=unit_norm)
    np.testing.assert_allclose(got, np.asarray(rows), rtol=2e-6)


def test_expansion_without_centring_would_cancel(monkeypatch):
    """The case the centring exists for: without it the float32 expansion is orders of magnitude off."""
    monkeypatch.setattr(ot, "CENTER_ALWAYS_BELOW", 0)  # the cond must pick the centred branch
    rng = np.random.default_rng(0)
    xs, ys = _kernel_and_bias(rng, 20, 50.0), _kernel_and_bias(rng, 24, 50.0)
    want = _exact(xs, ys)
    got = np.asarray(ot.pairwise_cost_columns(xs, ys))
    assert np.max(np.abs(got - want) / want) < 1e-6
    flat = [np.concatenate([x.reshape(-1, x.shape[-1]) for x in t]) for t in (xs, ys)]
    g = flat[0].T @ flat[1]
    plain = (flat[0] ** 2).sum(0)[:, None] + (flat[1] ** 2).sum(0)[None] - 2 * g
    assert np.max(np.abs(np.sqrt(np.maximum(plain, 0)) - want) / want) > 1e-5


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_cosine_and_unit_norm(metric, centring):
    rng = np.random.default_rng(1)
    xs, ys = _kernel_and_bias(rng, 7, 0.2), _kernel_and_bias(rng, 9, 0.2)
    got = np.asarray(ot.pairwise_cost_columns(xs, ys, metric, unit_norm=True))
    np.testing.assert_allclose(got, _exact(xs, ys, metric, unit_norm=True), rtol=1e-5, atol=1e-6)


def test_zero_neurons_are_finite(centring):
    x = np.zeros((3, 3, 4, 5), np.float32)
    y = np.random.default_rng(2).normal(size=(3, 3, 4, 6)).astype(np.float32)
    for unit_norm in (False, True):
        for metric in ("euclidean", "cosine"):
            c = np.asarray(ot.pairwise_cost_columns([x], [y], metric, unit_norm=unit_norm))
            assert np.all(np.isfinite(c))


@pytest.mark.slow
def test_vmap_mixes_branches(centring):
    """Under vmap the predicate is batched (both branches run, a select picks): each item as unbatched."""
    rng = np.random.default_rng(3)
    x = np.stack([rng.normal(o, 1, (3, 3, 8, 10)) for o in (0.0, 50.0)]).astype(np.float32)
    y = np.stack([rng.normal(o, 1, (3, 3, 8, 12)) for o in (0.0, 50.0)]).astype(np.float32)
    batched = np.asarray(jax.vmap(lambda a, b: ot.pairwise_cost_columns([a], [b]))(x, y))
    for i in range(2):
        np.testing.assert_allclose(batched[i], np.asarray(ot.pairwise_cost_columns([x[i]], [y[i]])), rtol=1e-6)
        np.testing.assert_allclose(batched[i], _exact([x[i]], [y[i]]), rtol=1e-6)


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_gradients_match_float64(offset, centring):
    rng = np.random.default_rng(4)
    x = rng.normal(offset, 1, (2, 2, 3, 5))
    y = rng.normal(offset, 1, (2, 2, 3, 4))
    w = rng.normal(size=(5, 4))

    def loss(a):
        return jnp.sum(ot.pairwise_cost_columns([a], [jnp.asarray(y, jnp.float32)]) * w)

    got = np.asarray(jax.grad(loss)(jnp.asarray(x, jnp.float32)))
    xr, yr = _rows([x]), _rows([y])
    diff = xr[:, None] - yr[None]  # (n, m, d)
    dist = np.sqrt((diff**2).sum(-1))
    want_rows = ((w / dist)[..., None] * diff).sum(1)  # (n, d)
    want = np.moveaxis(want_rows.reshape(5, 2, 2, 3), 0, -1)
    np.testing.assert_allclose(got, want, rtol=2e-3 if offset else 1e-4, atol=1e-4)


def test_large_costs_take_the_conditional():
    """Above ``CENTER_ALWAYS_BELOW`` values the centring is a conditional; below, there is none."""
    small = [jnp.zeros((3, 3, 8, 16))]
    large = [jnp.zeros((ot.CENTER_ALWAYS_BELOW // 32, 16))]
    hlo = lambda xs: jax.jit(lambda a: ot.pairwise_cost_columns(a, a)).lower(xs).compile().as_text()
    assert " conditional(" in hlo(large)
    assert " conditional(" not in hlo(small)


def test_kernels_are_read_in_their_stored_layout(centring):
    """No transposes or copies of the kernels in the compiled cost (the Gram contracts the leading axes)."""
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.normal(size=(3, 3, 64, 128)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(3, 3, 64, 128)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(128,)), jnp.float32)
    hlo = jax.jit(lambda a, b, c: ot.pairwise_cost_columns([a, c], [b, c], unit_norm=True)).lower(a, b, bias).compile().as_text()
    ops = set(re.findall(r"= \S+ (\w+)\(", hlo))
    assert "dot" in ops
    assert not {"transpose", "copy"} & ops, sorted(ops)


def test_correlation_is_one_minus_pearson_over_every_value_of_a_neuron():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((5, 3, 4)) + 3.0, rng.standard_normal((7, 4)) * 2]  # two tensors, 22 values a neuron
    ys = [rng.standard_normal((5, 3, 6)), rng.standard_normal((7, 6)) - 1.0]
    cost = ot.pairwise_cost_columns([jnp.asarray(x, jnp.float32) for x in xs],
                                    [jnp.asarray(y, jnp.float32) for y in ys], "correlation")
    rows_x = np.concatenate([x.reshape(-1, 4) for x in xs]).T  # (4, 22)
    rows_y = np.concatenate([y.reshape(-1, 6) for y in ys]).T
    want = 1.0 - np.corrcoef(rows_x, rows_y)[:4, 4:]
    np.testing.assert_allclose(np.asarray(cost), want, atol=1e-5)
    # invariant to a neuron's offset and scale: what correlation matching is for
    shifted = [jnp.asarray(x * 5.0 - 7.0, jnp.float32) for x in xs]
    np.testing.assert_allclose(np.asarray(ot.pairwise_cost_columns(shifted, [jnp.asarray(y, jnp.float32) for y in ys],
                                                                   "correlation")), want, atol=1e-5)
