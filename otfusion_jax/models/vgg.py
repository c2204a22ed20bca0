"""CIFAR-style VGG11 (the OTFusion paper's CIFAR-10 model), biases and BatchNorm optional."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from otfusion_jax import spec as spec_lib
from otfusion_jax.models.common import ACT_PREFIX

__all__ = ["VGG11", "vgg11_spec", "VGG11_CFG"]

# Conv widths and 2x2 max pools ("M"), as in the original's cifar/models/vgg.py.
VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _widths(width: float) -> list[int]:
    return [max(1, int(round(c * width))) for c in VGG11_CFG if c != "M"]


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
            self.sow("acts_pre", ACT_PREFIX + name, x)
            x = nn.relu(x)
            self.sow("acts_post", ACT_PREFIX + name, x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(self.num_classes, use_bias=self.use_bias, name="fc")(x)
        self.sow("acts_pre", ACT_PREFIX + "fc", x)
        self.sow("acts_post", ACT_PREFIX + "fc", x)
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
