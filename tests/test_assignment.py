"""The host assignment solvers (scipy, lapjv) behind ``ot.assignment`` and the "auto" backend's choice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from otfusion_jax import ot

pytest.importorskip("lapjv")

_host = {s: jax.jit(lambda c, s=s: ot.exact_assignment_host(c, s)) for s in ("scipy", "lapjv")}


def _optimum(cost):
    r, c = linear_sum_assignment(cost)
    return float(cost[r, c].sum())


def _total(cost, perm):
    return float(cost[np.asarray(perm), np.arange(len(perm))].sum())


@settings(max_examples=30, deadline=None)
@given(n=st.sampled_from((1, 2, 5, 16, 40)), top=st.integers(0, 30), seed=st.integers(0, 2**16))
def test_lapjv_reaches_the_optimum_also_with_ties(n, top, seed):
    """Small integer costs (many ties): lapjv's assignment is a permutation of optimal total cost."""
    cost = np.random.default_rng(seed).integers(0, top + 1, (n, n)).astype(np.float32)
    plan, perm, info = _host["lapjv"](jnp.asarray(cost))
    assert sorted(np.asarray(perm).tolist()) == list(range(n))
    assert _total(cost, perm) == _optimum(cost)
    expected = np.zeros((n, n), np.float32)
    expected[np.asarray(perm), np.arange(n)] = 1.0 / n
    np.testing.assert_array_equal(np.asarray(plan), expected)
    assert bool(info.converged)


@pytest.mark.parametrize("n,d", [(64, 8), (300, 64)])
def test_lapjv_equals_scipy_without_ties(n, d):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    cost = jnp.asarray(np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1)), jnp.float32)
    _, perm_s, _ = _host["scipy"](cost)
    _, perm_l, _ = _host["lapjv"](cost)
    np.testing.assert_array_equal(np.asarray(perm_l), np.asarray(perm_s))
    batched = jax.vmap(lambda c: ot.exact_assignment_host(c, "lapjv")[1])(jnp.stack([cost, cost[::-1]]))
    np.testing.assert_array_equal(np.asarray(batched[0]), np.asarray(perm_s))
    np.testing.assert_array_equal(np.asarray(batched[1]), np.asarray(_host["scipy"](cost[::-1])[1]))


def test_auto_picks_lapjv_on_a_cpu_when_installed_and_native_unavailable(monkeypatch):
    assert jax.default_backend() == "cpu"
    monkeypatch.setattr(ot.native, "available", lambda: False)
    assert ot.resolve_backend("auto") == "lapjv" and ot.resolve_backend("host") == "host"
    monkeypatch.setattr(ot, "has_lapjv", lambda: False)
    assert ot.resolve_backend("auto") == "host"
    with pytest.raises(ValueError, match=r"otfusion-jax\[fast\]"):
        ot.resolve_backend("lapjv")
