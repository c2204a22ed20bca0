"""CIFAR-style ResNet18 (basic blocks, 1x1 projection shortcuts), biases and BatchNorm optional.

Every tensor added into one residual sum shares one plan: the stem and all block
outputs of stage s share plan ``res{s}`` (a stage's first block may change width
through its projection shortcut, whose output also carries ``res{s}``). Each
block's inner conv has its own plan ``layer{s}_{b}_conv1``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from otfusion_jax import spec as spec_lib
from otfusion_jax.models.common import ACT_PREFIX

__all__ = ["ResNet18", "resnet18_spec"]

STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (width, stride of the first block)
BLOCKS_PER_STAGE = 2


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
        self.sow("acts_pre", ACT_PREFIX + self.inner_plan, y)
        y = nn.relu(y)
        self.sow("acts_post", ACT_PREFIX + self.inner_plan, y)
        y = nn.Conv(self.features, (3, 3), padding=1, use_bias=self.use_bias, name="conv2")(y)
        y = self._norm(y, "bn2", train)
        if self.projection:
            x = nn.Conv(self.features, (1, 1), s, use_bias=self.use_bias, name="shortcut_conv")(x)
            x = self._norm(x, "shortcut_bn", train)
        y = y + x
        self.sow("acts_pre", ACT_PREFIX + self.out_plan, y)
        y = nn.relu(y)
        self.sow("acts_post", ACT_PREFIX + self.out_plan, y)
        return y


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
        w0 = max(1, int(round(STAGES[0][0] * self.width)))
        x = nn.Conv(w0, (3, 3), padding=1, use_bias=self.use_bias, name="conv1")(x)
        if self.use_norm:
            x = nn.BatchNorm(
                use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5, name="bn1"
            )(x)
        self.sow("acts_pre", ACT_PREFIX + "res1", x)
        x = nn.relu(x)
        self.sow("acts_post", ACT_PREFIX + "res1", x)
        for s, (features, stride) in enumerate(STAGES):
            for b in range(BLOCKS_PER_STAGE):
                x = BasicBlock(
                    features=max(1, int(round(features * self.width))),
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
        self.sow("acts_pre", ACT_PREFIX + "fc", x)
        self.sow("acts_post", ACT_PREFIX + "fc", x)
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

