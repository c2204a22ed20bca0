"""Learned fusion (research): fit fusion parameters by gradient descent through Sinkhorn OTFusion.

The fused model is a differentiable function of a small parameter pytree:

* ``log_eps[plan]``: the Sinkhorn regularisation of each layer (how soft its
  transport plan is), differentiated through OTT-JAX's Sinkhorn;
* ``logits[plan]``: per-layer mixing weights over the K parents
  (``softmax(logits[plan])``), applied to every leaf whose output is that plan.

:func:`learn_fusion` minimises the cross-entropy of the fused model on a few
training batches with optax. To learn something else (per-neuron weights,
cost-metric parameters, a schedule over layers), add an entry to the pytree
returned by :func:`init_params` and use it in :func:`fused_from_params`: the
loss, the optimiser and the loop stay as they are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from otfusion_jax import fusion
from otfusion_jax import spec as spec_lib

__all__ = ["LearnConfig", "init_params", "aligned_from_params", "fused_from_params", "learn_fusion"]

Params = dict[str, dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class LearnConfig:
    """Optimisation settings of :func:`learn_fusion`.

    Attributes:
      steps: gradient steps.
      lr: Adam learning rate.
      batch_size: training examples per step.
      seed: batch sampling seed.
      learn_epsilon: fit the per-layer Sinkhorn epsilons.
      learn_weights: fit the per-layer mixing weights.
    """

    steps: int = 60
    lr: float = 0.05
    batch_size: int = 256
    seed: int = 0
    learn_epsilon: bool = True
    learn_weights: bool = True


def init_params(spec: spec_lib.AlignmentSpec, k: int, config: fusion.FusionConfig) -> Params:
    """Starting point: the config's epsilon in every layer, equal weights 1/K."""
    return {
        "log_eps": {p: jnp.asarray(math.log(config.epsilon), jnp.float32) for p in spec.plans},
        "logits": {p: jnp.zeros((k,), jnp.float32) for p in spec.plans},
    }


def aligned_from_params(
    params: Params,
    parents: Sequence[Mapping[str, Any]],
    spec: spec_lib.AlignmentSpec,
    config: fusion.FusionConfig,
    activations: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The parents moved onto the target with the per-layer epsilons of ``params`` (the target as it is)."""
    t = config.target % len(parents)
    eps = {p: jnp.exp(v) for p, v in params["log_eps"].items()}
    aligned = []
    for i, parent in enumerate(parents):
        if i == t:
            aligned.append(dict(parent))
            continue
        acts = (activations[i], activations[t]) if config.mode == "activations" else (None, None)
        al, _, _ = fusion.align(parent, parents[t], spec, config, parent_acts=acts[0], target_acts=acts[1], epsilons=eps)
        aligned.append(al)
    return aligned


def fused_from_params(
    params: Params,
    parents: Sequence[Mapping[str, Any]],
    spec: spec_lib.AlignmentSpec,
    config: fusion.FusionConfig,
    activations: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The fused variables for ``params`` (differentiable in ``params``)."""
    aligned = [spec_lib.flatten_paths(a) for a in aligned_from_params(params, parents, spec, config, activations)]
    out = {}
    for path, ls in spec.leaves:
        plan = ls.output_plan
        w = jax.nn.softmax(params["logits"][plan]) if plan is not None else jnp.full((len(parents),), 1 / len(parents))
        out[path] = sum(w[i].astype(a[path].dtype) * a[path] for i, a in enumerate(aligned))
    return spec_lib.unflatten_paths(out)


def learn_fusion(
    module: nn.Module,
    parents: Sequence[Mapping[str, Any]],
    spec: spec_lib.AlignmentSpec,
    config: fusion.FusionConfig,
    x: np.ndarray,
    y: np.ndarray,
    learn: LearnConfig = LearnConfig(),
    *,
    activations: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[dict[str, Any], Params, list[float]]:
    """Fits the fusion parameters on training data ``(x, y)`` by Adam through Sinkhorn.

    Args:
      module: the target's model (evaluates the fused variables).
      parents: K parent variable dicts (equal or different widths).
      spec: their alignment spec.
      config: a Sinkhorn FusionConfig (``solver="sinkhorn"``; unrolled
        differentiation, ``implicit_diff=False``, is the robust choice in float32).
      x, y: training examples and labels to fit on.
      learn: optimisation settings.
      activations: activation mode: per parent, plan -> activations.

    Returns:
      (fused variables at the final parameters, the parameters, loss per step).
    """
    if config.solver != "sinkhorn":
        raise fusion.FusionError("learned fusion differentiates through Sinkhorn: use FusionConfig(solver='sinkhorn')")
    parents = [dict(p) for p in parents]
    params = init_params(spec, len(parents), config)
    tx = optax.adam(learn.lr)
    mask = {"log_eps": learn.learn_epsilon, "logits": learn.learn_weights}

    def loss_fn(p, xb, yb):
        fused = fused_from_params(p, parents, spec, config, activations)
        logits = module.apply(fused, xb, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def step(p, opt_state, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
        grads = {k: jax.tree_util.tree_map(lambda g: g if mask[k] else jnp.zeros_like(g), v) for k, v in grads.items()}
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    rng = np.random.default_rng(learn.seed)
    opt_state = tx.init(params)
    history = []
    for _ in range(learn.steps):
        idx = rng.choice(len(x), size=min(learn.batch_size, len(x)), replace=False)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
        history.append(float(loss))
    fused = jax.jit(lambda p: fused_from_params(p, parents, spec, config, activations))(params)
    return fused, params, history
