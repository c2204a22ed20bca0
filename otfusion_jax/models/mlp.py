"""MLPNet: the fully connected network of the OTFusion paper (784-400-200-100-10)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from otfusion_jax import spec as spec_lib
from otfusion_jax.models.common import ACT_PREFIX

__all__ = ["MLPNet", "mlpnet_spec"]


class MLPNet(nn.Module):
    """ReLU MLP over flattened inputs. Layers are named fc1..fc{L+1} like the original.

    Sows each hidden layer's pre- and post-ReLU activations (and the logits) into
    the "acts_pre" / "acts_post" collections under the name of the plan they feed.
    """

    widths: Sequence[int] = (400, 200, 100)
    num_classes: int = 10
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Args: x: (N, H, W, C) images. Returns: (N, num_classes) logits."""
        del train  # no dropout or norm
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.widths):
            name = f"fc{i + 1}"
            x = nn.Dense(width, use_bias=self.use_bias, name=name)(x)
            self.sow("acts_pre", ACT_PREFIX + name, x)
            x = nn.relu(x)
            self.sow("acts_post", ACT_PREFIX + name, x)
        name = f"fc{len(self.widths) + 1}"
        x = nn.Dense(self.num_classes, use_bias=self.use_bias, name=name)(x)
        self.sow("acts_pre", ACT_PREFIX + name, x)
        self.sow("acts_post", ACT_PREFIX + name, x)
        return x


def mlpnet_spec(num_layers: int, *, bias: bool) -> spec_lib.AlignmentSpec:
    """Spec of an MLPNet with ``num_layers`` hidden layers: plan ``fc{i}`` on layer i's outputs."""
    names = [f"fc{i + 1}" for i in range(num_layers + 1)]
    leaves: dict[str, spec_lib.LeafSpec] = {}
    prev = None
    for name in names:
        leaves.update(spec_lib.dense(name, prev, name, bias=bias))
        prev = name
    return spec_lib.AlignmentSpec.build(leaves, names, output_plan=names[-1])
