"""Shared helpers for the fusion tests: random permutations along a spec, a small CNN, layouts."""

from __future__ import annotations

import os
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

from otfusion_jax import models as models_lib
from otfusion_jax import spec as spec_lib
from otfusion_jax.interop import layouts


def random_permutations(spec, sizes, seed, keep_output=True):
    """Random (n,) permutations (NumPy) for every plan of the spec (the output plan kept if asked).

    The plans of an attention head group share one random permutation of whole heads and
    each gets its own random permutation within every head (what keeps the model's function).
    """
    rng = np.random.default_rng(seed)
    perms = {
        name: np.arange(sizes[name]) if (keep_output and name == spec.output_plan) else rng.permutation(sizes[name])
        for name in spec.plans
    }
    for group in spec.heads:
        heads = rng.permutation(group.heads)
        for name in group.plans:
            d = sizes[name] // group.heads
            perms[name] = np.concatenate([heads[g] * d + rng.permutation(d) for g in range(group.heads)])
    return perms


def random_permutation_plans(spec, sizes, seed, keep_output=True):
    """The permutations of :func:`random_permutations` and their (n, n) plan matrices.

    Built in NumPy (an eager ``jnp.eye(n)[:, p]`` compiles two XLA programs for every new n).
    """
    perms = random_permutations(spec, sizes, seed, keep_output)
    plans = {name: jnp.asarray(np.eye(len(p), dtype=np.float32)[:, p]) for name, p in perms.items()}  # target j takes source p[j]
    return plans, perms


def permute_numpy(variables, spec, perms):
    """Every leaf's plan axes permuted in NumPy: ``y = take(x, perms[plan], axis)`` (target j takes source p[j]).

    The map :func:`otfusion_jax.plans.apply_plans` makes of ``(n,)`` integer plans, written again
    without the library: test inputs do not depend on the code under test, and nothing is compiled
    (the library's apply, eager or jitted, compiles XLA programs for every new width).
    """
    flat = spec_lib.flatten_paths(variables)
    out = {}
    for path, ls in spec.leaves:
        leaf = np.asarray(flat[path])
        x = leaf.reshape(spec_lib.view_shape(ls, leaf.shape, path))
        for ax, name in enumerate(ls.axes):
            if name is not None:
                x = np.take(x, perms[name], axis=ax)
        out[path] = jnp.asarray(x.reshape(leaf.shape))
    return spec_lib.unflatten_paths(out)


def permuted_copy(variables, spec, seed, keep_output=True):
    """The same function with its hidden neurons randomly permuted along the spec.

    The permutations of :func:`random_permutation_plans` (the same draws), applied by
    :func:`permute_numpy`.
    """
    return permute_numpy(variables, spec, random_permutations(spec, spec.check_variables(variables), seed, keep_output))


def max_abs_diff(a, b):
    """Largest absolute difference over all leaves (in NumPy: no XLA program per leaf shape)."""
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )


# The library's init, jitted with the module and input shape static (modules compare by value, so
# two equal builds share the compile): the same variables as ``models.init``, one XLA program
# instead of one per initializer op.
init_jit = jax.jit(models_lib.init, static_argnums=(0, 2))
apply_jit = jax.jit(lambda model, variables, x: model.apply(variables, x), static_argnums=0)


def random_variables(model, input_shape, seed=0):
    """NumPy-drawn variables of the model's shapes (``jax.eval_shape`` of init: nothing to compile).

    Kernels ~ N(0, 1/fan_in) (fan_in: every axis but the last), biases and BatchNorm offsets and
    means ~ N(0, 0.1^2), scales 1 + N(0, 0.1^2), running variances in [0.5, 1.5): nonzero everywhere,
    so a permutation that is off anywhere shows (flax's init leaves biases at zero).
    """
    shapes = spec_lib.flatten_paths(jax.eval_shape(lambda: models_lib.init(model, jax.random.key(0), input_shape)))
    rng = np.random.default_rng(seed)
    flat = {}
    for path, sd in sorted(shapes.items()):
        leaf = path.rsplit("/", 1)[-1]
        x = rng.standard_normal(sd.shape)
        if leaf == "kernel":
            x = x / np.sqrt(max(int(np.prod(sd.shape[:-1])), 1))
        elif leaf == "var":
            x = 0.5 + rng.random(sd.shape)
        elif leaf == "scale":
            x = 1.0 + 0.1 * x
        else:
            x = 0.1 * x
        flat[path] = jnp.asarray(x, sd.dtype)
    return spec_lib.unflatten_paths(flat)


# ----------------------------------------------------------------------------- SmallCNN: the docs' example

DOC_EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "ADDING_A_MODEL.md")
_DOC_MODULE = "adding_a_model_example"


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")


def shipped_parents(name="digits_mlpnet", count=2):
    """The ready-made parents ``checkpoints/<name>/parent_<k>``, k < count, as experiment Parents, and their spec."""
    from otfusion_jax import checkpoints, configs_util, experiment  # pylint: disable=import-outside-toplevel

    parents, spec = [], None
    for k in range(count):
        variables, meta = checkpoints.load(os.path.join(SHIPPED, name, f"parent_{k}"))
        module, spec = configs_util.model_from_metadata(meta)
        parents.append(experiment.Parent(f"parent {k}", module, variables))
    return parents, spec


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
