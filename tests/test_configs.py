"""Tests of configs/*.py, otfusion_jax.configs_util, and train.py end to end.

train.py runs in-process (tests/cli_harness.py), except one real ``python train.py`` smoke test (a background
job, tests/background.py: it starts when collection ends and runs beside the other tests).
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import sys

import jax
import background
import ml_collections
import pytest
from absl import flags
from cli_harness import run_script, subprocess_env
from ml_collections import config_flags

from otfusion_jax import checkpoints, configs_util, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # `import configs.<name>`, as train.py does

CONFIG_NAMES = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not p.endswith("__init__.py")
)
EXPECTED = {
    "default",
    "digits_mlpnet",
    "fashion_mlpnet",
    "fashion_vgg11",
    "fashion_resnet18",
    "mnist_mlpnet",
    "cifar10_vgg11",
    "cifar10_resnet18",
}
INPUT_SHAPES = {"digits": (8, 8, 1), "mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


def _get(name: str) -> ml_collections.ConfigDict:
    return importlib.import_module(f"configs.{name}").get_config()


def _parse(argv: list[str], default: str = "configs/digits_mlpnet.py") -> ml_collections.ConfigDict:
    """Parses a command line with config_flags exactly as train.py's flag does."""
    fv = flags.FlagValues()
    argv = ["prog", *argv]
    config_flags.DEFINE_config_file("config", os.path.join(ROOT, default), flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def test_all_expected_configs_exist():
    assert EXPECTED <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_loads_with_expected_fields(name):
    config = _get(name)
    as_dict = configs_util.validate(config)
    assert set(as_dict) == set(configs_util.SCHEMA[None])
    for section in ("model", "data", "train", "fusion", "matching", "experiment"):
        assert set(as_dict[section]) == set(configs_util.SCHEMA[section]), section
    from otfusion_jax import experiment

    assert experiment.parse_methods(config.experiment.method)
    assert configs_util.fusion_config_from(config, "activations").mode == "activations"
    settings = configs_util.settings_from(as_dict)
    assert isinstance(settings, experiment.Settings) and settings.experiment.method == config.experiment.method
    assert settings.matching.backend == config.fusion.exact_backend  # one exact solver for every method
    assert config.num_parents >= 2 and config.seed >= 0
    assert config.workdir.startswith("runs/")
    train_cfg = configs_util.train_config_from(config, seed=config.seed + 1)
    assert isinstance(train_cfg, training.TrainConfig) and train_cfg.seed == config.seed + 1
    shape = list(INPUT_SHAPES[config.data.name])
    if config.data.pad_to:
        shape[0] = shape[1] = config.data.pad_to
    module, spec = configs_util.model_from(config, tuple(shape), 10)
    assert module is not None and spec is not None
    with pytest.raises(AttributeError):
        config.train.epochz = 3  # locked: a typo cannot add a field


def test_sections_are_the_library_dataclasses():
    """config.fusion is FusionConfig (but mode), config.experiment is ExperimentConfig, config.matching is
    WeightMatching's command-line fields plus seed; default.py's values are the library's defaults."""
    import dataclasses

    import otfusion_jax as otf
    from otfusion_jax import experiment

    default = configs_util.to_dict(_get("default"))
    fusion_defaults = {f.name: f.default for f in dataclasses.fields(otf.FusionConfig) if f.name != "mode"}
    assert default["fusion"] == fusion_defaults  # exactly the fields, and the library's defaults ("auto" backend)
    assert set(default["fusion"]) == set(configs_util.FUSION_FIELDS)
    exp_defaults = {f.name: f.default for f in dataclasses.fields(experiment.ExperimentConfig)}
    assert default["experiment"] == exp_defaults
    wm_defaults = {f.name: f.default for f in dataclasses.fields(otf.WeightMatching)}
    assert default["matching"]["seed"] == 0
    assert {k: v for k, v in default["matching"].items() if k != "seed"} == {
        k: wm_defaults[k] for k in configs_util.MATCHING_FIELDS if k != "seed"
    }
    assert set(wm_defaults) - set(configs_util.MATCHING_FIELDS) == {"soft", "backend", "roles"}
    settings = configs_util.settings_from(default)
    assert settings.fusion == otf.FusionConfig()
    assert settings.matching == otf.WeightMatching() and settings.matching_seed == 0
    assert settings.experiment == experiment.ExperimentConfig() and settings.finetune is None


def test_settings_follow_the_command_line():
    config = _parse([
        "--config.fusion.exact_backend=device", "--config.matching.seed=7", "--config.matching.restarts=3",
        "--config.matching.start=greedy", "--config.experiment.finetune_epochs=2", "--config.train.lr=0.3",
        "--config.experiment.method=wm,ot-acts:sinkhorn",
    ])
    s = configs_util.settings_from(configs_util.validate(config))
    assert (s.matching.backend, s.matching.restarts, s.matching.start, s.matching_seed) == ("device", 3, "greedy", 7)
    assert s.fusion.exact_backend == "device" and s.experiment.methods == [("wm", None), ("ot-acts", "sinkhorn")]
    assert (s.finetune.epochs, s.finetune.lr) == (2, 0.3)  # fine-tuning starts from the parents' recipe
    assert (s.finetune.distill, s.finetune.distill_temperature) == (0.0, 1.0)
    distilled = _parse(["--config.experiment.finetune_epochs=1", "--config.experiment.finetune_distill=0.7",
                        "--config.experiment.finetune_temperature=3"])
    tuned = configs_util.settings_from(configs_util.validate(distilled)).finetune
    assert (tuned.distill, tuned.distill_temperature) == (0.7, 3.0)


def test_moved_fields_are_unknown_in_their_old_section():
    for arg in ("--config.fusion.method=wm", "--config.fusion.num_samples=5", "--config.fusion.mode=weights"):
        with pytest.raises((AttributeError, KeyError, flags.Error)):
            _parse([arg])
    old = configs_util.to_dict(_get("default"))
    old["fusion"]["method"] = "ot-weights"
    with pytest.raises(ValueError, match="unknown config key.*config.fusion.method"):
        configs_util.validate(old)


def test_checkpoints_with_the_old_config_layout_load():
    """Shipped parents store the config of their time (driver options under fusion): loading never reads it."""
    from otfusion_jax import parents as parents_lib

    paths = [os.path.join(ROOT, "checkpoints", "digits_mlpnet", f"parent_{k}") for k in range(2)]
    stored = checkpoints.load_metadata(paths[0])["config"]
    assert "method" in stored["fusion"] and "experiment" not in stored  # the old layout
    loaded, spec, metas = parents_lib.load_parents(paths)
    parents_lib.check_config_matches(configs_util.validate(_get("digits_mlpnet")), metas)
    assert len(loaded) == 2 and spec.plans


def test_paper_recipes():
    mnist = _get("mnist_mlpnet")
    assert (mnist.model.name, mnist.model.bias, tuple(mnist.model.widths)) == ("mlpnet", False, (400, 200, 100))
    t = mnist.train
    assert (t.epochs, t.lr, t.momentum, t.batch_size) == (10, 0.01, 0.5, 64)
    assert mnist.data.name == "mnist" and mnist.train.weight_decay == 0
    fashion = _get("fashion_mlpnet")
    assert fashion.data.name == "fashion_mnist" and fashion.data.source == "idx"
    assert fashion.data.data_dir == "/usr/share/datasets/fashion-mnist"
    assert tuple(fashion.model.widths) == (400, 200, 100) and not fashion.model.bias
    vgg = _get("cifar10_vgg11")
    assert (vgg.model.name, vgg.model.bias, vgg.model.norm) == ("vgg11", False, False)
    t = vgg.train
    assert (t.lr, t.momentum, t.weight_decay, t.batch_size, t.epochs) == (0.05, 0.9, 5e-4, 128, 300)
    assert (t.schedule, t.step_every, t.gamma) == ("step", 30, 0.5)
    resnet = _get("cifar10_resnet18")
    assert (resnet.model.name, resnet.model.bias, resnet.model.norm) == ("resnet18", False, False)
    t = resnet.train
    assert (t.lr, t.momentum, t.weight_decay, t.batch_size, t.epochs) == (0.1, 0.9, 1e-4, 256, 300)
    assert (t.schedule, tuple(t.milestones), t.gamma) == ("multistep", (150, 250), 0.1)
    for name, model in (("fashion_vgg11", "vgg11"), ("fashion_resnet18", "resnet18")):
        c = _get(name)  # the original's bias-free, BatchNorm-free nets, CPU-sized, 5,000 training images held out
        assert (c.model.name, c.model.bias, c.model.norm, c.data.pad_to) == (model, False, False, 32), name
        assert c.data.max_train == 55000 and c.parents_dir == f"checkpoints/{name}", name
    digits = _get("digits_mlpnet")
    assert digits.data.name == "digits" and digits.num_parents == 2


def test_model_options_and_metadata_rebuild():
    name, options = configs_util.model_options_from(_get("mnist_mlpnet"))
    assert (name, options) == ("mlpnet", {"bias": False, "widths": [400, 200, 100]})
    name, options = configs_util.model_options_from(_get("cifar10_resnet18"))
    assert (name, options) == ("resnet18", {"bias": False, "norm": False, "width": 1.0})
    module, _ = configs_util.model_from_metadata(
        {
            "model": {
                "name": "mlpnet",
                "options": {"bias": True, "widths": [5]},
                "input_shape": [8, 8, 1],
                "num_classes": 3,
            }
        }
    )
    assert tuple(module.widths) == (5,) and module.num_classes == 3 and module.use_bias
    with pytest.raises(ValueError, match="model"):
        configs_util.model_from_metadata({"seed": 0})


def test_command_line_overrides():
    config = _parse(["--config.train.epochs=3", "--config.model.widths=(8,4)", "--config.data.max_train=100"])
    assert config.train.epochs == 3 and tuple(config.model.widths) == (8, 4) and config.data.max_train == 100
    assert configs_util.train_config_from(config).epochs == 3
    config = _parse(["--config=" + os.path.join(ROOT, "configs/fashion_mlpnet.py"), "--config.train.lr=0.5"])
    assert config.data.name == "fashion_mnist" and config.train.lr == 0.5
    config = _parse(["--config.train.milestones=(3,7)", "--config.train.schedule=multistep"])
    assert configs_util.train_config_from(config).milestones == (3, 7)


def test_unknown_key_override_is_an_error():
    with pytest.raises((AttributeError, KeyError, flags.Error), match="epochz"):
        _parse(["--config.train.epochz=3"])


def test_validate_rejects_unknown_missing_and_bad_values():
    base = configs_util.to_dict(_get("digits_mlpnet"))
    bad = json.loads(json.dumps(base))
    bad["train"]["epochz"] = 3
    with pytest.raises(ValueError, match="config.train.epochz"):
        configs_util.validate(bad)
    bad = json.loads(json.dumps(base))
    del bad["data"]["max_test"]
    with pytest.raises(ValueError, match="config.data.max_test"):
        configs_util.validate(bad)
    bad = json.loads(json.dumps(base))
    bad["train"]["schedule"] = "linear"
    with pytest.raises(ValueError, match="config.train.schedule"):
        configs_util.validate(bad)
    bad = json.loads(json.dumps(base))
    bad["model"]["name"] = "alexnet"
    with pytest.raises(ValueError, match="alexnet"):
        configs_util.validate(bad)
    bad = json.loads(json.dumps(base))
    bad["num_parents"] = 0
    with pytest.raises(ValueError, match="num_parents"):
        configs_util.validate(bad)


def test_parent_paths_and_seeds():
    config = _get("digits_mlpnet")
    assert configs_util.parent_dir(config, 1) == os.path.join("checkpoints/digits_mlpnet", "parent_1")  # ready-made
    with config.unlocked():
        config.parents_dir = None
    assert configs_util.parent_dir(config, 1) == os.path.join("runs/digits_mlpnet", "parents", "parent_1")
    name, options = configs_util.model_options_from({**configs_util.to_dict(config), "parent_widths": (1.0, 2.0)}, 1)
    assert options["widths"] == [2 * w for w in config.model.widths]  # parent 1 at double width
    assert configs_util.parent_seed(config, 1) == config.seed + 1
    assert configs_util.data_kwargs_from(config)["name"] == "digits"


# --- train.py ------------------------------------------------------------------------------


def _run_train(*args: str, cwd):
    """``python train.py <args>`` in-process: returncode, stdout, stderr."""
    return run_script("train.py", *args, cwd=cwd)


def _train_args(workdir, *extra):
    return [f"--config.workdir={workdir}", f"--config.parents_dir={workdir / 'parents'}", "--config.train.epochs=1", *extra]


def _train_smoke_commands(folder):
    args = _train_args(folder / "sub", "--config.num_parents=1", "--noprogress")
    return [background.Command([os.path.join(ROOT, "train.py"), *args], cwd=folder, env=subprocess_env())]


# The one real `python train.py`: started when collection ends, beside the in-process tests (tests/background.py).
TRAIN_SMOKE = background.register("train_smoke", _train_smoke_commands, fixture="train_subprocess", timeout=300)


@pytest.fixture
def train_subprocess():
    """The background `python train.py --config.num_parents=1 --config.train.epochs=1`: (folder, process)."""
    outcome = TRAIN_SMOKE.result()
    return outcome.folder, outcome.procs[0]


@pytest.mark.slow
def test_train_py_smoke_subprocess(train_subprocess, tmp_path):
    """The one real `python train.py` run: exit status, stdout, files; the same bits as an in-process run."""
    folder, proc = train_subprocess
    workdir = folder / "sub"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("data digits (sklearn): 1497 train / 300 test"), lines
    assert "parent 0: seed 0, 1 epoch(s)" in lines and "epoch 1: test accuracy" in proc.stdout
    assert any(line.startswith("parent 0: test accuracy") and "saved to" in line for line in lines), lines
    assert lines[-1] == f"summary: {workdir / 'parents' / 'summary.json'}"
    assert sorted(os.listdir(workdir / "parents")) == ["parent_0", "summary.json"]
    sub_vars, sub_meta = checkpoints.load(workdir / "parents" / "parent_0")
    inproc = tmp_path / "inproc"
    assert _run_train(*_train_args(inproc, "--config.num_parents=1", "--noprogress"), cwd=tmp_path).returncode == 0
    in_vars, in_meta = checkpoints.load(inproc / "parents" / "parent_0")
    for a, b in zip(*(jax.tree_util.tree_leaves(v) for v in (sub_vars, in_vars)), strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()  # same seed, same bits, across processes
    assert sub_meta["test_accuracy"] == in_meta["test_accuracy"] and sub_meta["test_loss"] == in_meta["test_loss"]
    untimed = [[{k: v for k, v in r.items() if k != "seconds"} for r in m["history"]] for m in (sub_meta, in_meta)]
    assert untimed[0] == untimed[1]


def test_train_py_end_to_end(tmp_path):
    workdir = tmp_path / "run"
    args = [f"--config.workdir={workdir}", f"--config.parents_dir={workdir / 'parents'}", "--config.train.epochs=1", "--config.num_parents=2", "--noprogress"]
    proc = _run_train(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracies = []
    for k in range(2):
        path = workdir / "parents" / f"parent_{k}"
        variables, meta = checkpoints.load(path)
        assert set(variables) == {"params"}
        assert meta["seed"] == k and meta["parent"] == k
        assert meta["model"] == {"name": "mlpnet", "options": {"bias": False, "widths": [128, 64, 32]},
                                 "input_shape": [8, 8, 1], "num_classes": 10}
        assert meta["dataset"]["name"] == "digits"
        assert meta["config"]["train"]["epochs"] == 1 and meta["config"]["workdir"] == str(workdir)
        assert len(meta["history"]) == 1 and meta["test_accuracy"] == meta["history"][0]["test_accuracy"]
        assert meta["test_accuracy"] > 0.6
        assert meta["created"] and meta["library_version"]
        accuracies.append(meta["test_accuracy"])
    assert "test accuracy" in proc.stdout
    summary = json.loads((workdir / "parents" / "summary.json").read_text())
    assert [p["test_accuracy"] for p in summary["parents"]] == accuracies
    kernels = [
        checkpoints.load(workdir / "parents" / f"parent_{k}")[0]["params"]["fc1"]["kernel"] for k in range(2)
    ]
    assert not (kernels[0] == kernels[1]).all()  # different seeds

    # A second run skips existing parents and trains only the new one.
    stamp = os.path.getmtime(workdir / "parents" / "parent_0" / "metadata.json")
    proc = _run_train(*args[:-2], "--config.num_parents=3", "--noprogress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parent 0: exists" in proc.stdout and "parent 1: exists" in proc.stdout
    assert os.path.getmtime(workdir / "parents" / "parent_0" / "metadata.json") == stamp
    assert checkpoints.load_metadata(workdir / "parents" / "parent_2")["seed"] == 2
    assert sorted(os.listdir(workdir / "parents")) == ["parent_0", "parent_1", "parent_2", "summary.json"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--config.train.epochz=3"], "epochz"),
        (["--config.train.schedule=linear"], "config.train.schedule"),
        (["--config.data.name=mnist", "--config.data.source=idx"], "data_dir"),
    ],
)
def test_train_py_reports_bad_input_in_one_line(tmp_path, args, needle):
    proc = _run_train(
        f"--config.workdir={tmp_path / 'run'}", f"--config.parents_dir={tmp_path / 'run' / 'parents'}", *args, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "run" / "parents").exists()


def test_train_py_help(tmp_path):
    proc = _run_train("--help", cwd=tmp_path)
    assert proc.returncode in (0, 1)  # absl exits with 1 after --help
    assert "Traceback" not in proc.stderr
    assert "--overwrite" in proc.stdout and "--config" in proc.stdout and "parent_<k>" in proc.stdout


def test_compilation_cache_folder_from_the_environment(tmp_path):
    from otfusion_jax import cli

    assert cli.compilation_cache_dir({"HOME": "/h", "XDG_CACHE_HOME": "/c"}) == "/c/otfusion-jax/jax"
    assert cli.compilation_cache_dir({cli.CACHE_ENV: str(tmp_path / "x")}) == str(tmp_path / "x")
    for off in ("off", "0", "", "None", "false"):
        assert cli.compilation_cache_dir({cli.CACHE_ENV: off}) is None, off
    assert cli.enable_compilation_cache(None) is None  # off: JAX's config is left alone
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert cli.enable_compilation_cache(str(blocked / "cache")) is None  # cannot be created: run without it
