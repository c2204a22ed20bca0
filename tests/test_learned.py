"""Learned fusion through Sinkhorn, and the 'beyond the original' rows of the experiment table."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import otfusion_jax as otf
from configs import digits_mlpnet
from fusion_helpers import shipped_parents
from otfusion_jax import configs_util, data, experiment, learned


@pytest.fixture(scope="module")
def shipped_digits():
    """The ready-made digits parents in checkpoints/ (no training needed)."""
    parents, spec = shipped_parents("digits_mlpnet", 2)
    return parents, spec, data.load("digits")


def test_learned_fusion_lowers_the_training_loss(shipped_digits):
    parents, spec, ds = shipped_digits
    cfg = otf.FusionConfig(solver="sinkhorn", relative_epsilon="mean", epsilon=0.05)
    fused, aux = learned.learn_fusion(
        parents[1].module, [p.variables for p in parents], spec, cfg, ds.x_train, ds.y_train, learned.LearnConfig(steps=15)
    )
    assert aux.stats[1] is None and aux.plans[1] is None  # the target
    params, hist = aux.stats[0].params, aux.stats[0].history
    assert np.all(np.isfinite(hist)) and hist[-1] < hist[0]
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(params))
    # the per-layer epsilons moved (gradients reached them through Sinkhorn), except the class layer's (no plan)
    moved = [p for p in spec.plans if abs(float(params["log_eps"][p]) - np.log(0.05)) > 1e-4]
    assert set(moved) == set(spec.plans) - {spec.output_plan}
    with pytest.raises(otf.FusionError, match="through Sinkhorn"):
        learned.learn_fusion(parents[1].module, [p.variables for p in parents], spec, otf.FusionConfig(), ds.x_train, ds.y_train)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,label",
    [
        ("wm", "weight matching"),
        ("wm-refine", "weight matching from OTFusion plans"),
        ("wm-soft", "soft weight matching"),
        ("learned", "learned fusion (Sinkhorn eps)"),
    ],
)
def test_beyond_the_original_rows(shipped_digits, method, label):
    """Each method beyond the original, as the driver runs it (one method per test, so that pytest-xdist
    spreads them), beats vanilla averaging clearly and gets its REPAIR row."""
    parents, spec, ds = shipped_digits
    settings = configs_util.settings_from(digits_mlpnet.get_config())
    settings = dataclasses.replace(
        settings,
        experiment=dataclasses.replace(settings.experiment, method=method, repair=True, learn_steps=5),
        # weight matching (and its refinement of OTFusion's plans): 2 restarts, not the default 8: still several, so the driver ranks them by training
        # loss (the path taken for restarts > 1); soft weight matching runs every restart's Sinkhorn loops
        # (the test's slowest part): 1 restart.
        matching=dataclasses.replace(settings.matching, restarts=2 if method in ("wm", "wm-refine") else 1),
    )
    assert settings.experiment.wm_rank == "train_loss"
    rows, fused = experiment.run_fusion_table(parents, spec, ds, settings)
    acc = {r["method"]: r["accuracy"] for r in rows}
    assert acc[label] > acc["vanilla averaging"] + 0.2, acc
    assert f"{label} + REPAIR" in acc and set(fused) == {label}, (acc, set(fused))
    if method in ("wm", "wm-refine"):  # several restarts: ranked by training loss
        assert "restart_chosen_by_train_loss" in next(r for r in rows if r["method"] == label)
    table = experiment.format_table(rows)
    assert f"| {label} + REPAIR |" in table and "loss barrier" in table


def test_repair_after_ot_activations_does_not_lose(shipped_digits):
    parents, spec, ds = shipped_digits
    settings = configs_util.settings_from(digits_mlpnet.get_config())
    settings = dataclasses.replace(
        settings, experiment=dataclasses.replace(settings.experiment, method="ot-acts", repair=True)
    )
    acc = {r["method"]: r["accuracy"] for r in experiment.run_fusion_table(parents, spec, ds, settings)[0]}
    assert acc["OT fusion (activations, exact) + REPAIR"] >= acc["OT fusion (activations, exact)"] - 0.01
