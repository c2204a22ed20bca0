"""Tests of otfusion_jax.training: config validation, schedules, SGD semantics, training."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from otfusion_jax import data, models, training
from otfusion_jax.training import TrainConfig


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


@pytest.fixture(scope="module")
def mlp(digits):
    module, _ = models.build("mlpnet", input_shape=digits.input_shape, widths=(64, 32))
    return module


def _init(module, shape, seed=0):
    return models.init(module, jax.random.key(seed), shape)


def _assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- TrainConfig -------------------------------------------------------------------------


def test_train_config_is_hashable_and_normalises_milestones():
    cfg = TrainConfig(schedule="multistep", milestones=[3, 5])
    assert cfg.milestones == (3, 5)
    assert hash(cfg) == hash(TrainConfig(schedule="multistep", milestones=(3, 5)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "field,value",
    [
        ("epochs", -1),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("momentum", 1.0),
        ("weight_decay", -1e-4),
        ("schedule", "linear"),
        ("step_every", 0),
        ("gamma", 0.0),
        ("milestones", (5, 3)),
        ("seed", -1),
        ("label_smoothing", 1.0),
    ],
)
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


# --- schedules and optimiser ---------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,spe,expected",
    [
        (TrainConfig(lr=0.1), 7, {0: 0.1, 100: 0.1, 10_000: 0.1}),
        # "step": x0.5 every 2 epochs of 10 steps: changes at steps 20, 40.
        (
            TrainConfig(lr=0.1, schedule="step", step_every=2, gamma=0.5),
            10,
            {0: 0.1, 19: 0.1, 20: 0.05, 39: 0.05, 40: 0.025},
        ),
        # "multistep": x0.1 at epochs 3 and 5 with 4 steps per epoch: steps 12 and 20.
        (
            TrainConfig(lr=0.2, schedule="multistep", milestones=(3, 5), gamma=0.1),
            4,
            {0: 0.2, 11: 0.2, 12: 0.02, 19: 0.02, 20: 0.002, 1000: 0.002},
        ),
        # "cosine" over 5 epochs x 20 steps = 100 steps.
        (TrainConfig(lr=0.4, schedule="cosine", epochs=5), 20, {0: 0.4, 50: 0.2, 100: 0.0}),
    ],
)
def test_schedule_values(cfg, spe, expected):
    schedule = training.make_schedule(cfg, spe)
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, rel=1e-6, abs=1e-9), step


def test_paper_vgg_schedule_halves_every_30_epochs():
    cfg = TrainConfig(lr=0.05, schedule="step", step_every=30, gamma=0.5, epochs=300)
    schedule = training.make_schedule(cfg, 391)
    assert float(schedule(29 * 391)) == pytest.approx(0.05)
    assert float(schedule(30 * 391)) == pytest.approx(0.025)
    assert float(schedule(299 * 391)) == pytest.approx(0.05 * 0.5**9)


def _torch_sgd_reference(params, grads_seq, lrs, momentum, weight_decay, nesterov):
    """PyTorch's SGD (dampening 0) written out in NumPy."""
    p = params.copy()
    buf = None
    for g, lr in zip(grads_seq, lrs):
        d = g + weight_decay * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
    return p


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 5e-4), (0.9, True, 1e-2)])
def test_optimizer_matches_pytorch_sgd(momentum, nesterov, wd):
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(6)]
    cfg = TrainConfig(
        lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd, schedule="step", step_every=1, gamma=0.5
    )
    spe = 2  # lr halves every 2 steps
    tx = training.make_optimizer(cfg, spe)
    params = {"w": jnp.asarray(p0)}
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
    lrs = [0.1 * 0.5 ** (i // spe) for i in range(len(grads))]
    want = _torch_sgd_reference(p0.astype(np.float64), grads, lrs, momentum, wd, nesterov)
    np.testing.assert_allclose(np.asarray(params["w"]), want, rtol=1e-5, atol=1e-6)


def test_warmup_then_cosine_schedule():
    cfg = TrainConfig(epochs=10, lr=1.0, schedule="cosine", warmup_epochs=2.0)
    sched = training.make_schedule(cfg, 10)  # 100 steps, 20 of warm-up
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(0.5)
    assert float(sched(20)) == pytest.approx(1.0)
    assert float(sched(60)) == pytest.approx(0.5, abs=1e-6)  # half-way through the 80 cosine steps
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-6)
    const = training.make_schedule(TrainConfig(epochs=4, lr=0.1, warmup_epochs=1.0), 5)
    assert [float(const(i)) for i in (0, 5, 19)] == pytest.approx([0.0, 0.1, 0.1])
    with pytest.raises(ValueError, match="warmup_epochs must be in"):
        TrainConfig(epochs=2, warmup_epochs=3.0)


def test_adamw_is_adam_with_decoupled_weight_decay():
    cfg = TrainConfig(optimizer="adamw", lr=0.01, weight_decay=0.1, momentum=0.0)
    tx = training.make_optimizer(cfg, 5)
    params = {"w": jnp.asarray([1.0, -2.0])}
    updates, _ = tx.update({"w": jnp.asarray([0.5, 0.5])}, tx.init(params), params)
    # first Adam step: -lr * sign(g) (bias-corrected m / sqrt(v)), plus -lr * wd * p
    np.testing.assert_allclose(np.asarray(updates["w"]), [-0.01 - 0.001, -0.01 + 0.002], rtol=1e-4)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="lion")


def test_cross_entropy_label_smoothing():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = jnp.array([0, 2])
    logp = jax.nn.log_softmax(logits)
    plain = -logp[jnp.arange(2), labels]
    np.testing.assert_allclose(training.cross_entropy(logits, labels), plain, rtol=1e-6)
    eps = 0.3
    target = (1 - eps) * jax.nn.one_hot(labels, 3) + eps / 3
    np.testing.assert_allclose(
        training.cross_entropy(logits, labels, eps), -(target * logp).sum(-1), rtol=1e-6
    )


# --- training ------------------------------------------------------------------------------


def test_one_epoch_on_digits_learns(digits, mlp):
    variables = _init(mlp, digits.input_shape)
    before = training.evaluate(mlp, variables, digits.x_test, digits.y_test)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, momentum=0.9, seed=0)
    trained, history = training.train(mlp, variables, digits, cfg, progress=False)
    assert len(history) == 1
    record = history[0]
    keys = {"epoch", "train_loss", "train_accuracy", "lr", "test_loss", "test_accuracy", "seconds"}
    assert set(record) == keys
    assert record["epoch"] == 1 and record["seconds"] > 0 and record["lr"] == pytest.approx(0.05)
    assert record["test_accuracy"] > 0.6, record
    assert record["test_accuracy"] > before["accuracy"] + 0.3
    after = training.evaluate(mlp, trained, digits.x_test, digits.y_test)
    assert after["accuracy"] == pytest.approx(record["test_accuracy"])
    assert after["loss"] == pytest.approx(record["test_loss"], rel=1e-5)
    assert jax.tree.structure(trained) == jax.tree.structure(variables)


def test_training_is_deterministic_per_seed(digits, mlp):
    variables = _init(mlp, digits.input_shape)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, momentum=0.9, seed=3)
    a, ha = training.train(mlp, variables, digits, cfg, progress=False)
    b, hb = training.train(mlp, variables, digits, cfg, progress=False)
    _assert_trees_equal(a, b)
    assert ha[0]["train_loss"] == hb[0]["train_loss"]
    c, _ = training.train(mlp, variables, digits, dataclasses.replace(cfg, seed=4), progress=False)
    kernel_a, kernel_c = (np.asarray(v["params"]["fc1"]["kernel"]) for v in (a, c))
    assert not np.array_equal(kernel_a, kernel_c)


def test_epoch_seeds_differ_across_runs_and_epochs():
    seeds = {training.epoch_seed(s, e) for s in range(5) for e in range(5)}
    assert len(seeds) == 25
    assert training.epoch_seed(1, 0) != training.epoch_seed(0, 1)


def test_train_step_compiles_once_per_batch_shape(digits, mlp):
    variables = _init(mlp, digits.input_shape)
    n_train = len(digits.x_train)
    cfg = TrainConfig(epochs=2, batch_size=100, lr=0.0123, drop_remainder=True)  # lr unique to this test
    assert n_train % 100 != 0
    before = training.train_step._cache_size()
    training.train(mlp, variables, digits, cfg, progress=False)
    assert training.train_step._cache_size() - before == 1  # one shape, 2 epochs
    before = training.train_step._cache_size()
    training.train(mlp, variables, digits, dataclasses.replace(cfg, drop_remainder=False), progress=False)
    assert training.train_step._cache_size() - before == 1  # only the partial tail batch is new
    before = training.train_step._cache_size()
    other_parent = dataclasses.replace(cfg, drop_remainder=False, seed=7)
    training.train(mlp, variables, digits, other_parent, progress=False)
    assert training.train_step._cache_size() == before  # another parent (seed) reuses the compilation
    # evaluate pads its last batch: one compilation for any N.
    before = training.eval_step._cache_size()
    for n in (70, 130, 299):
        training.evaluate(mlp, variables, digits.x_test[:n], digits.y_test[:n], batch_size=64)
    assert training.eval_step._cache_size() - before == 1


def test_evaluate_and_predict_logits_agree(digits, mlp):
    variables = _init(mlp, digits.input_shape, seed=1)
    logits = training.predict_logits(mlp, variables, digits.x_test, batch_size=77)
    assert logits.shape == (len(digits.x_test), 10) and logits.dtype == np.float32
    full = np.asarray(mlp.apply(variables, jnp.asarray(digits.x_test), train=False))
    np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5)
    ev = training.evaluate(mlp, variables, digits.x_test, digits.y_test, batch_size=77)
    assert ev["accuracy"] == pytest.approx(float((logits.argmax(-1) == digits.y_test).mean()))
    logp = jax.nn.log_softmax(full)
    want_loss = float(-logp[np.arange(len(full)), digits.y_test].mean())
    assert ev["loss"] == pytest.approx(want_loss, rel=1e-5)


def test_zero_epochs_returns_variables_unchanged_and_progress_callback(digits, mlp):
    variables = _init(mlp, digits.input_shape)
    out, history = training.train(mlp, variables, digits, TrainConfig(epochs=0), progress=False)
    assert history == []
    _assert_trees_equal(out, variables)
    seen = []
    cfg = TrainConfig(epochs=2, batch_size=256)
    training.train(mlp, variables, digits, cfg, progress=seen.append, eval_every_epoch=False)
    assert [r["epoch"] for r in seen] == [1, 2]
    assert seen[0]["test_accuracy"] is None and seen[1]["test_accuracy"] is not None


def test_progress_bar_prints_one_line_per_epoch(digits, mlp, capsys):
    variables = _init(mlp, digits.input_shape)
    training.train(mlp, variables, digits, TrainConfig(epochs=2, batch_size=256), progress=True)
    out = capsys.readouterr().out
    assert "epoch 1/2: train loss" in out and "epoch 2/2: train loss" in out and "test loss" in out


def test_fine_tuning_continues_from_given_variables(digits, mlp):
    variables = _init(mlp, digits.input_shape)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, momentum=0.9)
    trained, h1 = training.train(mlp, variables, digits, cfg, progress=False)
    tuned, h2 = training.train(mlp, trained, digits, dataclasses.replace(cfg, lr=0.01), progress=False)
    assert h2[0]["train_loss"] < h1[0]["train_loss"]  # starts from the trained weights


class _TinyBNNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Dense: the smallest model with batch statistics."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        return nn.Dense(3, name="fc")(x)


@pytest.mark.slow
def test_batchnorm_model_updates_batch_stats():
    rng = np.random.default_rng(0)
    ds = data.Dataset(
        name="toy",
        source="test",
        x_train=rng.normal(size=(20, 6, 6, 1)).astype(np.float32),
        y_train=rng.integers(0, 3, 20).astype(np.int32),
        x_test=rng.normal(size=(8, 6, 6, 1)).astype(np.float32),
        y_test=rng.integers(0, 3, 8).astype(np.int32),
        num_classes=3,
    )
    module = _TinyBNNet()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)), train=False)
    assert "batch_stats" in variables
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01)
    out, history = training.train(module, variables, ds, cfg, progress=False)
    assert set(out) == {"params", "batch_stats"}
    assert jax.tree.structure(out) == jax.tree.structure(variables)
    mean0 = np.asarray(variables["batch_stats"]["bn1"]["mean"])
    mean1 = np.asarray(out["batch_stats"]["bn1"]["mean"])
    assert not np.allclose(mean0, mean1)
    assert np.isfinite(history[-1]["train_loss"])
    # Eval mode uses the running statistics: same result whatever the batch split.
    a = training.predict_logits(module, out, ds.x_test, batch_size=3)
    b = training.predict_logits(module, out, ds.x_test, batch_size=8)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_augmentations_crop_and_flip_the_images_reproducibly():
    x = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 1)
    assert training.augment_batch(x, "none", np.random.default_rng(0)) is x
    a = training.augment_batch(x, "crop", np.random.default_rng(0))
    b = training.augment_batch(x, "crop", np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)  # the same (seed, epoch) gives the same crops
    assert a.shape == x.shape
    # each crop is the 8x8 window at some offset (within one pixel) of the border-padded image
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    for i in range(2):
        assert any(np.array_equal(a[i], padded[i, dy:dy + 8, dx:dx + 8]) for dy in range(3) for dx in range(3))
    flips = [training.augment_batch(x, "flip_crop", np.random.default_rng(s)) for s in range(20)]
    mirrored = np.pad(x[:, :, ::-1], ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    seen = {any(np.array_equal(f[0], mirrored[0, dy:dy + 8, dx:dx + 8]) for dy in range(3) for dx in range(3))
            for f in flips}
    assert seen == {True, False}  # flipped in some draws, not in others
    with pytest.raises(ValueError, match="TrainConfig.augment must be one of"):
        TrainConfig(augment="mixup")


def test_training_with_augmentation_is_deterministic_and_differs_from_plain(digits, mlp):
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, augment="flip_crop")
    v0 = _init(mlp, digits.input_shape)
    a, _ = training.train(mlp, v0, digits, cfg, progress=False)
    b, _ = training.train(mlp, v0, digits, cfg, progress=False)
    c, _ = training.train(mlp, v0, digits, dataclasses.replace(cfg, augment="none"), progress=False)
    _assert_trees_equal(a, b)
    assert max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c))) > 1e-4


# --- distillation --------------------------------------------------------------------------


def test_distilling_one_hot_labels_at_t1_is_label_training(digits, mlp):
    """CE(one-hot, softmax(z)) is the label loss: distill=1 toward one-hot targets at T=1 trains identically."""
    variables = _init(mlp, digits.input_shape)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, momentum=0.9, seed=1)
    plain, hp = training.train(mlp, variables, digits, cfg, progress=False)
    one_hot = np.eye(10, dtype=np.float32)[digits.y_train]
    distilled, hd = training.train(
        mlp, variables, digits, dataclasses.replace(cfg, distill=1.0), progress=False, teacher=one_hot
    )
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(distilled)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
    assert hd[0]["train_loss"] == pytest.approx(hp[0]["train_loss"], rel=1e-4)


def test_distillation_pulls_the_student_toward_the_teacher(digits, mlp):
    """A teacher that swaps two classes: the distilled student follows it, the label-trained one does not."""
    variables = _init(mlp, digits.input_shape)
    swap = np.arange(10)
    swap[[3, 8]] = [8, 3]
    teacher = np.eye(10, dtype=np.float32)[swap[digits.y_train]] * 0.9 + 0.01
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, momentum=0.9, seed=0)
    student = training.train(
        mlp, variables, digits, dataclasses.replace(cfg, distill=1.0, distill_temperature=2.0), progress=False,
        teacher=teacher,
    )[0]
    labels = training.train(mlp, variables, digits, cfg, progress=False)[0]
    threes = digits.y_test == 3
    follows = (training.predict_logits(mlp, student, digits.x_test[threes]).argmax(-1) == 8).mean()
    keeps = (training.predict_logits(mlp, labels, digits.x_test[threes]).argmax(-1) == 3).mean()
    assert follows > 0.8 and keeps > 0.8, (follows, keeps)


def test_distillation_loss_value_and_gradient():
    """T^2 * CE(teacher, softmax(z / T)) = T^2 * (KL + H(teacher)); its gradient in z is T * (softmax(z / T) - teacher)."""
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    teacher = jax.nn.softmax(jnp.asarray(rng.standard_normal((4, 6)), jnp.float32))
    t = 3.0
    p = jax.nn.softmax(z / t)
    kl = (teacher * (jnp.log(teacher) - jnp.log(p))).sum(-1)
    entropy = -(teacher * jnp.log(teacher)).sum(-1)
    np.testing.assert_allclose(training.distillation_loss(z, teacher, t), t**2 * (kl + entropy), rtol=1e-5)
    grad = jax.grad(lambda z: training.distillation_loss(z, teacher, t).sum())(z)
    np.testing.assert_allclose(grad, t * (p - teacher), rtol=1e-4, atol=1e-6)


def test_half_distillation_mixes_the_two_losses(digits, mlp):
    """distill=0.5: the first step's loss is the mean of the label loss and the teacher loss."""
    variables = _init(mlp, digits.input_shape)
    cfg = TrainConfig(epochs=1, batch_size=len(digits.x_train), lr=1e-6, momentum=0.0, seed=0, distill=0.5,
                      distill_temperature=2.0)
    teacher = jax.nn.softmax(jnp.asarray(np.random.default_rng(1).standard_normal((len(digits.x_train), 10))))
    _, history = training.train(mlp, variables, digits, cfg, progress=False, teacher=np.asarray(teacher))
    logits = training.predict_logits(mlp, variables, digits.x_train)
    ce = training.cross_entropy(logits, digits.y_train).mean()
    kd = training.distillation_loss(logits, teacher, 2.0).mean()
    assert history[0]["train_loss"] == pytest.approx(float(0.5 * ce + 0.5 * kd), rel=1e-4)


def test_distillation_needs_a_teacher_of_the_right_shape(digits, mlp):
    variables = _init(mlp, digits.input_shape)
    cfg = TrainConfig(epochs=1, distill=0.5)
    with pytest.raises(ValueError, match=r"distill=0.5 needs the teacher"):
        training.train(mlp, variables, digits, cfg, progress=False)
    with pytest.raises(ValueError, match=rf"shape \({len(digits.x_train)}, num_classes\), got \(5, 10\)"):
        training.train(mlp, variables, digits, cfg, progress=False, teacher=np.ones((5, 10)))
    for field, value in (("distill", 1.5), ("distill_temperature", 0.0)):
        with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
            TrainConfig(**{field: value})
    with pytest.raises(ValueError, match="unaugmented images.*augment='crop'"):
        TrainConfig(distill=0.5, augment="crop")


def test_teacher_probabilities_are_the_mean_softmax(digits, mlp):
    a, b = _init(mlp, digits.input_shape, 0), _init(mlp, digits.input_shape, 1)
    x = digits.x_test[:50]
    probs = training.teacher_probabilities([(mlp, a), (mlp, b)], x, temperature=3.0, batch_size=16)
    la, lb = training.predict_logits(mlp, a, x), training.predict_logits(mlp, b, x)
    expected = (jax.nn.softmax(la / 3.0) + jax.nn.softmax(lb / 3.0)) / 2
    np.testing.assert_allclose(probs, np.asarray(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_fusion_table_fine_tunes_with_the_parents_as_teacher(digits):
    """experiment.finetune_distill: every fine-tuned row (vanilla included) learns from the parents' ensemble."""
    from otfusion_jax import experiment

    module, spec = models.build("mlpnet", input_shape=digits.input_shape, widths=(32, 16))
    parents = []
    for k in (0, 1):
        cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, momentum=0.9, seed=k)
        v = training.train(module, _init(module, digits.input_shape, k), digits, cfg, progress=False)[0]
        parents.append(experiment.Parent(f"parent {k}", module, v))
    exp = experiment.ExperimentConfig(
        method="ot-weights", num_samples=16, many_method="", finetune_epochs=1, finetune_distill=0.5,
        finetune_temperature=2.0, plots=False,
    )
    train = TrainConfig(epochs=10, batch_size=32, lr=0.01, momentum=0.9)
    rows, _ = experiment.run_fusion_table(parents, spec, digits, experiment.Settings(exp, train=train))
    tuned = [r for r in rows if "fine-tune" in r["method"]]
    assert [r["method"] for r in tuned] == [
        "vanilla averaging + fine-tune (1 ep, distilled 0.5 at T=2)",
        "OT fusion (weights, exact) + fine-tune (1 ep, distilled 0.5 at T=2)",
    ]
    assert all(r["accuracy"] > 0.8 for r in tuned), tuned
