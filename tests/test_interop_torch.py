"""Tests of otfusion_jax.interop.torch_checkpoints against torch re-creations of the original models.

The torch modules below mirror sidak/otfusion's ``model.py`` (MLPNet),
``cifar/models/vgg.py`` (VGG11) and ``cifar/models/resnet.py`` (ResNet18):
same module names, hence the same state-dict keys, at smaller widths.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from otfusion_jax import configs_util, models  # noqa: E402
from otfusion_jax.interop import layouts, torch_checkpoints  # noqa: E402
from otfusion_jax.interop.torch_checkpoints import (  # noqa: E402
    TorchCheckpointError,
    is_torch_checkpoint,
    load_torch_checkpoint,
    save_torch_checkpoint,
)

VGG11_CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


# ----------------------------------------------------------------------------- torch models


class TorchMLPNet(nn.Module):
    """model.py MlpNet (returns logits: the original's ``disable_logits=True``)."""

    def __init__(self, n_in=784, widths=(400, 200, 100), num_classes=10, bias=False):
        super().__init__()
        dims = [n_in, *widths, num_classes]
        for i in range(len(dims) - 1):
            setattr(self, f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1], bias=bias))
        self.n = len(dims) - 1

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        for i in range(1, self.n):
            x = F.relu(getattr(self, f"fc{i}")(x))
        return getattr(self, f"fc{self.n}")(x)


class TorchVGG(nn.Module):
    """cifar/models/vgg.py VGG ('VGG11', batch_norm, bias), widths scaled by ``width``."""

    def __init__(self, width=1.0, num_classes=10, batch_norm=False, bias=False, map_hw=1, in_channels=3):
        super().__init__()
        layers, c_in = [], in_channels
        for item in VGG11_CFG:
            if item == "M":
                layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
                continue
            c = max(1, round(item * width))
            layers += [nn.Conv2d(c_in, c, kernel_size=3, padding=1, bias=bias)]
            layers += [nn.BatchNorm2d(c)] if batch_norm else []
            layers += [nn.ReLU(inplace=True)]
            c_in = c
        layers += [nn.AvgPool2d(kernel_size=1, stride=1)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in * map_hw * map_hw, num_classes, bias=bias)

    def forward(self, x):
        out = self.features(x)
        return self.classifier(out.view(out.size(0), -1))


class TorchBasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1, use_batchnorm=True, bias=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(planes) if use_batchnorm else nn.Sequential()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(planes) if use_batchnorm else nn.Sequential()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            mods = [nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=bias)]
            mods += [nn.BatchNorm2d(planes)] if use_batchnorm else []
            self.shortcut = nn.Sequential(*mods)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class TorchResNet18(nn.Module):
    """cifar/models/resnet.py ResNet18 (use_batchnorm, bias), widths scaled by ``width``."""

    def __init__(self, width=1.0, num_classes=10, use_batchnorm=True, bias=False):
        super().__init__()
        w = lambda c: max(1, round(c * width))  # noqa: E731
        self.in_planes = w(64)
        self.conv1 = nn.Conv2d(3, w(64), kernel_size=3, stride=1, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(w(64)) if use_batchnorm else nn.Sequential()
        for s, (planes, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)]):
            blocks = []
            for st in (stride, 1):
                blocks.append(TorchBasicBlock(self.in_planes, w(planes), st, use_batchnorm, bias))
                self.in_planes = w(planes)
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(w(512), num_classes, bias=bias)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for s in range(1, 5):
            out = getattr(self, f"layer{s}")(out)
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics (so that BN conversion errors show), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(seed + 17)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return module.eval()


def _save_original(module: nn.Module, path, **kwargs) -> str:
    """Saves like the original's save_final_model."""
    args = {"model_name": type(module).__name__, "dataset": "cifar10", "disable_bias": True, "n_epochs": 3}
    torch.save(
        {"args": args, "epoch": 3, "test_accuracy": 97.7, "model_state_dict": module.state_dict()},
        os.fspath(path),
        **kwargs,
    )
    return os.fspath(path)


def _logits_match(module: nn.Module, path: str, shape, **load_kwargs):
    """Loads ``path``, runs both models on the same inputs and compares logits."""
    name, options, variables, meta = load_torch_checkpoint(path, **load_kwargs)
    flax_model, _ = models.build(name, input_shape=shape, num_classes=10, **options)
    x_nchw = torch.randn((4, shape[2], *shape[:2]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = module(x_nchw).numpy()
    got = np.asarray(flax_model.apply(variables, layouts.acts_from_torch(x_nchw.numpy()), train=False))
    assert np.abs(want).max() > 1e-2  # not trivially small
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    return name, options, variables, meta


def _assert_state_dicts_equal(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def _assert_trees_equal(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a), jax.tree_util.tree_flatten_with_path(b)
    assert fa[1] == fb[1]
    for (path, x), (_, y) in zip(fa[0], fb[0]):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(x, y, err_msg=str(path))


# ----------------------------------------------------------------------------- logits and round trips


def test_mlpnet_original_checkpoint(tmp_path):
    module = _randomise(TorchMLPNet(), 0)
    path = _save_original(module, tmp_path / "final.checkpoint")
    assert is_torch_checkpoint(path)
    name, options, variables, meta = _logits_match(module, path, (28, 28, 1))
    assert name == "mlpnet" and options == {"bias": False, "widths": [400, 200, 100]}
    want = {"name": "mlpnet", "options": options, "input_shape": [28, 28, 1], "num_classes": 10}
    assert meta["model"] == want
    assert meta["test_accuracy"] == pytest.approx(0.977)
    assert meta["torch"]["test_accuracy"] == 97.7 and meta["torch"]["args"]["n_epochs"] == 3
    assert meta["torch"]["extra"] == {"epoch": 3}
    configs_util.model_from_metadata(meta)  # train.py's metadata reader accepts it


def test_mlpnet_multichannel_flatten_and_bias(tmp_path):
    # The original flattens NCHW as (C, H, W); ours NHWC as (H, W, C): fc1 is permuted exactly.
    module = _randomise(TorchMLPNet(n_in=8 * 8 * 3, widths=(16, 12), bias=True), 1)
    path = _save_original(module, tmp_path / "m.pt")
    name, options, _, meta = _logits_match(module, path, (8, 8, 3), input_shape=(8, 8, 3))
    assert options == {"bias": True, "widths": [16, 12]} and meta["model"]["input_shape"] == [8, 8, 3]


@pytest.mark.parametrize("bias,norm", [(False, False), (True, True)])
def test_vgg11(tmp_path, bias, norm):
    module = _randomise(TorchVGG(width=0.125, batch_norm=norm, bias=bias), 2)
    path = _save_original(module, tmp_path / "vgg.checkpoint")
    name, options, variables, meta = _logits_match(module, path, (32, 32, 3))
    assert name == "vgg11" and options == {"bias": bias, "norm": norm, "width": 0.125}
    assert ("batch_stats" in variables) == norm
    if norm:
        assert meta["torch"]["num_batches_tracked"]["features.1.num_batches_tracked"] == 19


def test_vgg11_larger_input_flatten(tmp_path):
    # 64x64 inputs leave a 2x2 map before the classifier: the NCHW flatten is permuted to NHWC.
    module = _randomise(TorchVGG(width=0.125, bias=True, map_hw=2), 3)
    path = _save_original(module, tmp_path / "vgg64.pt")
    _, _, _, meta = _logits_match(module, path, (64, 64, 3))
    assert meta["model"]["input_shape"] == [64, 64, 3]  # inferred from the classifier


@pytest.mark.parametrize("bias,norm", [(False, True), (True, False)])
def test_resnet18(tmp_path, bias, norm):
    module = _randomise(TorchResNet18(width=0.125, use_batchnorm=norm, bias=bias), 4)
    path = _save_original(module, tmp_path / "resnet.checkpoint")
    name, options, variables, _ = _logits_match(module, path, (32, 32, 3))
    assert name == "resnet18" and options == {"bias": bias, "norm": norm, "width": 0.125}
    leaves = {"/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]}
    assert "params/layer2_0/shortcut_conv/kernel" in leaves
    assert "params/layer1_0/shortcut_conv/kernel" not in leaves
    assert ("batch_stats/layer2_0/shortcut_bn/var" in leaves) == norm


def test_file_round_trip_is_exact(tmp_path):
    module = _randomise(TorchResNet18(width=0.125, use_batchnorm=True, bias=True), 5)
    src = _save_original(module, tmp_path / "src.checkpoint")
    name, _, variables, meta = load_torch_checkpoint(src)
    out = save_torch_checkpoint(tmp_path / "sub" / "out.checkpoint", name, variables, meta)
    a = torch.load(src, map_location="cpu", weights_only=True)
    b = torch.load(out, map_location="cpu", weights_only=True)
    assert list(a) == list(b)
    assert {k: v for k, v in a.items() if k != "model_state_dict"} == {
        k: v for k, v in b.items() if k != "model_state_dict"
    }
    _assert_state_dicts_equal(a["model_state_dict"], b["model_state_dict"])
    fresh = TorchResNet18(width=0.125, use_batchnorm=True, bias=True)
    fresh.load_state_dict(b["model_state_dict"], strict=True)  # loadable by the original model
    _, _, variables2, meta2 = load_torch_checkpoint(out)
    _assert_trees_equal(variables, variables2)
    meta2.pop("source"), meta.pop("source")
    assert meta2 == meta


@pytest.mark.parametrize(
    "name,options,input_shape",
    [
        ("mlpnet", {"bias": True, "widths": (20, 10)}, (28, 28, 1)),
        ("vgg11", {"bias": True, "norm": True, "width": 0.125}, (32, 32, 3)),
        ("resnet18", {"bias": False, "norm": True, "width": 0.125}, (32, 32, 3)),
    ],
)
def test_variables_round_trip_is_exact(tmp_path, name, options, input_shape):
    module, _ = models.build(name, input_shape=input_shape, num_classes=10, **options)
    shapes = jax.eval_shape(lambda: models.init(module, jax.random.key(0), input_shape))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
    ours = {"model": {"name": name, "options": options, "input_shape": list(input_shape), "num_classes": 10}}
    path = save_torch_checkpoint(tmp_path / f"{name}.pt", name, variables, {**ours, "test_accuracy": 0.9})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["test_accuracy"] == pytest.approx(90.0) and raw["args"]["model_name"] == name
    got_name, got_options, loaded, meta = load_torch_checkpoint(path)
    assert got_name == name and meta["test_accuracy"] == pytest.approx(0.9)
    assert got_options == {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    _assert_trees_equal(variables, loaded)


def test_legacy_format_prefix_bare_state_dict_and_namespace_args(tmp_path):
    module = _randomise(TorchMLPNet(widths=(32, 16, 8)), 6)
    legacy = _save_original(module, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert is_torch_checkpoint(legacy)
    _logits_match(module, legacy, (28, 28, 1))

    bare = tmp_path / "bare.pth"  # DataParallel-prefixed bare state dict
    torch.save({"module." + k: v for k, v in module.state_dict().items()}, bare)
    name, _, variables, meta = _logits_match(module, os.fspath(bare), (28, 28, 1))
    assert meta["torch"]["layout"] == "state_dict" and meta["torch"]["key_prefix"] == "module."
    again = save_torch_checkpoint(tmp_path / "again.pth", name, variables, meta)
    _assert_state_dicts_equal(torch.load(bare, weights_only=True), torch.load(again, weights_only=True))

    ns = tmp_path / "ns.pt"
    torch.save({"args": argparse.Namespace(lr=0.01), "model_state_dict": module.state_dict()}, ns)
    assert load_torch_checkpoint(ns)[3]["torch"]["args"] == {"lr": 0.01}


# ----------------------------------------------------------------------------- errors


def test_bad_files_name_the_file(tmp_path):
    module = _randomise(TorchMLPNet(widths=(8,)), 7)
    good = _save_original(module, tmp_path / "good.pt")
    data = open(good, "rb").read()
    trunc = tmp_path / "truncated.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(TorchCheckpointError, match=r"truncated\.pt.*truncated or corrupt"):
        load_torch_checkpoint(trunc)

    legacy = _save_original(module, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    ltrunc = tmp_path / "ltrunc.pt"
    ltrunc.write_bytes(open(legacy, "rb").read()[:100])
    with pytest.raises(TorchCheckpointError, match=r"ltrunc\.pt.*truncated or corrupt"):
        load_torch_checkpoint(ltrunc)

    rand = tmp_path / "random.pt"
    rand.write_bytes(np.random.default_rng(0).bytes(2048))
    assert not is_torch_checkpoint(rand) and not is_torch_checkpoint(tmp_path)
    with pytest.raises(TorchCheckpointError, match=r"random\.pt.*not a PyTorch checkpoint"):
        load_torch_checkpoint(rand)
    with pytest.raises(TorchCheckpointError, match=r"missing\.pt.*no such file"):
        load_torch_checkpoint(tmp_path / "missing.pt")

    whole = tmp_path / "module.pt"
    torch.save(module, whole)
    with pytest.raises(TorchCheckpointError, match=r"module\.pt.*trusted=True"):
        load_torch_checkpoint(whole)
    assert load_torch_checkpoint(whole, trusted=True)[0] == "mlpnet"


def _write_sd(path, sd):
    torch.save({"args": {}, "test_accuracy": 50.0, "model_state_dict": sd}, path)
    return path


def test_bad_state_dicts_name_file_and_key(tmp_path):
    mlp = _randomise(TorchMLPNet(widths=(16, 8)), 8).state_dict()
    vgg = _randomise(TorchVGG(width=0.125, batch_norm=True, bias=True), 8).state_dict()

    sd = {k: v for k, v in vgg.items() if k != "features.5.running_var"}
    with pytest.raises(TorchCheckpointError, match=r"miss_vgg\.pt.*missing keys: features\.5\.running_var"):
        load_torch_checkpoint(_write_sd(tmp_path / "miss_vgg.pt", sd))

    sd = {k: v for k, v in mlp.items() if k != "fc2.weight"}
    with pytest.raises(TorchCheckpointError, match=r"miss_mlp\.pt.*missing key 'fc2\.weight'"):
        load_torch_checkpoint(_write_sd(tmp_path / "miss_mlp.pt", sd))

    sd = {**mlp, "fc2.weight": torch.zeros(8, 17)}
    match = r"shape\.pt.*'fc2\.weight' has shape \(8, 17\), expected \(8, 16\)"
    with pytest.raises(TorchCheckpointError, match=match):
        load_torch_checkpoint(_write_sd(tmp_path / "shape.pt", sd))

    sd = {**vgg, "features.4.weight": torch.zeros(17, 8, 3, 3)}  # conv2 not a uniform width multiple
    with pytest.raises(TorchCheckpointError, match=r"width\.pt.*'features\.4\.weight' has shape"):
        load_torch_checkpoint(_write_sd(tmp_path / "width.pt", sd))

    sd = {**mlp, "fc9.weight": torch.zeros(3, 3)}
    with pytest.raises(TorchCheckpointError, match=r"extra\.pt.*missing key 'fc4\.weight'"):
        load_torch_checkpoint(_write_sd(tmp_path / "extra.pt", sd))

    sd = {**vgg, "features.99.weight": torch.zeros(3)}
    with pytest.raises(TorchCheckpointError, match=r"extra_vgg\.pt.*unexpected keys: features\.99\.weight"):
        load_torch_checkpoint(_write_sd(tmp_path / "extra_vgg.pt", sd))

    sd = {**mlp, "fc1.weight": mlp["fc1.weight"].to(torch.int32)}
    with pytest.raises(TorchCheckpointError, match=r"dtype\.pt.*'fc1\.weight' has dtype int32"):
        load_torch_checkpoint(_write_sd(tmp_path / "dtype.pt", sd))

    with pytest.raises(TorchCheckpointError, match=r"unknown\.pt.*unknown architecture"):
        load_torch_checkpoint(_write_sd(tmp_path / "unknown.pt", {"encoder.weight": torch.zeros(2, 2)}))

    with pytest.raises(TorchCheckpointError, match=r"classes\.pt.*num_classes=100"):
        load_torch_checkpoint(_write_sd(tmp_path / "classes.pt", mlp), num_classes=100)
    with pytest.raises(TorchCheckpointError, match=r"forced\.pt.*missing key 'conv1\.weight'"):
        load_torch_checkpoint(_write_sd(tmp_path / "forced.pt", mlp), model="resnet18")


def test_save_rejects_mismatched_variables(tmp_path):
    module, _ = models.build("mlpnet", input_shape=(28, 28, 1), num_classes=10, widths=(8,))
    shapes = jax.eval_shape(lambda: models.init(module, jax.random.key(0), (28, 28, 1)))
    variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    bad = {"params": {**variables["params"], "head": {"kernel": np.zeros((2, 2), np.float32)}}}
    with pytest.raises(TorchCheckpointError, match=r"out\.pt.*unexpected leaves: params/head/kernel"):
        save_torch_checkpoint(tmp_path / "out.pt", "mlpnet", bad)
    assert not os.path.exists(tmp_path / "out.pt")
    with pytest.raises(TorchCheckpointError, match=r"out\.pt.*missing leaves: params/conv1/kernel"):
        save_torch_checkpoint(tmp_path / "out.pt", "resnet18", {"params": {"conv1": {}}})


def test_missing_torch_gives_clear_error(tmp_path, monkeypatch):
    module = _randomise(TorchMLPNet(widths=(8,)), 9)
    path = _save_original(module, tmp_path / "m.pt")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"otfusion-jax\[torch\]"):
        load_torch_checkpoint(path)
    assert is_torch_checkpoint(path)  # detection needs no torch
    assert torch_checkpoints.variables_from_state_dict(
        {k: v.numpy() for k, v in module.state_dict().items()}
    )[0] == "mlpnet"


@pytest.mark.parametrize(
    "name,options,torch_module",
    [
        ("mlpnet", dict(bias=True, widths=(16, 8)), lambda: TorchMLPNet(widths=(16, 8), bias=True)),
        ("vgg11", dict(norm=True, width=0.125), lambda: TorchVGG(width=0.125, batch_norm=True)),
        ("resnet18", dict(norm=True, width=0.125), lambda: TorchResNet18(width=0.125, use_batchnorm=True)),
    ],
)
def test_layouts_come_from_the_model_records(name, options, torch_module):
    with_layout = {r.name for r in models.records() if r.torch is not None}
    assert set(torch_checkpoints.supported_models()) == with_layout >= {"mlpnet", "vgg11", "resnet18"}
    assert torch_checkpoints.SUPPORTED_MODELS == torch_checkpoints.supported_models()
    record = models.get(name)
    input_shape = (28, 28, 1) if name == "mlpnet" else (32, 32, 3)
    entries = record.torch.entries(record.make_options(**options), input_shape, 10)
    state_dict = torch_module().state_dict()
    assert [e.key for e in entries] == list(state_dict)  # the original's keys, in its state_dict() order
    assert [e.shape for e in entries] == [tuple(v.shape) for v in state_dict.values()]
    assert torch_checkpoints.detect_model(list(state_dict)) == name
