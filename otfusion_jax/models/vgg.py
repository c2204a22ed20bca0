"""CIFAR-style VGG11 (the OTFusion paper's CIFAR-10 model), biases and BatchNorm optional, described once.

``RECORD`` holds the options (:class:`VGG11Options`), the module, the spec and
the layout of the original's ``cifar/models/vgg.py``: ``features.{j}`` conv
(OIHW) -> ``params/conv{i}/kernel`` (HWIO); with BatchNorm, ``features.{j+1}``
-> ``bn{i}``; ``classifier`` -> ``fc`` (its input is the flattened last map,
1x1 for 32x32 inputs).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Mapping

import flax.linen as nn
import jax.numpy as jnp

from otfusion_jax import spec as spec_lib
from otfusion_jax.models import torch_layout as tl
from otfusion_jax.models.common import sow_acts
from otfusion_jax.models.record import ConvNetOptions, conv_net_record

__all__ = ["VGG11", "VGG11Options", "vgg11_spec", "VGG11_CFG", "RECORD"]

# Conv widths and 2x2 max pools ("M"), as in the original's cifar/models/vgg.py.
VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


@dataclasses.dataclass(frozen=True)
class VGG11Options(ConvNetOptions):
    """Options of ``models.build("vgg11", ...)`` and ``config.model`` (``ConvNetOptions``; BatchNorm off by default)."""

    norm: bool = False
    model = "vgg11"


def _widths(width: float) -> list[int]:
    return [tl.scaled(c, width) for c in VGG11_CFG if c != "M"]


class VGG11(nn.Module):
    """VGG11: 8 3x3 convs (conv1..conv8, optional bn1..bn8) with 5 max pools, then one Dense "fc".

    Sows pre-/post-ReLU activations of each conv under its plan name ("conv{i}")
    and the logits under "fc".
    """

    num_classes: int = 10
    use_bias: bool = False
    use_norm: bool = False
    width: float = 1.0
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Args: x: (N, H, W, C) with H, W divisible by 32. Returns: (N, num_classes) logits."""
        widths = iter(_widths(self.width))
        i = 0
        for item in VGG11_CFG:
            if item == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            i += 1
            name = f"conv{i}"
            x = nn.Conv(next(widths), (3, 3), padding=1, use_bias=self.use_bias, name=name)(x)
            if self.use_norm:
                x = nn.BatchNorm(
                    use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5, name=f"bn{i}"
                )(x)
            y = nn.relu(x)
            sow_acts(self, name, x, y)
            x = y
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(self.num_classes, use_bias=self.use_bias, name="fc")(x)
        sow_acts(self, "fc", x)
        return x


def vgg11_spec(input_hw: tuple[int, int], *, bias: bool, norm: bool) -> spec_lib.AlignmentSpec:
    """Spec of VGG11 for inputs of spatial size ``input_hw`` (each divisible by 32)."""
    h, w = input_hw
    if h % 32 or w % 32:
        raise spec_lib.SpecError(
            f"vgg11 needs input height and width divisible by 32 (5 max pools), got {h}x{w}; "
            "pad the images (data.pad_to=32)"
        )
    leaves: dict[str, spec_lib.LeafSpec] = {}
    plans, prev = [], None
    for i in range(1, 9):
        name = f"conv{i}"
        leaves.update(spec_lib.conv(name, prev, name, bias=bias))
        if norm:
            leaves.update(spec_lib.norm(f"bn{i}", name))
        plans.append(name)
        prev = name
    leaves.update(spec_lib.flatten_dense("fc", (h // 32, w // 32), prev, "fc", bias=bias))
    plans.append("fc")
    return spec_lib.AlignmentSpec.build(leaves, plans, output_plan="fc")


# ----------------------------------------------------------------------------- the original's layout


def _torch_entries(o: VGG11Options, input_shape: tuple[int, int, int], num_classes: int) -> list[tl.TorchEntry]:
    h, w, c_in = input_shape
    out: list[tl.TorchEntry] = []
    j = i = 0
    for item in VGG11_CFG:
        if item == "M":
            j += 1  # MaxPool2d: no parameters
            continue
        i += 1
        c = tl.scaled(item, o.width)
        out += tl.conv_entries(f"features.{j}", f"conv{i}", c_in, c, 3, o.bias)
        if o.norm:
            out += tl.bn_entries(f"features.{j + 1}", f"bn{i}", c)
        j += 3 if o.norm else 2  # conv, [bn,] relu
        c_in = c
    hw = (h // 32, w // 32)
    return out + tl.dense_entries("classifier", "fc", c_in * hw[0] * hw[1], num_classes, o.bias, hw=hw)


def _torch_detect(keys: frozenset[str]) -> bool:
    return "classifier.weight" in keys and any(k.startswith("features.") for k in keys)


def _torch_infer(shapes: Mapping[str, tuple[int, ...]], input_shape):
    convs = [k for k, s in shapes.items() if re.fullmatch(r"features\.\d+\.weight", k) and len(s) == 4]
    if len(convs) != 8:
        raise tl.LayoutError(f"a VGG with {len(convs)} conv layers; only VGG11 (8 convs) is supported")
    c0, c_in = tl.require(shapes, "features.0.weight", 4, "vgg11")[:2]
    width = tl.width_of(c0, VGG11_CFG[0], "features.0.weight", "vgg11")
    norm = "features.1.running_mean" in shapes or "features.1.weight" in shapes
    options = VGG11Options(bias="features.0.bias" in shapes, norm=norm, width=width)
    classes, n_in = tl.require(shapes, "classifier.weight", 2, "vgg11")
    c_last = tl.scaled(512, width)
    if input_shape is None:
        k = n_in // c_last if n_in % c_last == 0 else 0
        s = math.isqrt(k)
        if s * s != k or k == 0:
            raise tl.LayoutError(
                f"key 'classifier.weight' reads {n_in} inputs, not {c_last} channels times a square map; "
                "pass input_shape"
            )
        input_shape = (32 * s, 32 * s, c_in)
    if input_shape[2] != c_in:
        raise tl.LayoutError(
            f"the first conv reads {c_in} channels but input_shape {tuple(input_shape)} has {input_shape[2]}"
        )
    if input_shape[0] % 32 or input_shape[1] % 32:
        raise tl.LayoutError(f"vgg11 needs H and W divisible by 32, got input_shape {tuple(input_shape)}")
    return options, tuple(input_shape), classes


def _torch_reads(paths: Collection[str]):
    norm = "params/bn1/scale" in paths
    reads, j, i = [], 0, 0
    for item in VGG11_CFG:
        if item == "M":
            j += 1
            continue
        i += 1
        reads.append((f"params/conv{i}/kernel", f"features.{j}.weight", True))
        j += 3 if norm else 2
    return reads + [
        ("params/conv1/bias", "features.0.bias", False),
        ("params/bn1/scale", "features.1.weight", False),
        ("params/fc/kernel", "classifier.weight", True),
    ]


RECORD = conv_net_record(
    "vgg11",
    VGG11Options,
    VGG11,
    lambda o, input_shape: vgg11_spec(input_shape[:2], bias=o.bias, norm=o.norm),
    torch=tl.TorchLayout(detect=_torch_detect, entries=_torch_entries, infer=_torch_infer, reads=_torch_reads),
    example_input_shape=(32, 32, 3),
    examples=(VGG11Options(width=0.125), VGG11Options(bias=True, norm=True, width=0.125)),
)
