"""Shared helpers for the fusion tests: random permutations along a spec, a small CNN, layouts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from otfusion_jax import fusion
from otfusion_jax import spec as spec_lib
from otfusion_jax.interop import layouts
from otfusion_jax.models.common import ACT_PREFIX


def random_permutation_plans(spec, sizes, seed, keep_output=True):
    """Random permutation plans (n, n) for every plan of the spec (the output plan kept if asked)."""
    rng = np.random.default_rng(seed)
    plans, perms = {}, {}
    for name in spec.plans:
        n = sizes[name]
        p = np.arange(n) if (keep_output and name == spec.output_plan) else rng.permutation(n)
        perms[name] = p
        plans[name] = jnp.eye(n, dtype=jnp.float32)[:, p]  # target j takes source p[j]
    return plans, perms


def permuted_copy(variables, spec, seed, keep_output=True):
    """The same function with its hidden neurons randomly permuted along the spec."""
    plans, _ = random_permutation_plans(spec, spec.check_variables(variables), seed, keep_output)
    return fusion.apply_plans(variables, spec, plans)


def max_abs_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


class SmallCNN(nn.Module):
    """conv-relu-pool-conv-relu-flatten-dense-relu-dense: the minimal model with a conv->dense flatten.

    Written here, outside the library, as the example of adding an
    architecture: a module that sows its activations and a spec.
    """

    c1: int = 6
    c2: int = 8
    hidden: int = 12
    num_classes: int = 5
    use_bias: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(self.c1, (3, 3), padding=1, use_bias=self.use_bias, name="conv1")(x)
        self.sow("acts_pre", ACT_PREFIX + "conv1", x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = nn.Conv(self.c2, (3, 3), padding=1, use_bias=self.use_bias, name="conv2")(x)
        self.sow("acts_pre", ACT_PREFIX + "conv2", x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        x = nn.Dense(self.hidden, use_bias=self.use_bias, name="fc1")(x)
        self.sow("acts_pre", ACT_PREFIX + "fc1", x)
        x = nn.Dense(self.num_classes, use_bias=self.use_bias, name="fc2")(nn.relu(x))
        self.sow("acts_pre", ACT_PREFIX + "fc2", x)
        return x


def small_cnn_spec(hw, bias):
    leaves = {}
    leaves.update(spec_lib.conv("conv1", None, "conv1", bias=bias))
    leaves.update(spec_lib.conv("conv2", "conv1", "conv2", bias=bias))
    leaves.update(spec_lib.flatten_dense("fc1", hw, "conv2", "fc1", bias=bias))
    leaves.update(spec_lib.dense("fc2", "fc1", "fc2", bias=bias))
    return spec_lib.AlignmentSpec.build(leaves, ["conv1", "conv2", "fc1", "fc2"], output_plan="fc2")


def to_torch_layers(variables, kinds, flatten_hw=None):
    """Per-layer torch-layout weights and biases from Flax variables.

    Args:
      kinds: list of (name, "dense" | "conv" | "flatten").
      flatten_hw: (H, W) of the flattened map for the "flatten" layer.
    """
    p = variables["params"]
    ws, bs = [], []
    for name, kind in kinds:
        k = np.asarray(p[name]["kernel"], np.float64)
        if kind == "dense":
            ws.append(layouts.dense_to_torch(k))
        elif kind == "conv":
            ws.append(layouts.conv_to_torch(k))
        else:
            ws.append(layouts.flatten_dense_to_torch(k, flatten_hw))
        if "bias" in p[name]:
            bs.append(np.asarray(p[name]["bias"], np.float64))
    return ws, (bs or None)
