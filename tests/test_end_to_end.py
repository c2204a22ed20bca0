"""Digits-trained parents: OT fusion beats vanilla averaging; fuse.py end to end; README example.

fuse.py runs in-process (tests/cli_harness.py), except one real ``python fuse.py`` smoke test (a background
job, tests/background.py: it starts when collection ends and runs beside the other tests).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys

import background
import jax
import pytest
from cli_harness import run_script, subprocess_env

import otfusion_jax as otf
from otfusion_jax import checkpoints, configs_util, experiment, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY = os.path.join(ROOT, "checkpoints", "digits_mlpnet")  # the shipped digits parents
sys.path.insert(0, ROOT)
from configs import digits_mlpnet  # noqa: E402


@pytest.fixture(scope="module")
def digits_parents(tmp_path_factory):
    """Two digits MLPNets (seeds 0, 1) trained for 6 epochs, saved as train.py would."""
    config = digits_mlpnet.get_config()
    workdir = str(tmp_path_factory.mktemp("run"))
    with config.unlocked():
        config.workdir = workdir
        config.parents_dir = os.path.join(workdir, "parents")
        config.train.epochs = 6
    dataset = configs_util.load_data(config)
    module, spec = configs_util.model_from(config, dataset.input_shape, dataset.num_classes)
    name, options = configs_util.model_options_from(config)
    parents = []
    for k in range(2):
        seed = configs_util.parent_seed(config, k)
        variables = otf.models.init(module, jax.random.key(seed), dataset.input_shape)
        variables, history = training.train(module, variables, dataset, configs_util.train_config_from(config, seed), progress=False)
        meta = {
            "model": {"name": name, "options": options, "input_shape": list(dataset.input_shape), "num_classes": 10},
            "seed": seed,
            "test_accuracy": history[-1]["test_accuracy"],
        }
        checkpoints.save(configs_util.parent_dir(config, k), variables, meta)
        parents.append(experiment.Parent(f"parent {k}", module, variables))
    return config, dataset, spec, parents


def _row(rows, prefix):
    return next(r for r in rows if r["method"].startswith(prefix))


@pytest.mark.slow
def test_ot_fusion_beats_vanilla_averaging_on_digits(digits_parents):
    config, dataset, spec, parents = digits_parents
    rows, fused = experiment.run_fusion_table(parents, spec, dataset, configs_util.settings_from(config))
    parent_acc = [r["accuracy"] for r in rows[:2]]
    assert min(parent_acc) > 0.9
    vanilla = _row(rows, "vanilla")["accuracy"]
    weights = _row(rows, "OT fusion (weights")["accuracy"]
    acts = _row(rows, "OT fusion (activations")["accuracy"]
    assert weights > vanilla + 0.02, rows
    assert acts > vanilla + 0.2, rows
    assert acts > 0.85, rows
    rec = "recommended: OT fusion (weights, sinkhorn 0.05 x mean cost)"
    assert set(fused) == {"OT fusion (weights, exact)", "OT fusion (activations, exact)", rec, f"{rec} + refit"}
    assert fused[f"{rec} + refit"].solver == "sinkhorn-refit"  # --save_fused writes fused_recommended_sinkhorn-refit
    # the recommended method comes with its least-squares refit although config.experiment.refit is off
    assert not config.experiment.refit
    refitted = _row(rows, rec + " + refit")["accuracy"]
    assert refitted > weights and refitted > vanilla + 0.3, rows


def _fuse_script_commands(folder):
    """Two real `python fuse.py` runs on copies of the shipped digits parents, sharing a fresh compilation cache."""
    for k in range(2):
        shutil.copytree(os.path.join(READY, f"parent_{k}"), folder / "parents" / f"parent_{k}")
    env = subprocess_env(cache=folder / "jax-cache")  # a fresh persistent compilation cache
    return [background.Command([os.path.join(ROOT, "fuse.py"), *_fuse_script_args(folder, out)], cwd=ROOT, env=env) for out in ("out", "out3")]


def _fuse_script_args(folder, out):
    return [
        f"--config.workdir={folder / 'run'}", f"--config.parents_dir={folder / 'parents'}",
        f"--out={folder / out}", "--config.experiment.method=ot-weights", "--config.fusion.solver=sinkhorn",
        "--config.fusion.normalize_cost=mean", "--config.fusion.epsilon=0.05", "--save_fused", "--noprogress",
    ]


# Started when collection ends, beside the in-process tests (tests/background.py).
FUSE_SCRIPT = background.register("fuse_script", _fuse_script_commands, fixture="fuse_script_runs", timeout=600)


@pytest.fixture
def fuse_script_runs():
    """The background job's folder and its two processes (the second loads what the first cached)."""
    outcome = FUSE_SCRIPT.result()
    return outcome.folder, outcome.procs


@pytest.mark.slow
def test_fuse_script_end_to_end(fuse_script_runs):
    """Real `python fuse.py` twice (a cold and a warm compilation cache) and once in-process: same tables.

    The shipped digits parents (seeds 0, 1, the architecture of configs/digits_mlpnet.py); the parents
    trained in this module are fused in-process by test_ot_fusion_beats_vanilla_averaging_on_digits.
    """
    folder, (proc, again) = fuse_script_runs
    out, out3 = folder / "out", folder / "out3"
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    methods = [r["method"] for r in results["tables"][0]["rows"]]
    assert methods[:2] == ["parent 0 (seed 0)", "parent 1 (seed 1)"]
    assert "OT fusion (weights, sinkhorn)" in methods and "vanilla averaging" in methods
    assert "| OT fusion (weights, sinkhorn) |" in (out / "results.md").read_text()
    assert "| OT fusion (weights, sinkhorn) |" in proc.stdout
    fused_vars, meta = checkpoints.load(str(out / "fused_ot-weights_sinkhorn"))
    assert meta["method"] == "OT fusion (weights, sinkhorn)"
    for png in ("accuracy.png", "barrier.png", "ot_cost.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    barrier = results["barrier"]
    # aligned parent A is the same function as A: its end of the curve equals parent 0's accuracy
    after = barrier["after OT alignment (weights, exact)"]
    assert abs(after["accuracy"][0] - barrier["plain (no alignment)"]["accuracy"][0]) < 1e-9
    assert not [p for p in os.listdir(out) if ".tmp" in p]
    assert proc.stdout.splitlines()[0].startswith("2 parents (mlpnet bias=False widths=[128, 64, 32]; architecture as config.model)")
    assert proc.stdout.rstrip().endswith(f"results: {out / 'results.json'}")
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| method |"))
    assert header.endswith("| fusion time (s) | compile (s) |")
    first = results["compilation"]
    assert first["cache_dir"] == str(folder / "jax-cache") and first["written"] > 0 and first["programs"] > 0
    assert f"{first['written']} written to it" in proc.stdout
    # a second process loads every program the first wrote, compiles only what JAX cannot cache (host callbacks)
    assert again.returncode == 0, again.stderr[-2000:]
    results3 = json.loads((out3 / "results.json").read_text())
    second = results3["compilation"]
    assert second["written"] == 0 and second["loaded"] == first["loaded"] + first["written"], (first, second)
    assert second["programs"] == first["programs"]
    same = [(r["method"], r["accuracy"], r["loss"]) for r in results["tables"][0]["rows"]]
    assert [(r["method"], r["accuracy"], r["loss"]) for r in results3["tables"][0]["rows"]] == same
    # the same command in-process gives the same table (same bits across processes)
    out2 = folder / "out2"
    inproc = run_script("fuse.py", *_fuse_script_args(folder, "out2"), "--config.experiment.plots=False")
    assert inproc.returncode == 0, inproc.stderr[-2000:]
    rows2 = json.loads((out2 / "results.json").read_text())["tables"][0]["rows"]
    rows = results["tables"][0]["rows"]
    assert [(r["method"], r["accuracy"], r["loss"]) for r in rows2] == [(r["method"], r["accuracy"], r["loss"]) for r in rows]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--parents=/nonexistent/parent_0,/nonexistent/parent_1"], "parent checkpoint not found: /nonexistent/parent_0"),
        (["--config.experiment.method=ot-magic"], "config.experiment.method: unknown 'ot-magic'; choose from ot-weights"),
        (["--config.fusion.solver=emd"], "config.fusion.solver='emd'; choose one of ('exact', 'sinkhorn')"),
        (["--config.fusion.epsilonn=1"], "unknown field config.fusion.epsilonn"),
    ],
)
def test_fuse_script_bad_input_is_one_clear_line(digits_parents, tmp_path, args, message):
    config, *_ = digits_parents
    out = tmp_path / "out"
    cmd = [f"--config.workdir={config.workdir}", f"--config.parents_dir={config.parents_dir}", f"--out={out}", *args]
    proc = run_script("fuse.py", *cmd)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if "error:" in line] == [proc.stderr.strip()]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_readme_python_example_runs():
    """The README's Python API example is executed as written."""
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    assert "fused" in namespace


def test_fusion_config_fields_documented_in_default_config():
    fields = {f.name for f in dataclasses.fields(otf.FusionConfig)} - {"mode"}
    assert fields == set(digits_mlpnet.get_config().fusion)
    text = open(os.path.join(ROOT, "configs", "default.py")).read()
    for section in ("fusion", "matching", "experiment"):
        for key in digits_mlpnet.get_config()[section]:
            line = next(l for l in text.splitlines() if l.strip().startswith(f"config.{section}.{key} ="))
            assert "  # " in line, line  # one commented field per line


@pytest.mark.slow
def test_runner_groups_write_every_output(tmp_path):
    """Two tables from the shipped digits parents through the library calls fuse.py makes, fused checkpoints per group."""
    from otfusion_jax import runner

    config = configs_util.to_dict(digits_mlpnet.get_config())
    config["num_parents"] = 4
    config["parents_dir"] = os.path.join(ROOT, "checkpoints", "digits_mlpnet")
    config["experiment"].update(method="ot-weights,wm", groups=("0,1", "3,2"), plots=False)
    config["matching"].update(restarts=2, seed=1)
    job = runner.prepare_fuse(config, out=str(tmp_path / "out"))
    assert job.groups == [[0, 1], [3, 2]] and job.settings.matching_seed == 1 and job.settings.matching.restarts == 2
    seen = []
    results = runner.run_fuse(job, on_table=seen.append)
    assert [t.title for t in seen] == ["parents 0, 1 (target: parent 1)", "parents 3, 2 (target: parent 2)"]
    assert results.barrier is not None and len(results.cost_curves) == 2  # OT weights in both groups; wm has none
    saved = []
    path = runner.write_fuse_results(job, results, save_fused=True, on_saved=lambda label, p: saved.append(p))
    names = sorted(os.path.basename(p) for p in saved)
    assert names == [
        "fused_ot-weights_exact_parents0-1", "fused_ot-weights_exact_parents3-2",
        "fused_wm_exact_parents0-1", "fused_wm_exact_parents3-2",
    ]
    assert checkpoints.load_metadata(saved[0])["model"] == job.metas[1]["model"]
    record = json.loads(open(path).read())
    assert [t["parents"] for t in record["tables"]] == [[0, 1], [3, 2]]
    assert record["config"]["experiment"]["groups"] == ["0,1", "3,2"]
    assert sorted(os.listdir(tmp_path / "out")) == sorted([*names, "results.json", "results.md"])  # plots off
    later = os.path.getmtime(path)
    assert all(os.path.getmtime(tmp_path / "out" / n) <= later for n in ("results.md", *names))  # results.json last


@pytest.mark.slow
def test_a_new_method_is_one_table_entry(digits_parents, monkeypatch):
    """The driver's dispatch: a METHODS entry whose fuse() returns an Outcome is a row, with REPAIR, like the rest."""
    _, dataset, spec, parents = digits_parents

    def fuse_identity(group, solver):
        aligner = dataclasses.replace(group.settings.matching, restarts=1, max_sweeps=0)  # identity plans: vanilla
        return group.run_aligner(aligner, "identity matching", "exact", key=0)

    monkeypatch.setitem(experiment.METHODS, "identity", experiment.Method("no alignment", fuse_identity))
    settings = experiment.Settings(experiment.ExperimentConfig(method="identity,vanilla", repair=True))
    rows, fused = experiment.run_fusion_table(parents, spec, dataset, settings)
    acc = {r["method"]: r for r in rows}
    assert abs(acc["identity matching"]["accuracy"] - acc["vanilla averaging"]["accuracy"]) < 1e-9
    assert "identity matching + REPAIR" in acc and acc["identity matching"]["compile_seconds"] >= 0
    assert set(fused) == {"identity matching"} and fused["identity matching"].method == "identity"
    with pytest.raises(ValueError, match="experiment.method: unknown 'identity:sinkhorn'"):
        experiment.ExperimentConfig(method="identity:sinkhorn")
