"""REPAIR: fixed point on identical parents, statistics matched to the interpolated targets, errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import otfusion_jax as otf
from otfusion_jax import matching, refit, repair
from otfusion_jax import spec as spec_lib
from otfusion_jax.models import build, capture_activations, init, recompute_batch_stats

from fusion_helpers import random_variables

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SHAPE = (4, 4, 1)


def _max_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )


def _mlp(bias=True, widths=(24, 16, 12)):
    return build("mlpnet", input_shape=SHAPE, num_classes=5, widths=widths, bias=bias)


def _samples(shape, n=256, seed=7):
    return jax.random.normal(jax.random.key(seed), (n, *shape))


def _assert_stats_match(model, repaired, parents_aligned, x, plans, weights, mean_atol, std_rtol):
    got = repair.preactivation_stats(model, repaired, x)
    want = repair.target_stats(model, parents_aligned, x, weights=weights)
    for name in plans:
        scale = float(jnp.max(want[name][1]))
        np.testing.assert_allclose(got[name][0], want[name][0], atol=mean_atol * scale, err_msg=name)
        np.testing.assert_allclose(got[name][1], want[name][1], rtol=std_rtol, err_msg=name)


def test_identical_parents_are_a_fixed_point_mlp():
    model, spec = _mlp()
    a = init(model, jax.random.key(0), SHAPE)
    out = repair.repair(model, a, [a, a], spec, _samples(SHAPE))
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(a)
    assert _max_diff(out, a) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_mlp_statistics_match_the_interpolated_targets(alpha):
    model, spec = _mlp()
    a = init(model, jax.random.key(1), SHAPE)
    b = init(model, jax.random.key(2), SHAPE)
    x = _samples(SHAPE)
    weights = [1 - alpha, alpha]
    fused, aux = otf.fuse([a, b], spec, matching.WeightMatching(), weights=weights)
    aligned, _ = otf.align_parents([a, b], spec, matching.WeightMatching())
    assert _max_diff(otf.engine.weighted_sum(aligned, aux.weights), fused) < 1e-6  # fuse = align, then average
    hidden = [p for p in spec.plans if p != spec.output_plan]
    before = repair.preactivation_stats(model, fused, x)
    target = repair.target_stats(model, aligned, x, weights=weights)
    assert any(float(jnp.max(jnp.abs(before[p][1] / target[p][1] - 1))) > 0.1 for p in hidden)  # collapse
    out = repair.repair(model, fused, aligned, spec, x, weights=weights)
    _assert_stats_match(model, out, aligned, x, hidden, weights, mean_atol=1e-4, std_rtol=1e-4)
    flat_out, flat_f = spec_lib.flatten_paths(out), spec_lib.flatten_paths(fused)
    for path in ("params/fc4/kernel", "params/fc4/bias"):  # the output layer is left alone
        np.testing.assert_array_equal(flat_out[path], flat_f[path])


def test_include_output_corrects_the_logits_too():
    model, spec = _mlp()
    a, b = (init(model, jax.random.key(k), SHAPE) for k in (3, 4))
    x = _samples(SHAPE)
    fused = otf.vanilla_average([a, b])
    out = repair.repair(model, fused, [a, b], spec, x, include_output=True)
    _assert_stats_match(model, out, [a, b], x, spec.plans, None, mean_atol=1e-4, std_rtol=1e-4)


def test_bias_free_model_needs_biases_then_works():
    model, spec = _mlp(bias=False)
    model_b, spec_b = _mlp(bias=True)
    a, b = (init(model, jax.random.key(k), SHAPE) for k in (5, 6))
    x = _samples(SHAPE)
    fused = otf.vanilla_average([a, b])
    with pytest.raises(ValueError, match="add_zero_biases"):
        repair.repair(model, fused, [a, b], spec, x)
    fused_b, a_b, b_b = (repair.add_zero_biases(v, spec_b) for v in (fused, a, b))
    np.testing.assert_allclose(model_b.apply(fused_b, x), model.apply(fused, x), atol=1e-6)
    out = repair.repair(model_b, fused_b, [a_b, b_b], spec_b, x)
    hidden = [p for p in spec_b.plans if p != spec_b.output_plan]
    _assert_stats_match(model_b, out, [a_b, b_b], x, hidden, None, mean_atol=1e-4, std_rtol=1e-4)


def test_residual_streams_without_batchnorm_list_every_producer_and_need_biases():
    model, spec = build("resnet18", input_shape=(16, 16, 3), width=0.125, bias=True, norm=False)
    shapes = jax.eval_shape(lambda: init(model, jax.random.key(0), (16, 16, 3)))
    layers = repair.check_repairable(spec, shapes)
    assert [k for k, _ in layers["res2"]] == spec.producers("res2", ("weight",)) and len(layers["res2"]) == 3
    assert layers["layer2_0_conv1"] == (("params/layer2_0/conv1/kernel", "params/layer2_0/conv1/bias"),)
    bare, bare_spec = build("resnet18", input_shape=(16, 16, 3), width=0.125, bias=False, norm=False)
    with pytest.raises(ValueError, match="needs a bias on the layer producing plan 'res1'"):
        repair.check_repairable(bare_spec, jax.eval_shape(lambda: init(bare, jax.random.key(0), (16, 16, 3))))


def _bn_parent(model, shape, seed, x):
    """Random init with random positive BN scales and random BN biases, statistics computed on x."""
    v = init(model, jax.random.key(seed), shape)
    flat = spec_lib.flatten_paths(v)
    rng = np.random.default_rng(seed)
    for path in flat:
        if path.startswith("params/bn") and path.endswith("/scale"):
            flat[path] = jnp.asarray(rng.uniform(0.5, 2.0, flat[path].shape), jnp.float32)
        elif path.startswith("params/bn") and path.endswith("/bias"):
            flat[path] = jnp.asarray(rng.normal(0.0, 0.5, flat[path].shape), jnp.float32)
    return recompute_batch_stats(model, spec_lib.unflatten_paths(flat), x)


@pytest.mark.slow
def test_batchnorm_model_identity_and_statistics():
    """VGG11 with BN: REPAIR resets the statistics; BN outputs then have the interpolated mean/std."""
    shape = (32, 32, 3)
    model, spec = build("vgg11", input_shape=shape, width=0.125, bias=True, norm=True)
    x = _samples(shape, n=64)
    a, b = _bn_parent(model, shape, 0, x), _bn_parent(model, shape, 1, x)
    # Identical pair: statistics already describe x, nothing changes.
    assert _max_diff(repair.repair(model, a, [a, a], spec, x), a) < 1e-5
    fused = otf.vanilla_average([a, b])
    out = repair.repair(model, fused, [a, b], spec, x)
    assert _max_diff(out["params"], fused["params"]) == 0.0
    hidden = [p for p in spec.plans if p != spec.output_plan]
    _assert_stats_match(model, out, [a, b], x, hidden, None, mean_atol=1e-5, std_rtol=1e-3)


@pytest.mark.slow
def test_the_recommended_method_corrects_resnets_and_says_why_when_repair_fails(monkeypatch):
    """A pair of BatchNorm-free ResNets (residual streams) gets the recommended method's least-squares refit,
    three with BatchNorm its REPAIR; where REPAIR raises, the method's own REPAIR row says why and the run goes on,
    while with experiment.repair asked for it is an error."""
    from otfusion_jax import data as data_lib  # noqa: PLC0415
    from otfusion_jax import experiment  # noqa: PLC0415

    x = np.asarray(jax.random.normal(jax.random.key(5), (12, 16, 16, 3)))
    y = np.arange(12) % 3
    ds = data_lib.Dataset("cifar10", "tfds", x[:8], y[:8], x[8:], y[8:], 3)
    exp = experiment.ExperimentConfig(method="recommended", num_samples=4, many_method="")
    settings_ = experiment.Settings(exp, refit=refit.RefitConfig(num_samples=8))
    rows = {}
    for norm, k in ((False, 2), (True, 3)):
        model, spec = build("resnet18", input_shape=(16, 16, 3), num_classes=3, width=0.0625, bias=False, norm=norm)
        parents = [experiment.Parent(f"parent {i}", model, init(model, jax.random.key(i), (16, 16, 3))) for i in range(k)]
        rows[norm] = (parents, spec, experiment.run_fusion_table(parents, spec, ds, settings_)[0])
    labels = [r["method"] for r in rows[False][2] if r["method"].startswith("recommended")]
    assert labels[0].startswith("recommended: OT fusion (activations, sinkhorn") and labels[1:] == [f"{labels[0]} + refit"]
    assert rows[False][2][-1]["accuracy"] is not None
    row = next(r for r in rows[True][2] if r["method"].endswith("+ REPAIR"))
    assert row["method"].startswith("recommended: OT fusion (activations, sinkhorn") and row["accuracy"] is not None

    def refuse(*args, **kwargs):
        raise ValueError("REPAIR: cannot (a test's refusal)")

    monkeypatch.setattr(experiment, "repair_fused", refuse)
    parents, spec, _ = rows[True]
    table, _ = experiment.run_fusion_table(parents, spec, ds, settings_)
    row = next(r for r in table if r["method"].endswith("+ REPAIR"))
    assert row["accuracy"] is None and "a test's refusal" in row["note"]
    with pytest.raises(ValueError, match="a test's refusal"):
        experiment.run_fusion_table(parents, spec, ds, experiment.Settings(dataclasses.replace(exp, repair=True)))


@pytest.mark.slow
def test_repair_of_residual_streams_gives_every_sum_its_target_statistics():
    """A BatchNorm-free ResNet18: every block's inner units and the logits reach the interpolated statistics of the
    aligned parents, and so does every stream sum (found by probing) except the channels where the skip
    connection alone carries more variance than the target: those keep more, never less."""
    model, spec = build("resnet18", input_shape=(16, 16, 1), num_classes=4, width=0.0625, bias=False, norm=False)
    a, b = random_variables(model, (16, 16, 1), 0), random_variables(model, (16, 16, 1), 1)
    x = jax.random.normal(jax.random.key(2), (24, 16, 16, 1))
    acts = [capture_activations(model, v, x) for v in (a, b)]
    aligned, aux = otf.align_parents([a, b], spec, otf.FusionConfig(mode="activations"), activations=acts)
    fused = otf.engine.weighted_sum(aligned, aux.weights)
    spec_b = spec_lib.with_biases(spec)
    model_b = model.clone(use_bias=True)
    fused_b, aligned_b = repair.add_zero_biases(fused, spec_b), [repair.add_zero_biases(v, spec_b) for v in aligned]
    assert repair.stream_sums(model_b, fused_b, spec_b, "res2", x) == (
        ("params/layer2_0/conv2/kernel", "params/layer2_0/shortcut_conv/kernel"), ("params/layer2_1/conv2/kernel",))
    repaired = repair.repair(model_b, fused_b, aligned_b, spec_b, x, include_output=True)
    want = repair.target_stats(model_b, aligned_b, x)
    got = repair.preactivation_stats(model_b, repaired, x)
    before = repair.preactivation_stats(model_b, fused_b, x)
    assert float(jnp.max(jnp.abs(before["res4"][1] / want["res4"][1] - 1))) > 0.1  # there was something to repair
    for plan in spec.plans:
        np.testing.assert_allclose(np.asarray(got[plan][0]), np.asarray(want[plan][0]), atol=2e-3, err_msg=plan)
        g, w = np.asarray(got[plan][1]), np.asarray(want[plan][1])
        if not plan.startswith("res"):
            np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-3, err_msg=plan)
            continue
        ok = np.isclose(g, w, rtol=2e-3, atol=2e-3)
        assert ok.mean() > 0.9 and np.all(g[~ok] > w[~ok]), (plan, ok.mean())


@pytest.mark.parametrize("name,opts,k,expected,correction", [
    ("vgg11", dict(width=0.0625, bias=False, norm=False), 3, "recommended: CCA Merge (post-ReLU", "refit"),
    ("vgg11", dict(width=0.0625, bias=False, norm=False), 2, "recommended: OT fusion (activations, sinkhorn 0.2", "refit"),
    ("vgg11", dict(width=0.0625, bias=False, norm=True), 2, "recommended: OT fusion (activations, sinkhorn 0.2", "refit"),
    ("vgg11", dict(width=0.0625, bias=False, norm=True), 3, "recommended: OT fusion (activations, sinkhorn 0.2", "REPAIR"),
    ("resnet18", dict(width=0.0625, bias=False, norm=True), 2, "recommended: OT fusion (activations, sinkhorn 0.2",
     "refit"),
    ("resnet18", dict(width=0.0625, bias=False, norm=False), 3, "recommended: OT fusion (activations, sinkhorn 0.2",
     "REPAIR"),
    ("mlpnet", dict(widths=(16, 8), bias=False), 2, "recommended: OT fusion (weights, sinkhorn 0.05", "refit"),
    ("mlpnet", dict(widths=(16, 8), bias=False), 3, "recommended: CCA Merge (post-ReLU", "refit"),
])
def test_the_recommended_method_by_architecture_and_number_of_parents(name, opts, k, expected, correction, monkeypatch):
    """More than two parents without BatchNorm or residual streams: CCA Merge + the refit; pairs: OT with Sinkhorn
    (MLPs by weights, conv nets by activations) + the refit, BatchNorm or not; more than two ResNets or BatchNorm
    nets: + REPAIR that corrects the logits too (each chosen on held-out images), although experiment.repair,
    repair_output and refit are off."""
    from otfusion_jax import data as data_lib  # noqa: PLC0415
    from otfusion_jax import experiment  # noqa: PLC0415

    asked = []
    real = experiment.repair_fused
    monkeypatch.setattr(experiment, "repair_fused", lambda *a, **kw: asked.append(a[-1]) or real(*a, **kw))

    shape = (32, 32, 1)
    model, spec = build(name, input_shape=shape, num_classes=3, **opts)
    parents = [experiment.Parent(f"parent {i}", model, init(model, jax.random.key(i), shape)) for i in range(k)]
    x = np.asarray(jax.random.normal(jax.random.key(5), (12, *shape)))
    y = np.arange(12) % 3
    ds = data_lib.Dataset("fashion_mnist", "idx", x[:8], y[:8], x[8:], y[8:], 3)
    exp = experiment.ExperimentConfig(method="recommended", num_samples=4, many_method="")
    rows, _ = experiment.run_fusion_table(parents, spec, ds, experiment.Settings(exp))
    labels = [r["method"] for r in rows if r["method"].startswith("recommended")]
    assert len(labels) == 2 and labels[0].startswith(expected) and labels[1] == f"{labels[0]} + {correction}", labels
    if correction == "REPAIR":
        assert asked and all(asked), asked  # include_output: the logits are REPAIRed too
    else:
        assert not asked
    assert rows[-1]["method"] == labels[1] and rows[-1]["accuracy"] is not None, rows[-1]  # and the correction ran


def test_repair_fused_with_the_logits_gives_every_layer_its_target_statistics():
    """The driver's REPAIR of a bias-free model (zero biases added) with include_output: hidden units and logits."""
    from otfusion_jax import experiment  # noqa: PLC0415

    model, spec = _mlp(bias=False)
    a, b = (init(model, jax.random.key(k), SHAPE) for k in (11, 12))
    x = _samples(SHAPE)
    fused = otf.vanilla_average([a, b])
    _, spec_b = _mlp(bias=True)
    aligned_b = [repair.add_zero_biases(v, spec_b) for v in (a, b)]
    for include_output in (False, True):
        module_r, out = experiment.repair_fused(model, spec, fused, [a, b], x, None, include_output)
        _assert_stats_match(module_r, out, aligned_b, x, [p for p in spec.plans if p != spec.output_plan], None,
                            mean_atol=1e-4, std_rtol=1e-3)
        logits = [spec.output_plan]
        if include_output:
            _assert_stats_match(module_r, out, aligned_b, x, logits, None, mean_atol=1e-4, std_rtol=1e-3)
        else:
            with pytest.raises(AssertionError):
                _assert_stats_match(module_r, out, aligned_b, x, logits, None, mean_atol=1e-4, std_rtol=1e-3)


def test_batchnorm_models_reset_their_statistics_then_correct_the_logits():
    """With BatchNorm, REPAIR resets the statistics; include_output then also gives the logits the parents'
    interpolated statistics (the class layer needs a bias, which the driver adds: repair_fused)."""
    from otfusion_jax import experiment  # noqa: PLC0415

    shape = (32, 32, 1)
    model, spec = build("vgg11", input_shape=shape, num_classes=4, width=0.0625, bias=False, norm=True)
    a, b = (init(model, jax.random.key(k), shape) for k in (21, 22))
    x = _samples(shape, n=32)
    fused = otf.vanilla_average([a, b])
    _, plain = experiment.repair_fused(model, spec, fused, [a, b], x)
    np.testing.assert_array_equal(  # statistics reset, weights untouched
        spec_lib.flatten_paths(plain)["params/fc/kernel"], spec_lib.flatten_paths(fused)["params/fc/kernel"]
    )
    module_r, out = experiment.repair_fused(model, spec, fused, [a, b], x, None, True)
    spec_b = spec_lib.with_biases(spec)
    aligned_b = [repair.add_zero_biases(v, spec_b) for v in (a, b)]
    _assert_stats_match(module_r, out, aligned_b, x, [spec.output_plan], None, mean_atol=1e-4, std_rtol=1e-3)
    flat, flat_plain = spec_lib.flatten_paths(out), spec_lib.flatten_paths(plain)
    for path, stat in flat_plain.items():  # the same reset statistics as without the logits' correction
        if path.startswith("batch_stats/"):
            np.testing.assert_allclose(flat[path], stat, rtol=1e-5, atol=1e-6, err_msg=path)


@pytest.mark.slow
def test_repair_of_a_resnet_fused_with_its_permuted_copy_changes_nothing():
    """A BatchNorm-free ResNet18 fused with a permuted copy of itself is the model; REPAIR (streams and logits
    included) then has nothing to correct: every sum keeps a = 1 and b = 0, every layer scale 1 and shift 0."""
    from fusion_helpers import permuted_copy  # noqa: PLC0415

    model, spec = build("resnet18", input_shape=(16, 16, 1), num_classes=4, width=0.0625, bias=True, norm=False)
    v = random_variables(model, (16, 16, 1), 3)
    copy = permuted_copy(v, spec, 4)
    x = jax.random.normal(jax.random.key(5), (24, 16, 16, 1))
    acts = [capture_activations(model, w, x) for w in (copy, v)]
    aligned, aux = otf.align_parents([copy, v], spec, otf.FusionConfig(mode="activations"), activations=acts)
    fused = otf.engine.weighted_sum(aligned, aux.weights)
    assert _max_diff(fused, v) < 1e-5
    repaired = repair.repair(model, fused, aligned, spec, x, include_output=True)
    assert _max_diff(repaired, v) < 1e-4
