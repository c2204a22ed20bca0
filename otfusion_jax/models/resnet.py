"""CIFAR-style ResNet18 (basic blocks, 1x1 projection shortcuts), biases and BatchNorm optional.

Every tensor added into one residual sum shares one plan: the stem and all block
outputs of stage s share plan ``res{s}`` (a stage's first block may change width
through its projection shortcut, whose output also carries ``res{s}``). Each
block's inner conv has its own plan ``layer{s}_{b}_conv1``.

``RECORD`` holds the options (:class:`ResNet18Options`), the module, the spec
and the layout of the original's ``cifar/models/resnet.py``: ``conv1``/``bn1``,
``layer{s}.{b}.conv1|bn1|conv2|bn2``, ``layer{s}.0.shortcut.0|1`` ->
``layer{s}_{b}/shortcut_conv|shortcut_bn``, ``linear`` -> ``fc``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping

import flax.linen as nn
import jax.numpy as jnp

from otfusion_jax import spec as spec_lib
from otfusion_jax.models import torch_layout as tl
from otfusion_jax.models.common import sow_acts
from otfusion_jax.models.record import ConvNetOptions, conv_net_record

__all__ = ["ResNet18", "ResNet18Options", "resnet18_spec", "RECORD"]

STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (width, stride of the first block)
BLOCKS_PER_STAGE = 2


@dataclasses.dataclass(frozen=True)
class ResNet18Options(ConvNetOptions):
    """Options of ``models.build("resnet18", ...)`` and ``config.model`` (``ConvNetOptions``; BatchNorm on by default)."""

    norm: bool = True
    model = "resnet18"


def _needs_projection(stage: int, block: int) -> bool:
    return block == 0 and stage > 0  # stage 1 keeps width 64 and stride 1: identity shortcut


class BasicBlock(nn.Module):
    """conv-(bn)-relu-conv-(bn) + shortcut, then ReLU."""

    features: int
    strides: int
    projection: bool
    inner_plan: str
    out_plan: str
    use_bias: bool
    use_norm: bool
    bn_momentum: float

    def _norm(self, x, name, train):
        if not self.use_norm:
            return x
        return nn.BatchNorm(
            use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5, name=name
        )(x)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        s = (self.strides, self.strides)
        y = nn.Conv(self.features, (3, 3), s, padding=1, use_bias=self.use_bias, name="conv1")(x)
        y = self._norm(y, "bn1", train)
        z = nn.relu(y)
        sow_acts(self, self.inner_plan, y, z)
        y = z
        y = nn.Conv(self.features, (3, 3), padding=1, use_bias=self.use_bias, name="conv2")(y)
        y = self._norm(y, "bn2", train)
        if self.projection:
            x = nn.Conv(self.features, (1, 1), s, use_bias=self.use_bias, name="shortcut_conv")(x)
            x = self._norm(x, "shortcut_bn", train)
        y = y + x
        z = nn.relu(y)
        sow_acts(self, self.out_plan, y, z)
        return z


class ResNet18(nn.Module):
    """ResNet18 for 32x32 inputs (any size works: the head is a global average pool)."""

    num_classes: int = 10
    use_bias: bool = False
    use_norm: bool = True
    width: float = 1.0
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Args: x: (N, H, W, C). Returns: (N, num_classes) logits."""
        w0 = tl.scaled(STAGES[0][0], self.width)
        x = nn.Conv(w0, (3, 3), padding=1, use_bias=self.use_bias, name="conv1")(x)
        if self.use_norm:
            x = nn.BatchNorm(
                use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5, name="bn1"
            )(x)
        y = nn.relu(x)
        sow_acts(self, "res1", x, y)
        x = y
        for s, (features, stride) in enumerate(STAGES):
            for b in range(BLOCKS_PER_STAGE):
                x = BasicBlock(
                    features=tl.scaled(features, self.width),
                    strides=stride if b == 0 else 1,
                    projection=_needs_projection(s, b),
                    inner_plan=f"layer{s + 1}_{b}_conv1",
                    out_plan=f"res{s + 1}",
                    use_bias=self.use_bias,
                    use_norm=self.use_norm,
                    bn_momentum=self.bn_momentum,
                    name=f"layer{s + 1}_{b}",
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, use_bias=self.use_bias, name="fc")(x)
        sow_acts(self, "fc", x)
        return x


def resnet18_spec(*, bias: bool, norm: bool) -> spec_lib.AlignmentSpec:
    """Spec of ResNet18: residual streams share plans res1..res4."""
    leaves: dict[str, spec_lib.LeafSpec] = {}
    leaves.update(spec_lib.conv("conv1", None, "res1", bias=bias))
    if norm:
        leaves.update(spec_lib.norm("bn1", "res1"))
    plans = ["res1"]
    for s in range(len(STAGES)):
        stream_in = f"res{s}" if s > 0 else "res1"
        stream = f"res{s + 1}"
        for b in range(BLOCKS_PER_STAGE):
            block, inner = f"layer{s + 1}_{b}", f"layer{s + 1}_{b}_conv1"
            block_in = stream_in if b == 0 else stream
            leaves.update(spec_lib.conv(f"{block}/conv1", block_in, inner, bias=bias))
            leaves.update(spec_lib.conv(f"{block}/conv2", inner, stream, bias=bias))
            if norm:
                leaves.update(spec_lib.norm(f"{block}/bn1", inner))
                leaves.update(spec_lib.norm(f"{block}/bn2", stream))
            if _needs_projection(s, b):
                leaves.update(spec_lib.conv(f"{block}/shortcut_conv", block_in, stream, bias=bias))
                if norm:
                    leaves.update(spec_lib.norm(f"{block}/shortcut_bn", stream))
            plans.append(inner)
            if b == 0 and s > 0:
                plans.append(stream)  # ready once the first block's conv1 plan is known
    leaves.update(spec_lib.dense("fc", "res4", "fc", bias=bias))
    plans.append("fc")
    return spec_lib.AlignmentSpec.build(leaves, plans, output_plan="fc")



# ----------------------------------------------------------------------------- the original's layout


def _torch_entries(o: ResNet18Options, input_shape: tuple[int, int, int], num_classes: int) -> list[tl.TorchEntry]:
    c_in = input_shape[2]
    c0 = tl.scaled(STAGES[0][0], o.width)
    out = tl.conv_entries("conv1", "conv1", c_in, c0, 3, o.bias)
    if o.norm:
        out += tl.bn_entries("bn1", "bn1", c0)
    c_in = c0
    for s, (features, _) in enumerate(STAGES):
        c = tl.scaled(features, o.width)
        for b in range(BLOCKS_PER_STAGE):
            key, block = f"layer{s + 1}.{b}", f"layer{s + 1}_{b}"
            out += tl.conv_entries(f"{key}.conv1", f"{block}/conv1", c_in, c, 3, o.bias)
            if o.norm:
                out += tl.bn_entries(f"{key}.bn1", f"{block}/bn1", c)
            out += tl.conv_entries(f"{key}.conv2", f"{block}/conv2", c, c, 3, o.bias)
            if o.norm:
                out += tl.bn_entries(f"{key}.bn2", f"{block}/bn2", c)
            if _needs_projection(s, b):
                out += tl.conv_entries(f"{key}.shortcut.0", f"{block}/shortcut_conv", c_in, c, 1, o.bias)
                if o.norm:
                    out += tl.bn_entries(f"{key}.shortcut.1", f"{block}/shortcut_bn", c)
            c_in = c
    return out + tl.dense_entries("linear", "fc", c_in, num_classes, o.bias)


def _torch_detect(keys: frozenset[str]) -> bool:
    return {"conv1.weight", "linear.weight"} <= keys and any(k.startswith("layer1.") for k in keys)


def _torch_infer(shapes: Mapping[str, tuple[int, ...]], input_shape):
    c0, c_in = tl.require(shapes, "conv1.weight", 4, "resnet18")[:2]
    width = tl.width_of(c0, STAGES[0][0], "conv1.weight", "resnet18")
    norm = "bn1.weight" in shapes or "bn1.running_mean" in shapes
    options = ResNet18Options(bias="conv1.bias" in shapes, norm=norm, width=width)
    classes = tl.require(shapes, "linear.weight", 2, "resnet18")[0]
    if input_shape is None:
        input_shape = (32, 32, c_in)
    if input_shape[2] != c_in:
        raise tl.LayoutError(
            f"the first conv reads {c_in} channels but input_shape {tuple(input_shape)} has {input_shape[2]}"
        )
    return options, tuple(input_shape), classes


def _torch_reads(paths: Collection[str]):
    del paths
    return [
        ("params/conv1/kernel", "conv1.weight", True),
        ("params/conv1/bias", "conv1.bias", False),
        ("params/bn1/scale", "bn1.weight", False),
        ("params/fc/kernel", "linear.weight", True),
    ]


RECORD = conv_net_record(
    "resnet18",
    ResNet18Options,
    ResNet18,
    lambda o, input_shape: resnet18_spec(bias=o.bias, norm=o.norm),
    torch=tl.TorchLayout(detect=_torch_detect, entries=_torch_entries, infer=_torch_infer, reads=_torch_reads),
    example_input_shape=(8, 8, 3),
    examples=(ResNet18Options(width=0.125), ResNet18Options(bias=True, norm=False, width=0.125)),
)
