"""Least-squares refit: conv patches in the kernel's layout, the regression recovers a model from any start, a
permuted copy fuses back to the model, moved targets, refusals, config, the "+ refit" rows."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import otfusion_jax as otf
from otfusion_jax import configs_util, data, experiment, plans, refit
from otfusion_jax import spec as spec_lib
from otfusion_jax import training as training_lib
from otfusion_jax.models import build, capture_activations

from fusion_helpers import apply_jit, max_abs_diff, permute_numpy, random_permutations, random_variables

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize(
    "options",
    [
        {"padding": 1},
        {"padding": "SAME", "strides": 2},
        {"padding": "VALID", "kernel_dilation": 2},
        {"padding": ((1, 0), (2, 1)), "use_bias": False},
    ],
)
def test_conv_patches_times_kernel_rows_is_the_conv(options):
    conv = nn.Conv(5, (3, 2), **options)
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 4))
    v = conv.init(jax.random.key(1), x)
    kernel = v["params"]["kernel"]
    rows = refit.design_rows(conv.bind(v), x)
    got = rows @ refit._kernel_rows(kernel) + v["params"].get("bias", 0.0)
    want = conv.apply(v, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want).reshape(-1, 5), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(refit._rows_kernel(refit._kernel_rows(kernel), kernel.shape)), kernel)


@pytest.mark.slow
@pytest.mark.parametrize("name, options, shape", [
    ("mlpnet", {"widths": (7, 5), "bias": True}, (4, 4, 1)),
    ("vgg11", {"width": 0.0625, "bias": False}, (32, 32, 1)),
    ("vgg11", {"width": 0.0625, "bias": True, "norm": True}, (32, 32, 1)),
    ("resnet18", {"width": 0.0625, "bias": False, "norm": True}, (16, 16, 1)),
])
def test_refit_recovers_the_model_its_targets_come_from(name, options, shape):
    """Targets from model M, start from an unrelated model, no ridge: layer by layer the regression finds M
    (its inputs are M's once the layers below are), whatever the start. The MLP's weights are M's; a VGG conv at
    2x2 pixels has taps that only ever see padding, which no sample identifies: there the function is M's. With
    BatchNorm the start keeps its own scales and running statistics: the kernels and shifts absorb the difference."""
    model, spec = build(name, input_shape=shape, num_classes=3, **options)
    m, start = random_variables(model, shape, 0), random_variables(model, shape, 1)
    if "batch_stats" in m:  # nontrivial and different statistics and scales in M and in the start
        m, start = _random_norms(m, 3), _random_norms(start, 4)
    x = jax.random.normal(jax.random.key(2), (96,) + shape)
    targets = refit.moved_mean_activations([(model, m)], [None], x)
    got = refit.refit(model, start, spec, x, targets, refit.RefitConfig(ridge=0.0, batch_size=40))
    assert max_abs_diff(start, m) > 0.1
    if name == "mlpnet":
        assert max_abs_diff(got, m) < 2e-3, max_abs_diff(got, m)
    if "batch_stats" in m:  # the BatchNorms keep the start's scales and statistics
        for bn in ("scale",):
            a = [v for k, v in spec_lib.flatten_paths(got).items() if k.endswith(bn)]
            b = [v for k, v in spec_lib.flatten_paths(start).items() if k.endswith(bn)]
            assert all(np.array_equal(u, v) for u, v in zip(a, b))
    want = apply_jit(model, m, x)
    assert np.max(np.abs(apply_jit(model, start, x) - want)) > 0.1
    np.testing.assert_allclose(apply_jit(model, got, x), want, rtol=1e-3, atol=1e-3)


def _random_norms(variables, seed):
    """Every BatchNorm's scale, shift and running statistics drawn at random (var in [0.5, 2], scale in [0.5, 1.5])."""
    rng = np.random.default_rng(seed)
    flat = dict(spec_lib.flatten_paths(variables))
    for k, v in flat.items():
        low, high = {"var": (0.5, 2.0), "scale": (0.5, 1.5)}.get(k.rsplit("/", 1)[1], (-0.5, 0.5))
        if k.startswith("batch_stats") or "/bn" in k or "shortcut_bn" in k:
            flat[k] = jnp.asarray(rng.uniform(low, high, v.shape), v.dtype)
    return spec_lib.unflatten_paths(flat)


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(widths=st.lists(st.integers(2, 12), min_size=1, max_size=3), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_permuted_copy_fuses_back_through_the_refit(widths, bias, seed):
    """Fusing a model with a permuted copy (exact OT by activations) and refitting gives the model back: the
    average is already what every target asks (the regression's fixed point), with or without ridge."""
    model, spec = build("mlpnet", input_shape=(5, 5, 1), num_classes=3, widths=tuple(widths), bias=bias)
    v = random_variables(model, (5, 5, 1), seed)
    copy = permute_numpy(v, spec, random_permutations(spec, spec.check_variables(v), seed + 1))
    x = jax.random.normal(jax.random.key(seed), (64, 5, 5, 1))
    acts = [capture_activations(model, w, x) for w in (copy, v)]
    fused, aux = otf.fuse([copy, v], spec, otf.FusionConfig(mode="activations"), activations=acts)
    targets = refit.moved_mean_activations([(model, copy), (model, v)], aux.plans, x)
    got = refit.refit(model, fused, spec, x, targets, refit.RefitConfig(ridge=0.1))
    assert max_abs_diff(got, v) < 2e-3


def test_moved_targets_are_the_aligned_parents_mean_for_permutations():
    model, spec = build("mlpnet", input_shape=(4, 4, 1), num_classes=3, widths=(6, 5), bias=True)
    a, b = random_variables(model, (4, 4, 1), 0), random_variables(model, (4, 4, 1), 1)
    perms = random_permutations(spec, spec.check_variables(a), 2)
    x = jax.random.normal(jax.random.key(3), (16, 4, 4, 1))
    got = refit.moved_mean_activations([(model, a), (model, b)], [plans.perms_to_plans(perms), None], x, weights=(1, 3))
    aligned = capture_activations(model, plans.apply_plans(a, spec, perms), x)
    own = capture_activations(model, b, x)
    for name in spec.plans:
        np.testing.assert_allclose(np.asarray(got[name][0]), 0.25 * aligned[name][0] + 0.75 * own[name][0], atol=1e-5)


def test_refuses_layer_norms_and_heads_by_name():
    _, spec = build("vgg11", input_shape=(32, 32, 1), width=0.0625, norm=True, bias=False)
    refit.check_spec(spec)  # BatchNorm is folded
    leaves = {p: ls for p, ls in spec.leaves if p != "batch_stats/bn3/var"}
    with pytest.raises(otf.FusionError, match=r"refit: the normalisation layer 'bn3' has no batch_stats/bn3/var"):
        refit.check_spec(dataclasses.replace(spec, leaves=tuple(sorted(leaves.items()))))
    _, spec = build("vit", input_shape=(8, 8, 1), num_classes=3, depth=1, embed_dim=8, num_heads=2, mlp_dim=8,
                    patch_size=4)
    with pytest.raises(otf.FusionError, match="refit: the spec has attention heads"):
        refit.check_spec(spec)
    model, spec = build("mlpnet", input_shape=(4, 4, 1), num_classes=3, widths=(6,), bias=False)
    v = random_variables(model, (4, 4, 1))
    x = jnp.ones((8, 4, 4, 1))
    with pytest.raises(otf.FusionError, match=r"refit: no target activations for plan 'fc2' \(tensor 0\)"):
        refit.refit(model, v, spec, x, {"fc1": (jnp.ones((8, 6)),)})
    with pytest.raises(otf.FusionError, match="refit: the targets of plan 'fc1' are on 3 samples, x has 8"):
        refit.refit(model, v, spec, x, {"fc1": (jnp.ones((3, 6)),), "fc2": (jnp.ones((3, 3)),)})
    with pytest.raises(otf.FusionError, match=r"refit: the targets of plan 'fc1' \(tensor 0\) have shape \(8, 7\); the fused model sows \(8, 6\)"):
        refit.refit(model, v, spec, x, {"fc1": (jnp.ones((8, 7)),), "fc2": (jnp.ones((8, 3)),)})


@pytest.mark.slow
def test_a_huge_ridge_keeps_the_averaged_weights_with_batchnorm_and_biases():
    """Folding a layer and its BatchNorm into rows and a bias, and writing them back, is exact: with the ridge far
    above the data the refit returns the model it started from (kernels, biases, BatchNorm shifts), whatever the
    targets; the BatchNorms' scales and running statistics are never touched."""
    model, spec = build("vgg11", input_shape=(32, 32, 1), num_classes=3, width=0.0625, bias=True, norm=True)
    start = _random_norms(random_variables(model, (32, 32, 1), 1), 4)
    x = jax.random.normal(jax.random.key(2), (8, 32, 32, 1))
    targets = refit.moved_mean_activations([(model, _random_norms(random_variables(model, (32, 32, 1), 0), 3))], [None], x)
    got = refit.refit(model, start, spec, x, targets, refit.RefitConfig(ridge=1e9))
    flat_got, flat_start = spec_lib.flatten_paths(got), spec_lib.flatten_paths(start)
    for path, value in flat_start.items():
        np.testing.assert_allclose(np.asarray(flat_got[path]), np.asarray(value), rtol=1e-4, atol=1e-5, err_msg=path)
        if path.startswith("batch_stats") or path.endswith("scale"):
            np.testing.assert_array_equal(np.asarray(flat_got[path]), np.asarray(value), err_msg=path)


@pytest.mark.slow
def test_residual_streams_are_one_regression_per_sum_in_call_order():
    """A BatchNorm-free ResNet: the stem and each block's last conv (with its projection shortcut at a stage's first
    sum) are the units of the streams, each after the layers that feed it; the refit recovers a model from an
    unrelated start through the skip connections."""
    model, spec = build("resnet18", input_shape=(16, 16, 1), num_classes=3, width=0.0625, norm=False, bias=True)
    m, start = random_variables(model, (16, 16, 1), 0), random_variables(model, (16, 16, 1), 1)
    x = jax.random.normal(jax.random.key(2), (48, 16, 16, 1))
    todo = refit.units(model, start, spec, x)
    names = [(u.plan, u.tap, ["/".join(layer.path) for layer in u.layers]) for u in todo]
    assert names[:4] == [
        ("res1", 0, ["conv1"]), ("layer1_0_conv1", 0, ["layer1_0/conv1"]), ("res1", 1, ["layer1_0/conv2"]),
        ("layer1_1_conv1", 0, ["layer1_1/conv1"]),
    ], names
    assert ("res2", 0, ["layer2_0/conv2", "layer2_0/shortcut_conv"]) in names
    assert names[-1] == ("fc", 0, ["fc"]) and len(names) == len(spec.plans) - 4 + 1 + 8, names
    targets = refit.moved_mean_activations([(model, m)], [None], x)
    got = refit.refit(model, start, spec, x, targets, refit.RefitConfig(ridge=0.0, batch_size=20))
    want = apply_jit(model, m, x)
    assert np.max(np.abs(apply_jit(model, start, x) - want)) > 0.1
    np.testing.assert_allclose(apply_jit(model, got, x), want, rtol=2e-3, atol=2e-3)


def test_config_section_is_validated_and_read():
    from configs import default

    config = default.get_config()
    config.refit.ridge = -1.0
    with pytest.raises(ValueError, match=r"config\.refit\.ridge"):
        configs_util.validate(config)
    config.refit.ridge = 0.5
    config.refit.num_samples = 300
    assert configs_util.settings_from(configs_util.validate(config)).refit == refit.RefitConfig(0.5, 300)
    with pytest.raises(otf.FusionError, match=r"refit.num_samples must be an integer >= 1, got 0"):
        refit.RefitConfig(num_samples=0)


def _tiny_dataset(shape, classes, n=40, seed=5):
    x = np.asarray(jax.random.normal(jax.random.key(seed), (n,) + shape))
    y = np.arange(n) % classes
    return data.Dataset("fashion_mnist", "idx", x[:30], y[:30], x[30:], y[30:], classes)


@pytest.mark.slow
def test_refit_rows_of_the_table_and_their_notes():
    """experiment.refit adds "+ refit" after each method (the refitted models kept for --save_fused); on a model
    the refit cannot regress, experiment.refit makes it an error."""
    model, spec = build("mlpnet", input_shape=(4, 4, 1), num_classes=3, widths=(6, 5), bias=False)
    parents = [experiment.Parent(f"parent {i}", model, random_variables(model, (4, 4, 1), i)) for i in range(2)]
    ds = _tiny_dataset((4, 4, 1), 3)
    exp = experiment.ExperimentConfig(method="ot-acts,cca", num_samples=8, refit=True, many_method="", plots=False)
    settings_ = experiment.Settings(exp, cca=otf.CCAMerge(num_samples=25), refit=refit.RefitConfig(num_samples=20))
    rows, fused = experiment.run_fusion_table(parents, spec, ds, settings_)
    labels = [r["method"] for r in rows]
    cca_label = "CCA Merge (post-ReLU activations, regularization 0.5)"
    # the refitted models are kept for --save_fused, under the method's name
    item = fused[f"{cca_label} + refit"]
    assert (item.method, item.solver) == ("cca", "exact-refit")
    acc = training_lib.evaluate(model, item.variables, ds.x_test, ds.y_test)["accuracy"]
    assert acc == next(r for r in rows if r["method"] == f"{cca_label} + refit")["accuracy"]
    assert labels[-4:] == ["OT fusion (activations, exact)", "OT fusion (activations, exact) + refit", cca_label,
                           f"{cca_label} + refit"], labels
    assert all(r["accuracy"] is not None and r["seconds"] > 0 for r in rows[-4:])

    model, spec = build("vit", input_shape=(8, 8, 1), num_classes=3, depth=1, embed_dim=8, num_heads=2, mlp_dim=8,
                        patch_size=4)
    parents = [experiment.Parent(f"parent {i}", model, random_variables(model, (8, 8, 1), i)) for i in range(2)]
    ds = _tiny_dataset((8, 8, 1), 3)
    exp = experiment.ExperimentConfig(method="ot-acts", num_samples=8, refit=True, many_method="", plots=False)
    with pytest.raises(otf.FusionError, match="refit: the spec has attention heads"):
        experiment.run_fusion_table(parents, spec, ds, experiment.Settings(exp, refit=refit.RefitConfig(num_samples=8)))
