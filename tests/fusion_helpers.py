"""Shared helpers for the fusion tests: random permutations along a spec, a small CNN, layouts."""

from __future__ import annotations

import os
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

from otfusion_jax import plans as plans_lib
from otfusion_jax.interop import layouts


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
    return plans_lib.apply_plans(variables, spec, plans)


def max_abs_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# ----------------------------------------------------------------------------- SmallCNN: the docs' example

DOC_EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "ADDING_A_MODEL.md")
_DOC_MODULE = "adding_a_model_example"


def doc_example_code(path=DOC_EXAMPLE):
    """The one ```python code block of docs/ADDING_A_MODEL.md."""
    with open(path, encoding="utf-8") as f:
        blocks = re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.DOTALL | re.MULTILINE)
    if len(blocks) != 1:
        raise AssertionError(f"{path} must hold exactly one ```python block, found {len(blocks)}")
    return blocks[0]


def load_doc_example():
    """Executes the docs' code block once per process, as module ``adding_a_model_example``.

    The block defines and registers the "small_cnn" model; a second call
    returns the same module (registering twice would be an error).
    """
    if _DOC_MODULE in sys.modules:
        return sys.modules[_DOC_MODULE]
    module = types.ModuleType(_DOC_MODULE)
    module.__file__ = DOC_EXAMPLE
    sys.modules[_DOC_MODULE] = module  # dataclasses and typing resolve annotations through it
    try:
        exec(compile(doc_example_code(), DOC_EXAMPLE, "exec"), module.__dict__)  # noqa: S102 - our own docs
    except BaseException:
        del sys.modules[_DOC_MODULE]
        raise
    return module


_EXAMPLE = load_doc_example()
SmallCNN = _EXAMPLE.SmallCNN  # conv-relu-pool-conv-relu-flatten-dense-relu-dense, sows acts_pre and acts_post
SMALL_CNN = _EXAMPLE.SMALL_CNN  # its registered record, "small_cnn"
small_cnn_spec = _EXAMPLE.small_cnn_spec  # small_cnn_spec(hw, bias): hw is conv2's map, flattened into fc1


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
