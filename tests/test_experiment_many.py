"""The driver's many-parent default (the recommended method's barycentre) and weight matching's restart ranking."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fusion_helpers import shipped_parents
from otfusion_jax import data, experiment, matching


@pytest.fixture(scope="module")
def digits4():
    """The four ready-made digits parents in checkpoints/."""
    parents, spec = shipped_parents("digits_mlpnet", 4)
    return parents, spec, data.load("digits")


def _settings(**experiment_options):
    exp = experiment.ExperimentConfig(plots=False, **experiment_options)
    return experiment.Settings(experiment=exp, matching=matching.WeightMatching(restarts=4))


@pytest.mark.slow
def test_tables_of_more_than_two_parents_add_the_barycentre(digits4):
    parents, spec, ds = digits4
    rows, fused = experiment.run_fusion_table(parents, spec, ds, _settings(method="ot-weights"))
    acc = {r["method"]: r for r in rows}
    # the default many-parent row: the recommended method's branch for MLPs (CCA Merge, + the least-squares refit)
    label = "recommended: CCA Merge (post-ReLU activations, regularization 0.5)"
    assert label in acc and f"{label} + refit" in acc, list(acc)
    assert acc[f"{label} + refit"]["accuracy"] > 0.9
    assert acc[label]["accuracy"] > acc["OT fusion (weights, exact)"]["accuracy"] + 0.05
    assert fused[label].method == "recommended"
    rows_wm, fused_wm = experiment.run_fusion_table(parents, spec, ds, _settings(method="ot-weights", many_method="wm-many"))
    wm = next(r for r in rows_wm if r["method"] == "weight matching, barycentre (<= 10 rounds)")
    assert 2 <= wm["rounds"] <= 10 and wm["accuracy"] > acc["OT fusion (weights, exact)"]["accuracy"]  # 94.3 vs 77.3
    assert fused_wm[wm["method"]].method == "wm-many"
    rows_two, _ = experiment.run_fusion_table(parents[:2], spec, ds, _settings(method="ot-weights"))
    assert not any("barycentre" in r["method"] or "recommended" in r["method"] for r in rows_two)  # one-shot only
    rows_off, _ = experiment.run_fusion_table(parents, spec, ds, _settings(method="ot-weights", many_method=""))
    assert not any("barycentre" in r["method"] for r in rows_off)


@pytest.mark.slow
def test_restarts_ranked_by_training_loss_pick_the_lowest(digits4):
    """The chosen restart is the one whose mean with the target has the lowest training loss."""
    parents, spec, ds = digits4
    settings = _settings(method="wm", wm_rank="train_loss", rank_samples=500)
    rows, fused = experiment.run_fusion_table(parents[:2], spec, ds, settings)
    row = next(r for r in rows if r["method"] == "weight matching")
    (chosen,) = row["restart_chosen_by_train_loss"]
    group_vars = [p.variables for p in parents[:2]]
    _, aux = experiment.engine.fuse(group_vars, spec, settings.matching, key=0)
    perms = aux.stats[0].restart_perms
    x_idx = np.sort(np.random.default_rng(1).choice(len(ds.x_train), size=500, replace=False))
    losses = []
    for r in range(4):
        moved = experiment.plans_lib.apply_plans(group_vars[0], spec, {k: p[r] for k, p in perms.items()})
        mean = experiment.engine.vanilla_average([moved, group_vars[1]])
        losses.append(experiment.training.evaluate(parents[1].module, mean, ds.x_train[x_idx], ds.y_train[x_idx])["loss"])
    assert chosen == int(np.argmin(losses))
    rows_obj, _ = experiment.run_fusion_table(
        parents[:2], spec, ds, dataclasses.replace(settings, experiment=dataclasses.replace(settings.experiment, wm_rank="objective"))
    )
    assert "restart_chosen_by_train_loss" not in next(r for r in rows_obj if r["method"] == "weight matching")
