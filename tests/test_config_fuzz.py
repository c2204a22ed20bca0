"""Every field of configs/default.py, given a wrong type and an out-of-range value on the command line.

Each case runs train.py and fuse.py in-process (tests/cli_harness.py) and asserts what a user sees:
exit status 2, exactly one ``error:`` line naming the field (``config.experiment.num_samples``), no
traceback, nothing on stdout and nothing written (the run's folder stays empty).
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest
from cli_harness import run_script

from configs import default as default_lib
from otfusion_jax import configs_util

# path -> bad command-line values: the first a wrong type, the others out of range (or a combination
# the field's rule refuses); a value may carry extra flags it needs. None: the command line cannot
# express a wrong type for this field (every text is a text), test_validate_rejects_wrong_python_types
# covers it. Booleans have no range; a bool with a combination rule has a second case.
BAD: dict[str, list] = {
    "seed": ["1.5", "-1"],
    "num_parents": ["two", "0", "-3"],
    "workdir": [None, ""],
    "parents_dir": [None, ""],
    "parent_widths": ["('a',)", "(0.0,)", "(-1.0,)", "(1.0, 1.0, 2.0)"],
    "model.name": [None, "alexnet", ""],
    "model.bias": ["maybe"],
    "model.norm": ["maybe", "True"],  # mlpnet has no BatchNorm
    "model.width": ["wide", "0", "-1", "nan", "2.0"],  # mlpnet takes no width: it must stay 1.0
    "model.widths": ["('a',)", "(0,)", "()", "(64, -1)", "(1.5,)"],
    "model.depth": ["deep", "0"],
    "model.embed_dim": ["1.5", "0"],
    "model.num_heads": ["x", "-1"],
    "model.mlp_dim": ["wide", "0"],
    "model.patch_size": ["2.5", "0"],
    "model.layer_norm_eps": ["small", "0", "-1e-6"],
    "data.name": [None, "imagenet"],
    "data.source": [None, "web", "tfds"],  # digits comes from sklearn only
    "data.data_dir": [None, ""],
    "data.pad_to": ["big", "0"],
    "data.max_train": ["1.5", "0"],
    "data.max_test": ["many", "-1"],
    "data.seed": ["x", "-2"],
    "data.eval_split": [None, "validation", "heldout"],  # heldout needs data.max_train (None by default)
    "train.epochs": ["1.5", "-1"],
    "train.batch_size": ["x", "0"],
    "train.lr": ["fast", "0", "-0.1", "inf", "nan"],
    "train.momentum": ["x", "1", "-0.5"],
    "train.nesterov": ["maybe", ("True", "--config.train.momentum=0")],
    "train.weight_decay": ["x", "-1e-4", "inf"],
    "train.schedule": [None, "linear"],
    "train.step_every": ["x", "0"],
    "train.gamma": ["x", "0", "1.5"],
    "train.milestones": ["('a',)", "(5, 3)", "(0,)", "(3, 3)"],
    "train.label_smoothing": ["x", "1", "-0.1"],
    "train.drop_remainder": ["maybe"],
    "train.eval_batch_size": ["x", "0"],
    "train.optimizer": [None, "lion"],
    "train.warmup_epochs": ["x", "-1", "11"],  # more than the 10 epochs
    "train.augment": [None, "mixup"],
    "experiment.method": [None, "ot-magic", "ot-weights:emd", ",", "ot-weights,bogus", "wm:sinkhorn", "learned:exact"],
    "experiment.repair": ["maybe"],
    "experiment.repair_output": ["maybe"],
    "experiment.refit": ["maybe"],
    "experiment.learn_steps": ["x", "0"],
    "experiment.learn_weights": ["maybe"],
    "fusion.solver": [None, "emd"],
    "fusion.exact_backend": [None, "gpu"],
    "fusion.auction_bidders": ["2.5", "0"],
    "fusion.ground_metric": [None, "manhattan"],
    "fusion.squared": ["maybe"],
    "fusion.normalize_cost": [None, "sum"],
    "fusion.unit_norm_rows": ["maybe"],
    "fusion.bias_in_cost": ["maybe"],
    "fusion.epsilon": ["x", "0", "-1", "inf"],
    "fusion.relative_epsilon": [None, "avg"],
    "fusion.sinkhorn_threshold": ["x", "0"],
    "fusion.sinkhorn_max_iterations": ["1.5", "0"],
    "fusion.implicit_diff": ["maybe"],
    "fusion.tau": ["x", "0", "1.5"],
    "fusion.correction": ["maybe"],
    "fusion.proper_marginals": ["maybe"],
    "fusion.past_correction": ["maybe"],
    "fusion.importance": [None, "l3"],
    "fusion.align_output": ["maybe"],
    "fusion.symmetry": [None, "rotation"],
    "fusion.stream_policy": [None, "per-block"],
    "matching.seed": ["x", "-1"],
    "matching.restarts": ["many", "0", "-2"],
    "matching.start": [None, "random"],
    "matching.max_sweeps": ["1.5", "-1"],
    "matching.tol": ["x", "-1e-6", "nan"],
    "matching.epsilon": ["x", "0", "-1"],
    "matching.soft_tol": ["x", "-1"],
    "matching.sinkhorn_threshold": ["x", "0"],
    "matching.sinkhorn_max_iterations": ["1.5", "0"],
    "matching.align_output": ["maybe"],
    "cca.regularization": ["x", "-0.1", "1.5"],
    "cca.acts_kind": [None, "mid"],
    "cca.num_samples": ["many", "0", "-5"],
    "refit.ridge": ["x", "-0.1", "nan"],
    "refit.num_samples": ["many", "0"],
    "refit.batch_size": ["1.5", "0"],
    "experiment.weights": ["('a', 'b')", "(-1.0, 2.0)", "(1.0,)", "(0.0, 0.0)"],
    "experiment.ensemble_step": ["half", "1.5", "-0.1", ("0.5", "--config.experiment.groups=('0,1,2',)", "--config.num_parents=3")],
    "experiment.target": ["last", "2", "-3"],
    "experiment.many_method": ["wm-lots", "ot-weights:emd"],
    "experiment.barycenter_iterations": ["x", "0"],
    "experiment.wm_rank": [None, "accuracy"],
    "experiment.rank_samples": ["x", "0"],
    "experiment.num_samples": ["many", "0", "-5"],
    "experiment.acts_kind": [None, "mid"],
    "experiment.sample_seed": ["x", "-1"],
    "experiment.bn_stats": [None, "fresh", "recompute"],  # recompute: mlpnet has no BatchNorm
    "experiment.groups": ["(1.5,)", "('0,7',)", "('0',)", "('0,0',)", "('a,b',)"],
    "experiment.finetune_epochs": ["x", "-1"],
    "experiment.finetune_lr": ["x", "0", "-1"],
    "experiment.finetune_distill": ["x", "-0.1", "1.5"],
    "experiment.finetune_temperature": ["x", "0", "-1"],
    "experiment.plots": ["maybe"],
}


def _default_paths(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _default_paths(value, f"{prefix}{key}.")
        else:
            yield prefix + key


DEFAULT_PATHS = sorted(_default_paths(configs_util.to_dict(default_lib.get_config())))
CASES = [
    pytest.param(path, value, id=f"{path}={value if isinstance(value, str) else value[0]}")
    for path, values in BAD.items()
    for value in values
    if value is not None
]


def test_every_default_field_has_a_rule_and_fuzz_cases():
    assert sorted(configs_util.FIELDS) == DEFAULT_PATHS
    assert sorted(BAD) == DEFAULT_PATHS
    for path, values in BAD.items():
        assert len([v for v in values if v is not None]) >= 1, path
        rule = configs_util.FIELDS[path]
        if rule.kind != "bool":  # a wrong type and at least one value out of range
            assert len(values) >= 2, path


def test_default_configs_are_valid():
    configs_util.validate(default_lib.get_config())


def _assert_refused(proc, path, workdir):
    where = f"config.{path}"
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.error_lines()
    assert len(lines) == 1, proc.stderr
    assert where in lines[0], (where, lines[0])
    assert proc.stdout == "", proc.stdout[-500:]
    assert sorted(os.listdir(workdir)) == [], f"written after a refused config: {os.listdir(workdir)}"


@pytest.mark.parametrize("script", ["fuse.py", "train.py"])
@pytest.mark.parametrize("path,value", CASES)
def test_bad_value_is_one_line_naming_the_field(tmp_path, script, path, value):
    value, *extra = (value,) if isinstance(value, str) else value
    base = {
        "workdir": f"--config.workdir={tmp_path / 'run'}",
        "parents_dir": f"--config.parents_dir={tmp_path / 'run' / 'parents'}",
    }
    args = [arg for field, arg in base.items() if field != path] + [f"--config.{path}={value}", *extra]
    if script == "fuse.py":
        args.append(f"--out={tmp_path / 'out'}")
    proc = run_script(script, *args, "--noprogress", cwd=tmp_path)
    _assert_refused(proc, path, tmp_path)


def _wrong_python_value(rule):
    """A value of the wrong Python type for the field's kind (what a dict config could hold)."""
    return {"int": 1.5, "float": "0.1", "bool": 1, "str": 5, "tuple": 5}[rule.kind]


@pytest.mark.parametrize("path", sorted(configs_util.FIELDS))
def test_validate_rejects_wrong_python_types(path):
    cfg = json.loads(json.dumps(configs_util.to_dict(default_lib.get_config())))
    rule = configs_util.FIELDS[path]
    for value in (_wrong_python_value(rule), True if rule.kind in ("int", "float") else None):
        if value is None and rule.optional:
            continue
        node = cfg
        *head, last = path.split(".")
        for part in head:
            node = node[part]
        node[last] = value
        with pytest.raises(ValueError, match="^" + re.escape(f"config.{path}") + r"\b"):
            configs_util.validate(cfg)


def test_allowed_values_are_described():
    for path, rule in configs_util.FIELDS.items():
        text = rule.allowed()
        assert text and "None" not in text.replace("None or ", ""), (path, text)
        if rule.choices is not None:
            assert all(repr(c) in text for c in rule.choice_values()), (path, text)
    # choices come from the library, not copies
    from otfusion_jax import fusion, ot

    assert configs_util.FIELDS["fusion.exact_backend"].choice_values() == tuple(fusion.EXACT_BACKENDS)
    assert configs_util.FIELDS["fusion.ground_metric"].choice_values() == tuple(ot.METRICS)
    assert configs_util.FIELDS["fusion.normalize_cost"].choice_values() == tuple(ot.COST_NORMS)


def test_none_text_resets_optional_text_fields():
    cfg = configs_util.to_dict(default_lib.get_config())
    cfg["fusion"]["importance"] = "None"
    cfg["parents_dir"] = "None"
    out = configs_util.validate(cfg)
    assert out["fusion"]["importance"] is None and out["parents_dir"] is None
    assert math.isfinite(out["fusion"]["epsilon"])
