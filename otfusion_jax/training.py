"""Supervised training and evaluation of the classifiers (parents and fine-tuning).

The optimiser is PyTorch-style SGD: heavy-ball momentum without dampening,
optional Nesterov, and *coupled* L2 weight decay (``grad + wd * param`` before
the momentum buffer, like ``torch.optim.SGD(weight_decay=...)``), with a
learning-rate schedule given in epochs and converted to steps.

>>> cfg = TrainConfig(epochs=10, batch_size=64, lr=0.01, momentum=0.5)
>>> variables, history = train(module, variables, dataset, cfg)
>>> evaluate(module, variables, dataset.x_test, dataset.y_test)["accuracy"]

``train`` starts from any variables, so fine-tuning a fused model for N epochs
is ``train(module, fused_variables, dataset, dataclasses.replace(cfg, epochs=N))``.

Determinism: given the same variables, data and config, ``train`` is
reproducible; the data order of epoch ``e`` is a permutation drawn from
``np.random.SeedSequence([cfg.seed, e])`` (no ``hash()``-salted keys).

The step functions are jitted once at module level, with the Flax module and
the optax transformation as static arguments: they retrace only for a new
module, optimiser, or batch shape (a partial last batch is one more shape).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from otfusion_jax import data as data_lib

__all__ = [
    "SCHEDULES",
    "AUGMENTATIONS",
    "augment_batch",
    "TrainConfig",
    "TrainState",
    "make_schedule",
    "make_optimizer",
    "cross_entropy",
    "distillation_loss",
    "teacher_probabilities",
    "train_step",
    "eval_step",
    "logits_step",
    "train",
    "evaluate",
    "predict_logits",
    "epoch_seed",
]

SCHEDULES = ("constant", "step", "multistep", "cosine")
OPTIMIZERS = ("sgd", "adamw")
AUGMENTATIONS = ("none", "crop", "flip_crop")

# Collections a model may sow into; never part of the trainable state.
_TRANSIENT_COLLECTIONS = ("acts_pre", "acts_post", "intermediates")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run (hashable, usable as a static argument).

    Attributes:
      epochs: Number of passes over the training set (0: no training).
      batch_size: Examples per SGD step.
      lr: Base learning rate.
      momentum: Heavy-ball momentum in [0, 1) (0: plain SGD).
      nesterov: Nesterov momentum.
      weight_decay: Coupled L2 coefficient: ``wd * param`` is added to the
        gradient before momentum (PyTorch SGD semantics), for every leaf.
      schedule: ``"constant"``; ``"step"`` (multiply by ``gamma`` every
        ``step_every`` epochs); ``"multistep"`` (multiply by ``gamma`` at each
        epoch in ``milestones``); ``"cosine"`` (cosine decay to 0 over all
        steps of the run).
      step_every: Period in epochs of the ``"step"`` schedule.
      gamma: Decay factor of ``"step"`` and ``"multistep"``.
      milestones: Increasing epochs at which ``"multistep"`` decays.
      seed: Seed of the data order (the model init is the caller's).
      label_smoothing: Label smoothing of the training loss, in [0, 1).
      drop_remainder: Drop the last partial training batch of each epoch
        (PyTorch's ``drop_last``); False keeps it (one extra compilation).
      eval_batch_size: Batch size of the per-epoch test evaluation.
      optimizer: ``"sgd"`` (momentum, coupled L2 ``weight_decay``: PyTorch's
        SGD) or ``"adamw"`` (Adam with decoupled ``weight_decay``, betas 0.9 /
        0.999: the transformers' recipe; ``momentum`` is not used).
      warmup_epochs: Linear warm-up of the learning rate from 0 over this
        many epochs (fractions allowed), then the schedule; a cosine decays
        over the remaining steps, and the "step" / "multistep" epochs count
        from the end of the warm-up.
      augment: training-image augmentation, drawn anew every epoch from
        ``(seed, epoch)``: ``"none"``; ``"crop"`` (pad every side by an eighth
        of the image's height with its border pixels, then a random crop back
        to the image's size); ``"flip_crop"`` (also a horizontal flip of half
        the images). The standard CIFAR / Fashion-MNIST recipe against overfitting.
      distill: weight w in [0, 1] of a teacher's soft targets in the loss (knowledge distillation, Hinton et
        al. 2015): ``(1 - w) * CE(labels) + w * T^2 * CE(teacher_T, softmax(logits / T))``; 0: labels only.
        :func:`train` then needs the teacher's probabilities (:func:`teacher_probabilities`).
      distill_temperature: T of the distillation term (> 0); the teacher's probabilities must be taken at it.
        The history's ``train_loss`` is then this mixed loss (its teacher term includes the teacher's entropy:
        not comparable with a labels-only run's).
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.5
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    step_every: int = 30
    gamma: float = 0.1
    milestones: tuple[int, ...] = ()
    seed: int = 0
    label_smoothing: float = 0.0
    drop_remainder: bool = False
    eval_batch_size: int = 1000
    optimizer: str = "sgd"
    warmup_epochs: float = 0.0
    augment: str = "none"
    distill: float = 0.0
    distill_temperature: float = 1.0

    def __post_init__(self) -> None:
        """Validates the fields and normalises ``milestones`` to a tuple of ints.

        Raises:
          ValueError: If a field is out of range; the message names the field.
        """
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        checks = [
            ("epochs", self.epochs >= 0, "must be >= 0"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "must be a finite number > 0"),
            ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
            ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "must be >= 0"),
            ("schedule", self.schedule in SCHEDULES, f"must be one of {SCHEDULES}"),
            ("step_every", self.step_every >= 1, "must be >= 1 (epochs)"),
            ("gamma", 0 < self.gamma <= 1, "must be in (0, 1]"),
            (
                "milestones",
                all(m >= 1 for m in self.milestones)
                and list(self.milestones) == sorted(set(self.milestones)),
                "must be strictly increasing epochs >= 1",
            ),
            ("seed", self.seed >= 0, "must be >= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
            ("eval_batch_size", self.eval_batch_size >= 1, "must be >= 1"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"must be one of {OPTIMIZERS}"),
            ("augment", self.augment in AUGMENTATIONS, f"must be one of {AUGMENTATIONS}"),
            ("distill", 0 <= self.distill <= 1, "must be in [0, 1]"),
            ("distill_temperature", math.isfinite(self.distill_temperature) and self.distill_temperature > 0,
             "must be a finite number > 0"),
            ("warmup_epochs", math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs <= max(self.epochs, 0),
             "must be in [0, epochs]"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name} {what}, got {getattr(self, name)!r}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("TrainConfig.nesterov needs momentum > 0")
        if self.distill > 0 and self.augment != "none":
            raise ValueError(
                f"TrainConfig.distill={self.distill} takes the teacher's probabilities on the unaugmented images; "
                f"it cannot be combined with augment={self.augment!r}"
            )


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training (a pytree; no functions inside).

    Attributes:
      step: Number of optimiser updates done, int32 scalar.
      params: The model's ``"params"`` collection.
      batch_stats: The ``"batch_stats"`` collection (``{}`` without BatchNorm).
      opt_state: The optax state.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @classmethod
    def create(cls, variables: Mapping[str, Any], tx: optax.GradientTransformation) -> TrainState:
        """Builds the initial state from model variables.

        Args:
          variables: ``{"params": ..., ["batch_stats": ...]}``.
          tx: The optimiser.

        Returns:
          A state at step 0 with a fresh optimiser state.
        """
        if "params" not in variables:
            raise ValueError(f"variables need a 'params' collection, got keys {sorted(variables)}")
        params = jax.tree.map(jnp.asarray, dict(variables["params"]))
        batch_stats = jax.tree.map(jnp.asarray, dict(variables.get("batch_stats", {})))
        return cls(
            step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=tx.init(params)
        )

    @property
    def variables(self) -> dict[str, Any]:
        """The model variables ``{"params": ..., ["batch_stats": ...]}``."""
        out = {"params": self.params}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out


def make_schedule(cfg: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate as a function of the number of updates done.

    Epoch-based settings become step boundaries: the rate changes at the first
    step of an epoch, as a PyTorch scheduler stepped once per epoch does.

    Args:
      cfg: The training config.
      steps_per_epoch: Optimiser steps per epoch (>= 1).

    Returns:
      An optax schedule ``count -> lr``.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if warmup > 0:
        rest = dataclasses.replace(cfg, warmup_epochs=0.0)
        if cfg.schedule == "cosine":
            after = optax.cosine_decay_schedule(cfg.lr, decay_steps=max(1, cfg.epochs * steps_per_epoch - warmup))
        else:
            after = make_schedule(rest, steps_per_epoch)
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    if cfg.schedule == "step":
        return optax.exponential_decay(
            cfg.lr, transition_steps=cfg.step_every * steps_per_epoch, decay_rate=cfg.gamma, staircase=True
        )
    if cfg.schedule == "multistep":
        boundaries = {m * steps_per_epoch: cfg.gamma for m in cfg.milestones}
        return optax.piecewise_constant_schedule(cfg.lr, boundaries)
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(cfg.lr, decay_steps=max(1, cfg.epochs * steps_per_epoch))
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of {SCHEDULES}")


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum and coupled L2 weight decay, PyTorch semantics.

    ``g <- g + wd * p; buf <- momentum * buf + g; p <- p - lr_t * buf`` (Nesterov:
    ``p <- p - lr_t * (g + momentum * buf)``), like ``torch.optim.SGD`` with
    ``dampening=0``. Equal hyperparameters give the same (memoised) object,
    so that :func:`train_step`, which takes it as a static argument, is not
    recompiled for every parent.

    Args:
      cfg: The training config.
      steps_per_epoch: Optimiser steps per epoch, to convert the schedule.

    Returns:
      The optax transformation.
    """
    # Runs that differ only in seed (parents) or in fields the optimiser ignores get the
    # same transformation object, hence share train_step's compilation.
    sched = cfg.schedule
    key = dataclasses.replace(
        cfg,
        seed=0,
        label_smoothing=0.0,
        drop_remainder=False,
        eval_batch_size=1,
        augment="none",
        distill=0.0,
        distill_temperature=1.0,
        epochs=cfg.epochs if sched == "cosine" or cfg.warmup_epochs else 0,
        step_every=cfg.step_every if sched == "step" else 1,
        gamma=cfg.gamma if sched in ("step", "multistep") else 1.0,
        milestones=cfg.milestones if sched == "multistep" else (),
    )
    constant = sched == "constant" and not cfg.warmup_epochs
    return _make_optimizer_cached(key, 1 if constant else int(steps_per_epoch))


@functools.lru_cache(maxsize=64)
def _make_optimizer_cached(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Builds the optimiser of :func:`make_optimizer` (memoised)."""
    schedule = make_schedule(cfg, steps_per_epoch)
    if cfg.optimizer == "adamw":
        return optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=cfg.weight_decay)
    parts = []
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    parts.append(optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    return optax.chain(*parts)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy.

    Args:
      logits: (N, C) logits.
      labels: (N,) integer labels.
      label_smoothing: Mass spread uniformly over the C classes.

    Returns:
      (N,) losses.
    """
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        return optax.softmax_cross_entropy(logits, targets)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def distillation_loss(logits: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
    """Per-example ``T^2 * CE(teacher, softmax(logits / T))`` (KL to the teacher up to a constant; the ``T^2``
    keeps its gradient on the scale of the label loss's, Hinton et al. 2015).

    Args:
      logits: (N, C) student logits.
      teacher: (N, C) teacher probabilities at temperature T.
      temperature: T.
    """
    return temperature**2 * optax.softmax_cross_entropy(logits / temperature, teacher)


@functools.partial(jax.jit, static_argnames=("module", "tx", "label_smoothing", "distill", "temperature"))
def train_step(
    state: TrainState,
    batch: tuple[jax.Array, ...],
    *,
    module: nn.Module,
    tx: optax.GradientTransformation,
    label_smoothing: float = 0.0,
    distill: float = 0.0,
    temperature: float = 1.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a batch (pure, jitted; module and tx are static).

    Args:
      state: The training state.
      batch: ``(x, y)``: (B, H, W, C) inputs and (B,) integer labels; with ``distill`` > 0, ``(x, y, teacher)``
        with the teacher's (B, C) probabilities at ``temperature``.
      module: The Flax model, called as ``module.apply(v, x, train=True)``.
      tx: The optimiser that built ``state.opt_state``.
      label_smoothing: Label smoothing of the loss.
      distill: Weight of the distillation term (:func:`distillation_loss`); the label term gets ``1 - distill``.
      temperature: Its temperature.

    Returns:
      ``(new_state, metrics)`` with metrics ``loss_sum`` (sum of the batch's
      per-example losses), ``correct`` and ``count`` (scalars).
    """
    x, y = batch[0], batch[1]

    def loss_fn(params):
        if state.batch_stats:
            logits, updated = module.apply(
                {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            new_stats = updated["batch_stats"]
        else:
            logits = module.apply({"params": params}, x, train=True)
            new_stats = state.batch_stats
        losses = cross_entropy(logits, y, label_smoothing)
        if distill:
            losses = (1.0 - distill) * losses + distill * distillation_loss(logits, batch[2], temperature)
        return losses.mean(), (losses, logits, new_stats)

    grads, (losses, logits, new_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss_sum": losses.sum(),
        "correct": (jnp.argmax(logits, -1) == y).sum(),
        "count": jnp.asarray(y.shape[0], jnp.int32),
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state)
    return new_state, metrics


@functools.partial(jax.jit, static_argnames=("module",))
def eval_step(
    variables: Mapping[str, Any], x: jax.Array, y: jax.Array, mask: jax.Array, *, module: nn.Module
) -> dict[str, jax.Array]:
    """Sums of test loss and correct predictions over the unmasked examples.

    Args:
      variables: Model variables.
      x: (B, H, W, C) inputs.
      y: (B,) integer labels.
      mask: (B,) bool, False for padding rows.
      module: The Flax model (static).

    Returns:
      ``{"loss_sum", "correct", "count"}`` scalars over the rows where ``mask``.
    """
    logits = module.apply(variables, x, train=False)
    losses = cross_entropy(logits, y)
    correct = jnp.argmax(logits, -1) == y
    return {
        "loss_sum": jnp.where(mask, losses, 0.0).sum(),
        "correct": jnp.where(mask, correct, False).sum(),
        "count": mask.sum(),
    }


@functools.partial(jax.jit, static_argnames=("module",))
def logits_step(variables: Mapping[str, Any], x: jax.Array, *, module: nn.Module) -> jax.Array:
    """Eval-mode logits, (B, num_classes), of a batch (jitted; module static)."""
    return module.apply(variables, x, train=False)


def _model_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Drops transient collections (sown activations) from ``variables``."""
    return {k: v for k, v in variables.items() if k not in _TRANSIENT_COLLECTIONS}


def _padded_batches(x: np.ndarray, batch_size: int, y: np.ndarray | None = None):
    """Yields fixed-size batches in order, zero-padding the last (one compiled shape).

    Args:
      x: (N, ...) inputs, N >= 1.
      batch_size: Rows per batch.
      y: Optional (N,) labels.

    Yields:
      ``(x_batch, y_batch_or_None, mask, n_valid)``.
    """
    n = len(x)
    for lo in range(0, n, batch_size):
        xb = x[lo : lo + batch_size]
        yb = None if y is None else y[lo : lo + batch_size]
        valid = len(xb)
        mask = np.ones(batch_size, bool)
        if valid < batch_size:
            pad = batch_size - valid
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            if yb is not None:
                yb = np.concatenate([yb, np.zeros((pad,), yb.dtype)])
            mask[valid:] = False
        yield xb, yb, mask, valid


def evaluate(
    module: nn.Module,
    variables: Mapping[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of a model (eval mode) on ``(x, y)``.

    Batches are padded to one shape, so each (module, batch size, input shape)
    compiles once.

    Args:
      module: The Flax model.
      variables: Its variables.
      x: (N, H, W, C) inputs, N >= 1.
      y: (N,) integer labels.
      batch_size: Examples per forward pass (capped at N).

    Returns:
      ``{"loss": float, "accuracy": float}`` (accuracy in [0, 1]).
    """
    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(f"evaluate needs N >= 1 examples and as many labels, got {n} and {len(y)}")
    variables = _model_variables(variables)
    bs = min(int(batch_size), n)
    totals = None
    for xb, yb, mask, _ in _padded_batches(np.asarray(x), bs, np.asarray(y)):
        m = eval_step(variables, xb, yb, mask, module=module)
        totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
    totals = jax.device_get(totals)
    return {"loss": float(totals["loss_sum"]) / n, "accuracy": float(totals["correct"]) / n}


def predict_logits(
    module: nn.Module, variables: Mapping[str, Any], x: np.ndarray, batch_size: int = 1000
) -> np.ndarray:
    """Eval-mode logits of a model on ``x``.

    Args:
      module: The Flax model.
      variables: Its variables.
      x: (N, H, W, C) inputs.
      batch_size: Examples per forward pass (capped at N).

    Returns:
      (N, num_classes) float32 NumPy array.
    """
    n = len(x)
    variables = _model_variables(variables)
    if n == 0:
        raise ValueError("predict_logits needs at least one example")
    bs = min(int(batch_size), n)
    outs = []
    for xb, _, _, valid in _padded_batches(np.asarray(x), bs):
        outs.append(logits_step(variables, xb, module=module)[:valid])
    return np.asarray(jax.device_get(jnp.concatenate(outs)), np.float32)


def teacher_probabilities(
    models: Sequence[tuple[nn.Module, Mapping[str, Any]]], x: np.ndarray, temperature: float = 1.0,
    batch_size: int = 1000,
) -> np.ndarray:
    """The prediction ensemble as a teacher: the mean over ``models`` of ``softmax(logits / temperature)``.

    Args:
      models: ``(module, variables)`` pairs (e.g. the parents of a fusion).
      x: (N, H, W, C) inputs (the training images the student is fine-tuned on).
      temperature: Softmax temperature (> 0).
      batch_size: Examples per forward pass.

    Returns:
      (N, num_classes) float32 probabilities.
    """
    if not models:
        raise ValueError("teacher_probabilities needs at least one model")
    probs = [jax.nn.softmax(predict_logits(m, v, x, batch_size) / temperature, axis=-1) for m, v in models]
    return np.asarray(sum(probs) / len(probs), np.float32)


def epoch_seed(seed: int, epoch: int) -> int:
    """The data-order seed of ``epoch`` (0-based) in a run with ``seed``.

    Distinct ``(seed, epoch)`` pairs give unrelated orders (unlike ``seed +
    epoch``, which would make run k's epoch 1 run k+1's epoch 0).

    Args:
      seed: The run's seed (>= 0).
      epoch: Epoch index (>= 0).

    Returns:
      A 32-bit seed for :func:`otfusion_jax.data.batches`.
    """
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def augment_batch(x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``TrainConfig.augment`` on a batch of (N, H, W, C) images (a new array; ``"none"`` returns ``x``).

    ``"crop"``: pad each side by ``max(1, H // 8)`` pixels repeating the border, then cut a random H x W window
    per image; ``"flip_crop"``: also flip half the images left to right (chosen at random).
    """
    if kind == "none":
        return x
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {kind!r}")
    n, h, w, _ = x.shape
    pad = max(1, h // 8)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
    rows = dy[:, None] + np.arange(h)[None, :]  # (N, H)
    cols = dx[:, None] + np.arange(w)[None, :]  # (N, W)
    out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if kind == "flip_crop":
        flip = rng.random(n) < 0.5
        out[flip] = out[flip, :, ::-1]
    return np.ascontiguousarray(out)


def train(
    module: nn.Module,
    variables: Mapping[str, Any],
    dataset: data_lib.Dataset,
    cfg: TrainConfig,
    *,
    progress: bool | Callable[[dict[str, Any]], None] = True,
    eval_every_epoch: bool = True,
    teacher: np.ndarray | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Trains (or fine-tunes) ``variables`` on ``dataset.x_train`` for ``cfg.epochs``.

    The optimiser starts fresh (zero momentum, schedule at step 0), so this
    serves for parents from their initialisation and for fine-tuning fused
    variables alike.

    Args:
      module: The Flax model (``__call__(x, train)``).
      variables: Starting variables ``{"params": ..., ["batch_stats": ...]}``.
      dataset: A :class:`otfusion_jax.data.Dataset`.
      cfg: Hyperparameters.
      progress: True: one tqdm bar over all steps (on stderr) and one summary
        line per epoch; False: silent; a callable: called with each epoch's
        history record instead of the bar.
      eval_every_epoch: Evaluate on the test split after every epoch; if
        False, only after the last one (other records have ``None`` there).
      teacher: With ``cfg.distill`` > 0: the teacher's probabilities on
        ``dataset.x_train`` at ``cfg.distill_temperature``, shape (N, C), row i
        for training example i (:func:`teacher_probabilities`). The batches
        are the same as without it.

    Returns:
      ``(variables, history)``: the trained variables (same collections as
      given, as JAX arrays) and one dict per epoch with ``epoch`` (1-based),
      ``train_loss``, ``train_accuracy`` (running, during the epoch), ``lr``
      (of the epoch's last step), ``test_loss``, ``test_accuracy`` and
      ``seconds`` (wall time of the epoch including its evaluation).
    """
    n = len(dataset.x_train)
    steps_per_epoch = data_lib.num_batches(n, cfg.batch_size, cfg.drop_remainder)
    if steps_per_epoch == 0:
        raise ValueError(
            f"no training steps: {n} training examples with batch_size={cfg.batch_size} "
            f"and drop_remainder={cfg.drop_remainder}"
        )
    if cfg.distill > 0:
        if teacher is None:
            raise ValueError(f"TrainConfig.distill={cfg.distill} needs the teacher's probabilities (teacher=...)")
        teacher = np.asarray(teacher, np.float32)
        if teacher.ndim != 2 or teacher.shape[0] != n:
            raise ValueError(f"teacher probabilities must have shape ({n}, num_classes), got {teacher.shape}")
    schedule = make_schedule(cfg, steps_per_epoch)
    tx = make_optimizer(cfg, steps_per_epoch)
    variables = _model_variables(variables)
    state = TrainState.create(variables, tx)
    history: list[dict[str, Any]] = []

    bar = None
    report = progress if callable(progress) and not isinstance(progress, bool) else None
    if progress is True:
        from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

        bar = tqdm(total=cfg.epochs * steps_per_epoch, unit="step", dynamic_ncols=True, leave=False)

    try:
        for epoch in range(cfg.epochs):
            start = time.perf_counter()
            if bar is not None:
                bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
            totals = None
            # Batches of example indices: the same order as batching (x, y) with this seed.
            batches = data_lib.batches(
                dataset.x_train,
                np.arange(n),
                cfg.batch_size,
                seed=epoch_seed(cfg.seed, epoch),
                drop_remainder=cfg.drop_remainder,
            )
            rng = np.random.default_rng((cfg.seed, epoch))  # the epoch's augmentations
            for xb, ib in batches:
                xb = augment_batch(xb, cfg.augment, rng)
                batch = (xb, dataset.y_train[ib]) + ((teacher[ib],) if cfg.distill > 0 else ())
                state, m = train_step(
                    state, batch, module=module, tx=tx, label_smoothing=cfg.label_smoothing,
                    distill=cfg.distill, temperature=cfg.distill_temperature,
                )
                totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
                if bar is not None:
                    bar.update(1)
            totals = jax.device_get(totals)
            count = max(int(totals["count"]), 1)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": float(totals["loss_sum"]) / count,
                "train_accuracy": float(totals["correct"]) / count,
                "lr": float(schedule(int(state.step) - 1)),
                "test_loss": None,
                "test_accuracy": None,
            }
            if eval_every_epoch or epoch == cfg.epochs - 1:
                ev = evaluate(module, state.variables, dataset.x_test, dataset.y_test, cfg.eval_batch_size)
                record["test_loss"], record["test_accuracy"] = ev["loss"], ev["accuracy"]
            record["seconds"] = time.perf_counter() - start
            history.append(record)
            if bar is not None:
                bar.write(_format_record(record, cfg.epochs))
            if report is not None:
                report(record)
    finally:
        if bar is not None:
            bar.close()

    out = {"params": state.params}
    if "batch_stats" in variables:
        out["batch_stats"] = state.batch_stats
    return out, history


def _format_record(record: Mapping[str, Any], epochs: int) -> str:
    """One line summarising an epoch's history record."""
    text = (
        f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} "
        f"acc {record['train_accuracy']:.4f}"
    )
    if record.get("test_accuracy") is not None:
        text += f" | test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}"
    return text + f" | lr {record['lr']:.3g} | {record['seconds']:.1f}s"
