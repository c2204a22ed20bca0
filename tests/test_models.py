"""Models, their records and alignment specs: shapes, spec coverage, the record check, the docs' example."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import otfusion_jax as otf
from otfusion_jax import configs_util, models
from otfusion_jax import spec as spec_lib

from fusion_helpers import (
    SMALL_CNN,
    SmallCNN,
    apply_jit,
    doc_example_code,
    permuted_copy,
    random_permutation_plans,
    random_variables,
    small_cnn_spec,
)


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


@pytest.mark.slow
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
    """NumPy-drawn variables of init's tree (biases nonzero; flax's eager init of a VGG11 takes seconds)."""
    model, spec = models.build(name, input_shape=shape, **opts)
    x = jax.random.normal(jax.random.key(1), (8, *shape))
    variables = _recompute_batch_stats(model, random_variables(model, shape), x)
    assert {p for p, _ in spec.leaves} == set(spec_lib.flatten_paths(variables))
    sizes = spec.check_variables(variables)
    assert set(sizes) == set(spec.plans)
    permuted = permuted_copy(variables, spec, seed=7)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(permuted), jax.tree_util.tree_leaves(variables)))
    # the library's apply_plans with the same permutations as dense plans: the tests' NumPy permutation, bit for bit
    plans, _ = random_permutation_plans(spec, sizes, seed=7)
    by_library = otf.apply_plans(variables, spec, plans)
    assert jax.tree_util.tree_structure(by_library) == jax.tree_util.tree_structure(permuted)
    for a, b in zip(jax.tree_util.tree_leaves(by_library), jax.tree_util.tree_leaves(permuted)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    np.testing.assert_allclose(apply_jit(model, permuted, x), apply_jit(model, variables, x), atol=1e-4, rtol=1e-4)
    acts = models.capture_activations(model, variables, x, "post")
    assert set(acts) == set(spec.plans)


_recompute_batch_stats = jax.jit(models.recompute_batch_stats, static_argnums=0)


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


# ----------------------------------------------------------------------------- records


def test_builtin_records_and_their_options():
    assert {"mlpnet", "vgg11", "resnet18"} <= set(models.available())
    assert models.get("mlpnet").option_names == ("bias", "widths")
    assert models.get("vgg11").option_names == ("bias", "norm", "width")
    assert models.get("resnet18").defaults() == models.ResNet18Options(bias=False, norm=True, width=1.0)
    record = models.get("mlpnet")
    opts = record.make_options(bias=True, widths=[8, 4])  # a JSON list becomes a tuple
    assert opts == models.MLPNetOptions(bias=True, widths=(8, 4)) and hash(opts)
    assert record.options_dict(opts) == {"bias": True, "widths": [8, 4]}
    assert record.make_options(**record.options_dict(opts)) == opts
    assert record.has_bias(opts) and not record.has_batchnorm(opts)
    assert models.get("vgg11").has_batchnorm(models.VGG11Options(norm=True))
    assert models.get("vgg11").make_options(width=1).width == 1.0 and isinstance(
        models.get("vgg11").make_options(width=1).width, float
    )
    assert record.scale_width(opts, 2.0).widths == (16, 8)
    with pytest.raises(ValueError, match="unknown model 'vgg19'"):
        models.get("vgg19")


@pytest.mark.parametrize("name", models.available())
def test_every_registered_record_passes_its_check(name):
    record = models.get(name)
    models.check_record(record)  # all of record.examples, on abstract shapes
    models.check_record(record, record.defaults(), input_shape=record.example_input_shape, num_classes=7)


def test_unknown_or_ill_typed_options_name_the_model_and_option():
    with pytest.raises(ValueError, match=r"model 'mlpnet': unknown option\(s\) norm; its options are bias, widths"):
        models.build("mlpnet", norm=True)
    with pytest.raises(ValueError, match=r"model 'vgg11': unknown option\(s\) depth, widths"):
        models.build("vgg11", input_shape=(32, 32, 3), widths=(3,), depth=2)
    with pytest.raises(ValueError, match=r"model 'mlpnet': option widths must be a tuple of int, got 'abc'"):
        models.build("mlpnet", widths="abc")
    with pytest.raises(ValueError, match=r"model 'resnet18': option bias must be bool, got 'yes'"):
        models.build("resnet18", bias="yes")
    with pytest.raises(ValueError, match=r"model 'vgg11': vgg11 width must be > 0"):
        models.build("vgg11", input_shape=(32, 32, 3), width=0.0)


def test_register_rejects_a_second_record_under_a_taken_name():
    record = models.get("mlpnet")
    assert models.register(record) is record  # the same record again: nothing happens
    with pytest.raises(ValueError, match="'mlpnet' is already registered"):
        models.register(dataclasses.replace(record, examples=()))
    with pytest.raises(TypeError, match="ModelRecord"):
        models.register("mlpnet")
    with pytest.raises(models.RecordError, match="frozen dataclass"):
        models.ModelRecord("x", options=_MutableOptions, module=record.module, spec=record.spec)


@dataclasses.dataclass
class _MutableOptions:
    bias: bool = False


class _PreOnlyMLP(nn.Module):
    """An MLP that sows acts_pre only (the old README example's mistake)."""

    use_bias: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(4, use_bias=self.use_bias, name="fc1")(x)
        self.sow("acts_pre", models.ACT_PREFIX + "fc1", x)
        x = nn.Dense(3, use_bias=self.use_bias, name="fc2")(nn.relu(x))
        models.sow_acts(self, "fc2", x)
        return x


class _TransposedActsMLP(nn.Module):
    """Sows fc1's activations with the neurons first."""

    use_bias: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(4, use_bias=False, name="fc1")(x.reshape(x.shape[0], -1))
        models.sow_acts(self, "fc1", x.T, nn.relu(x))
        x = nn.Dense(3, use_bias=False, name="fc2")(nn.relu(x))
        models.sow_acts(self, "fc2", x)
        return x


def _mlp_record(**changes):
    return dataclasses.replace(models.get("mlpnet"), name="broken", examples=(), **changes)


def test_broken_records_fail_their_check_naming_the_leaf_or_plan():
    two_layer_spec = lambda o, s: models.mlp.mlpnet_spec(1, bias=o.bias)  # noqa: E731
    # the module has biases, the spec does not: the spec lacks leaves
    record = _mlp_record(spec=lambda o, s: models.mlp.mlpnet_spec(len(o.widths), bias=False))
    with pytest.raises(models.RecordError, match=r"model 'broken'.*not in spec: \['params/fc1/bias'"):
        models.check_record(record, {"bias": True})
    # the spec names a leaf the module lacks
    record = _mlp_record(spec=lambda o, s: models.mlp.mlpnet_spec(len(o.widths), bias=True))
    with pytest.raises(models.RecordError, match=r"model 'broken'.*missing: \['params/fc1/bias'"):
        models.check_record(record)
    # a plan sown into acts_pre only
    record = _mlp_record(module=lambda o, s, n: _PreOnlyMLP(use_bias=o.bias), spec=two_layer_spec, torch=None)
    with pytest.raises(models.RecordError, match=r"model 'broken'.*plan\(s\) fc1 not sown into 'acts_post'"):
        models.check_record(record, num_classes=3)
    # activations with the neurons on the wrong axis
    record = _mlp_record(module=lambda o, s, n: _TransposedActsMLP(), spec=two_layer_spec, torch=None)
    with pytest.raises(models.RecordError, match=r"'acts_pre' sows plan 'fc1' with shape \(4, 2\); its last axis"):
        models.check_record(record, num_classes=3)
    # capabilities that disagree with the module
    record = dataclasses.replace(models.get("vgg11"), name="broken", has_batchnorm=models.record.never, examples=())
    with pytest.raises(models.RecordError, match=r"has_batchnorm\(options\) is False but the module has batch_stats"):
        models.check_record(record, {"norm": True, "width": 0.125})
    record = _mlp_record(has_bias=models.record.never)
    with pytest.raises(models.RecordError, match=r"has_bias\(options\) is False but the spec has bias leaves"):
        models.check_record(record, {"bias": True})
    # a torch layout whose entries miss the biases
    layout = models.get("mlpnet").torch
    entries = lambda o, s, n: [e for e in layout.entries(o, s, n) if e.kind != "vector"]  # noqa: E731
    record = _mlp_record(torch=dataclasses.replace(layout, entries=entries))
    with pytest.raises(models.RecordError, match=r"torch layout's entries do not match.*params/fc1/bias"):
        models.check_record(record, {"bias": True})


def test_build_checks_a_record_the_first_time(monkeypatch):
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    monkeypatch.setattr(models, "_CHECKED", set())
    two_layer_spec = lambda o, s: models.mlp.mlpnet_spec(1, bias=o.bias)  # noqa: E731
    models.register(_mlp_record(module=lambda o, s, n: _PreOnlyMLP(use_bias=o.bias), spec=two_layer_spec, torch=None))
    with pytest.raises(models.RecordError, match="not sown into 'acts_post'"):
        models.build("broken", input_shape=(8, 8, 1), num_classes=3)
    models.build("mlpnet", input_shape=(8, 8, 1), widths=(4,))
    assert "mlpnet" in models._CHECKED and "broken" not in models._CHECKED


def test_model_options_of_configs_come_from_the_records():
    for name in models.available():
        assert configs_util.MODEL_OPTIONS[name] == models.get(name).option_names
    assert set(configs_util.MODEL_OPTIONS) == set(models.available())
    model = {"name": "mlpnet", "bias": True, "norm": False, "width": 1.0, "widths": (6, 4)}
    assert configs_util.model_options_from({"model": model}) == ("mlpnet", {"bias": True, "widths": [6, 4]})
    cfg = {"model": {**model, "name": "vgg11"}, "parent_widths": (1.0, 0.5)}
    assert configs_util.model_options_from(cfg, 1) == ("vgg11", {"bias": True, "norm": False, "width": 0.5})
    # the docs' example takes config.model.bias; its other options keep their defaults
    name, options = configs_util.model_options_from({"model": {**model, "name": "small_cnn"}})
    assert (name, options) == ("small_cnn", {"bias": True, "c1": 6, "c2": 8, "hidden": 12})
    with pytest.raises(ValueError, match=r"config.model: model 'mlpnet': option widths must be a tuple of int"):
        configs_util.model_options_from({"model": {**model, "widths": "wide"}})


@pytest.mark.slow
def test_the_docs_example_registers_builds_checks_and_fuses():
    code = doc_example_code()  # the one ```python block of docs/ADDING_A_MODEL.md, executed by fusion_helpers
    assert "models.register(" in code and "class SmallCNN(nn.Module)" in code
    assert SmallCNN.__module__ == "adding_a_model_example" and models.get("small_cnn") is SMALL_CNN
    models.check_record(SMALL_CNN)
    shape = (8, 8, 3)
    model, spec = models.build("small_cnn", input_shape=shape, num_classes=5, bias=True)
    assert isinstance(model, SmallCNN) and spec == small_cnn_spec((4, 4), True)
    variables = models.init(model, jax.random.key(0), shape)
    x = jax.random.normal(jax.random.key(1), (6, *shape))
    for kind in ("pre", "post"):
        assert set(models.capture_activations(model, variables, x, kind)) == set(spec.plans)
    permuted = permuted_copy(variables, spec, seed=3)
    fused, _ = otf.fuse([variables, permuted], spec, otf.FusionConfig(mode="weights", solver="exact"))
    # the fused model is the target (the permuted copy): aligning a model to a permutation of itself is exact
    for a, b in zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(permuted)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(model.apply(fused, x), model.apply(variables, x), atol=1e-4, rtol=1e-4)
