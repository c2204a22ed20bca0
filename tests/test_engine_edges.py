"""Engine edge cases found in review: averaging weights, the barycentre with zero weights, align == fuse."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import otfusion_jax as otf
from otfusion_jax import experiment
from otfusion_jax.models import build, init

from fusion_helpers import max_abs_diff

SHAPE = (4, 4, 1)


def _mlp(widths, seed):
    model, spec = build("mlpnet", input_shape=SHAPE, num_classes=5, widths=widths, bias=True)
    return model, spec, init(model, jax.random.key(seed), SHAPE)


def test_bad_averaging_weights_are_refused_before_jit():
    _, spec, a = _mlp((8, 6), 0)
    _, _, b = _mlp((8, 6), 1)
    for bad in ((1.5, -0.5), (0.0, 0.0), (1.0, 2.0, 3.0)):
        with pytest.raises(otf.FusionError, match="weights"):
            otf.fuse([a, b], spec, otf.FusionConfig(exact_backend="host"), weights=bad)


@pytest.mark.slow
def test_align_parents_then_average_is_fuse_also_for_the_weighted_barycentre():
    _, spec, a = _mlp((8, 6), 0)
    parents = [a] + [_mlp((8, 6), s)[2] for s in (1, 2)]
    cfg, w = otf.FusionConfig(exact_backend="host"), (0.2, 0.3, 0.5)
    fused, aux = otf.fuse(parents, spec, cfg, weights=w, iterations=4)
    aligned, aux_a = otf.align_parents(parents, spec, cfg, weights=w, iterations=4)
    assert max_abs_diff(otf.engine.weighted_sum(aligned, aux_a.weights), fused) < 1e-6
    np.testing.assert_allclose(aux_a.weights, np.asarray(w), rtol=1e-6)
    assert int(aux.iterations) == int(aux_a.iterations)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_barycentre_with_a_zero_weight_stays_finite(solver):
    """ensemble weights (0, 1): the others' mean of the target is the other parent alone, not 0 / 0."""
    model, spec, a = _mlp((8, 6), 0)
    _, _, b = _mlp((8, 6), 1)
    cfg = otf.FusionConfig(solver=solver, exact_backend="host", relative_epsilon="mean", epsilon=0.05)
    fused, _ = otf.fuse([a, b], spec, cfg, weights=otf.ensemble_weights(1.0), iterations=3)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(fused))
    if solver == "exact":  # all the weight on the target: the target, up to a permutation of its neurons
        x = jax.random.normal(jax.random.key(1), (16, *SHAPE))
        np.testing.assert_allclose(model.apply(fused, x), model.apply(b, x), atol=1e-5)


@pytest.mark.slow
def test_many_parents_of_different_widths_get_the_ot_barycentre():
    """The default many-parent row (the recommended method: for MLPs of different widths, which CCA Merge cannot
    fuse, the activation barycentre + the least-squares refit) takes any widths; weight matching's barycentre needs equal widths: asked
    for, the driver falls back to OTFusion's."""
    parents = []
    for k, widths in enumerate(((12, 8), (16, 10), (12, 8))):
        module, spec, v = _mlp(widths, k)
        parents.append(experiment.Parent(f"parent {k}", module, v))
    x = np.asarray(jax.random.normal(jax.random.key(0), (64, *SHAPE)), np.float32)
    y = np.arange(64) % 5
    ds = otf.data.Dataset("toy", "test", x, y.astype(np.int32), x, y.astype(np.int32), 5)
    for many, want in (
        ("recommended", "recommended: OT fusion (activations, exact, post-ReLU correlation), barycentre (<= 10 rounds)"),
        ("wm-many", "OT fusion (weights, exact), barycentre (<= 10 rounds)"),
    ):
        exp = experiment.ExperimentConfig(method="ot-weights", plots=False, num_samples=32, many_method=many)
        rows, fused = experiment.run_fusion_table(parents, spec, ds, experiment.Settings(experiment=exp))
        labels = [r["method"] for r in rows]
        assert want in labels and (f"{want} + refit" in labels) == (many == "recommended"), labels
        assert not any(lab.startswith("weight matching") for lab in labels)
        assert all(r["accuracy"] is not None for r in rows if r["method"].startswith(want)), rows
