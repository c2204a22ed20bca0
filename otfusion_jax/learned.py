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
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from otfusion_jax import engine, fusion
from otfusion_jax import spec as spec_lib

__all__ = ["LearnConfig", "LearnedStats", "init_params", "aligned_from_params", "fused_from_params", "learn_fusion"]

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


class LearnedStats(NamedTuple):
    """``aux.stats`` of :func:`learn_fusion` (the same entry for every non-target parent).

    Attributes:
      params: the fitted parameters (``log_eps``, ``logits``).
      history: training loss per step.
    """

    params: Params
    history: list[float]


def init_params(spec: spec_lib.AlignmentSpec, k: int, config: fusion.FusionConfig) -> Params:
    """Starting point: the config's epsilon in every layer, equal weights 1/K.

    Raises:
      FusionError: ``config.stream_policy`` other than "shared" (the epsilons are keyed by ``spec.plans``).
    """
    if config.stream_policy != "shared":
        raise engine.FusionError(
            f"learned fusion keys its epsilons by the spec's plans; stream_policy={config.stream_policy!r} solves "
            "others: use stream_policy='shared'"
        )
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
    target: int = -1,
) -> tuple[list[dict[str, Any]], engine.FusionAux]:
    """The parents moved onto the target with the per-layer epsilons of ``params`` (the target as it is)."""
    eps = {p: jnp.exp(v) for p, v in params["log_eps"].items()}
    return engine.align_parents(parents, spec, config, activations=activations, target=target, params=eps)


def fused_from_params(
    params: Params,
    parents: Sequence[Mapping[str, Any]],
    spec: spec_lib.AlignmentSpec,
    config: fusion.FusionConfig,
    activations: Sequence[Mapping[str, Any]] | None = None,
    target: int = -1,
) -> dict[str, Any]:
    """The fused variables for ``params`` (differentiable in ``params``)."""
    aligned, _ = aligned_from_params(params, parents, spec, config, activations, target)
    aligned = [spec_lib.flatten_paths(a) for a in aligned]
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
    target: int = -1,
) -> tuple[dict[str, Any], engine.FusionAux]:
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
      target: index of the parent whose widths and order the fused model takes.

    Returns:
      (fused variables at the final parameters, FusionAux of their alignment
      with ``aux.stats[i]`` a :class:`LearnedStats` (parameters, loss per
      step) for every non-target parent). ``aux.weights`` is 1/K: the fused
      model mixes the aligned parents per layer with ``softmax(params["logits"])``.
    """
    if config.solver != "sinkhorn":
        raise engine.FusionError("learned fusion differentiates through Sinkhorn: use FusionConfig(solver='sinkhorn')")
    parents = [dict(p) for p in parents]
    params = init_params(spec, len(parents), config)
    tx = optax.adam(learn.lr)
    mask = {"log_eps": learn.learn_epsilon, "logits": learn.learn_weights}

    def loss_fn(p, xb, yb, parents):
        fused = fused_from_params(p, parents, spec, config, activations, target)
        logits = module.apply(fused, xb, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    # The parents are arguments, not closed-over constants: XLA would otherwise
    # constant-fold their cost matrices at every compile (seconds for MLPNet).
    @jax.jit
    def step(p, opt_state, xb, yb, parents):
        loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb, parents)
        grads = {k: jax.tree_util.tree_map(lambda g: g if mask[k] else jnp.zeros_like(g), v) for k, v in grads.items()}
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    rng = np.random.default_rng(learn.seed)
    opt_state = tx.init(params)
    history = []
    for _ in range(learn.steps):
        idx = rng.choice(len(x), size=min(learn.batch_size, len(x)), replace=False)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx]), parents)
        history.append(float(loss))
    fused = jax.jit(lambda p, ps: fused_from_params(p, ps, spec, config, activations, target))(params, parents)
    _, aux = aligned_from_params(params, parents, spec, config, activations, target)
    report = LearnedStats(params, history)
    return fused, aux._replace(stats=tuple(None if pl is None else report for pl in aux.plans))
