"""Models and their alignment specs: parameter shapes, spec coverage, permutation invariance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from otfusion_jax import models
from otfusion_jax import spec as spec_lib

from fusion_helpers import permuted_copy


def _shapes(variables):
    return {p: tuple(x.shape) for p, x in spec_lib.flatten_paths(variables).items()}


def test_mlpnet_is_the_papers_784_400_200_100_10():
    model, spec = models.build("mlpnet", input_shape=(28, 28, 1), bias=False)
    shapes = _shapes(jax.eval_shape(lambda: models.init(model, jax.random.key(0), (28, 28, 1))))
    assert shapes == {
        "params/fc1/kernel": (784, 400),
        "params/fc2/kernel": (400, 200),
        "params/fc3/kernel": (200, 100),
        "params/fc4/kernel": (100, 10),
    }
    assert spec.plans == ("fc1", "fc2", "fc3", "fc4") and spec.output_plan == "fc4"


def test_vgg11_shapes_with_bias_and_batchnorm():
    model, spec = models.build("vgg11", input_shape=(32, 32, 3), bias=True, norm=True)
    shapes = _shapes(jax.eval_shape(lambda: models.init(model, jax.random.key(0), (32, 32, 3))))
    widths = [64, 128, 256, 256, 512, 512, 512, 512]
    cin = 3
    for i, w in enumerate(widths, 1):
        assert shapes[f"params/conv{i}/kernel"] == (3, 3, cin, w)
        assert shapes[f"params/conv{i}/bias"] == (w,)
        assert shapes[f"batch_stats/bn{i}/mean"] == (w,)
        cin = w
    assert shapes["params/fc/kernel"] == (512, 10)
    assert len(shapes) == 8 * 2 + 8 * 4 + 2


def test_resnet18_shapes_and_shared_stream_plans():
    model, spec = models.build("resnet18", input_shape=(32, 32, 3), bias=False, norm=True)
    shapes = _shapes(jax.eval_shape(lambda: models.init(model, jax.random.key(0), (32, 32, 3))))
    assert shapes["params/conv1/kernel"] == (3, 3, 3, 64)
    assert shapes["params/layer2_0/shortcut_conv/kernel"] == (1, 1, 64, 128)
    assert shapes["params/layer4_1/conv2/kernel"] == (3, 3, 512, 512)
    assert shapes["params/fc/kernel"] == (512, 10)
    assert "params/layer1_0/shortcut_conv/kernel" not in shapes  # identity shortcut in stage 1
    lm = spec.leaf_map
    # every tensor added into stage 2's residual sum carries plan res2
    for path in ("params/layer2_0/conv2/kernel", "params/layer2_0/shortcut_conv/kernel", "params/layer2_1/conv2/kernel"):
        assert lm[path].axes[-1] == "res2"
    assert lm["params/layer2_1/conv1/kernel"].axes[2] == "res2"
    assert lm["params/layer2_0/shortcut_conv/kernel"].axes[2] == "res1"


@pytest.mark.parametrize(
    "name,shape,opts",
    [
        ("mlpnet", (8, 8, 1), dict(bias=True, widths=(16, 8))),
        ("vgg11", (32, 32, 3), dict(bias=True, norm=True, width=0.125)),
        ("vgg11", (64, 32, 1), dict(bias=False, norm=False, width=0.125)),
        ("resnet18", (16, 16, 3), dict(bias=True, norm=True, width=0.125)),
        ("resnet18", (16, 16, 3), dict(bias=False, norm=False, width=0.125)),
    ],
)
def test_spec_covers_every_leaf_and_permutations_preserve_the_function(name, shape, opts):
    model, spec = models.build(name, input_shape=shape, **opts)
    x = jax.random.normal(jax.random.key(1), (8, *shape))
    variables = models.recompute_batch_stats(model, models.init(model, jax.random.key(0), shape), x)
    assert {p for p, _ in spec.leaves} == set(spec_lib.flatten_paths(variables))
    sizes = spec.check_variables(variables)
    assert set(sizes) == set(spec.plans)
    permuted = permuted_copy(variables, spec, seed=7)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(permuted), jax.tree_util.tree_leaves(variables)))
    np.testing.assert_allclose(model.apply(permuted, x), model.apply(variables, x), atol=1e-4, rtol=1e-4)
    acts = models.capture_activations(model, variables, x, "post")
    assert set(acts) == set(spec.plans)


def test_spec_errors_name_the_problem():
    leaves = {**spec_lib.dense("fc1", None, "h", bias=False), **spec_lib.dense("fc2", "h", "out", bias=False)}
    with pytest.raises(spec_lib.SpecError, match="not listed"):
        spec_lib.AlignmentSpec.build(leaves, ["h"])
    with pytest.raises(spec_lib.SpecError, match="'out' is listed before"):
        spec_lib.AlignmentSpec.build(leaves, ["out", "h"])
    spec = spec_lib.AlignmentSpec.build(leaves, ["h", "out"], output_plan="out")
    bad = {"params": {"fc1": {"kernel": jnp.zeros((4, 5))}, "fc2": {"kernel": jnp.zeros((6, 3))}}}
    with pytest.raises(spec_lib.SpecError, match="plan 'h' has size 5 at params/fc1/kernel but 6 at params/fc2/kernel"):
        spec.check_variables(bad)
    with pytest.raises(spec_lib.SpecError, match="divisible by 32"):
        models.build("vgg11", input_shape=(28, 28, 1))
    with pytest.raises(ValueError, match="unknown model"):
        models.build("vgg19")
