"""What ``train.py`` and ``fuse.py`` run, as library functions: prepare (check everything), run, write.

Both commands follow the same three steps, so that a bad input fails before any work and nothing is half written:

1. ``prepare_*`` checks the config (``configs_util.validate``), the checkpoints, the data and the output folder,
   and returns a job; every problem is an exception from :data:`ERRORS` with a one-line message naming the
   field, file or leaf (the scripts print it and exit with status 2).
2. :func:`run_fuse` / :func:`train_parents` do the work, reporting through callbacks (``progress`` for status
   lines, ``echo`` / ``on_table`` for what the user reads): the library itself prints nothing.
3. :func:`write_fuse_results` writes every output atomically (``io_utils``, ``checkpoints``, ``plots``),
   ``results.json`` last: once it exists, the tables, plots and fused checkpoints next to it are complete.
   :func:`train_parents` saves each parent as soon as it is trained (atomic orbax folders) and the summary last.

>>> job = runner.prepare_fuse(config, out="/tmp/fusion")
>>> results = runner.run_fuse(job, on_table=lambda t: print(t.markdown()))
>>> runner.write_fuse_results(job, results, save_fused=True)
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from otfusion_jax import checkpoints, configs_util, experiment, io_utils, models, training
from otfusion_jax import data as data_lib
from otfusion_jax import parents as parents_lib
from otfusion_jax import spec as spec_lib

__all__ = [
    "ERRORS",
    "FuseJob",
    "prepare_fuse",
    "describe_fuse",
    "run_fuse",
    "results_record",
    "write_fuse_results",
    "TrainJob",
    "prepare_train",
    "describe_train",
    "train_parent",
    "train_parents",
]

# What a bad input raises (CheckpointError, DataSourceError and engine.FusionError are ValueErrors):
# the scripts turn each into one line and exit status 2.
ERRORS: tuple[type[BaseException], ...] = (ImportError, ValueError, OSError)

Echo = Callable[[str], None]


def _quiet(_msg: str) -> None:
    return None


# --- fuse.py -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FuseJob:
    """A checked fusion run: what :func:`prepare_fuse` loaded and decided.

    Attributes:
      config: the validated config (plain dicts; written to results.json and fused checkpoints as a record).
      parents: every parent (name, module, variables); ``metas``: per parent its path, accuracy at training,
        model entry and whether it has BatchNorm.
      spec: their alignment spec.
      dataset: the data set of the config.
      groups: the tables to make, lists of indices into ``parents``.
      settings: the typed options (``configs_util.settings_from``).
      out_dir: the output folder (exists and is writable).
      from_checkpoints: True when the parents were given as paths (``--parents``): their architecture is theirs.
    """

    config: dict[str, Any]
    parents: list[experiment.Parent]
    spec: spec_lib.AlignmentSpec
    metas: list[dict[str, Any]]
    dataset: data_lib.Dataset
    groups: list[list[int]]
    settings: experiment.Settings
    out_dir: str
    from_checkpoints: bool


def prepare_fuse(
    config: Any,
    *,
    parents: Sequence[str] | None = None,
    fmt: str = "auto",
    model_overrides: Sequence[str] = (),
    out: str | None = None,
) -> FuseJob:
    """Checks a fusion run before any work: the config, the parents' checkpoints, the data, the output folder.

    Args:
      config: The experiment config (ConfigDict or nested dicts).
      parents: Checkpoint paths (``fuse.py --parents``; ours or the original's PyTorch files); None: the
        config's ``<parents_dir>/parent_<k>``, which ``config.model`` must describe.
      fmt: "auto", "ours" or "torch" (the format of ``parents``).
      model_overrides: The ``config.model`` fields given on the command line: with ``parents`` each must
        agree with the checkpoints.
      out: The output folder; None: ``<workdir>/fusion``. Created (empty) if missing, as the last check.

    Returns:
      The :class:`FuseJob`.

    Raises:
      One of :data:`ERRORS`, with a one-line message naming the field, checkpoint or leaf.
    """
    given = list(parents) if parents else None
    cfg = configs_util.validate(config, num_parents=len(given) if given else None, model_from_config=not given)
    k_total = len(given) if given else cfg["num_parents"]
    if k_total < 2:
        where = f"--parents gives {k_total} checkpoint" if given else f"config.num_parents={k_total}"
        raise ValueError(f"{where}: fusion needs >= 2 parents")
    paths = given or [configs_util.parent_dir(cfg, k) for k in range(k_total)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise ValueError(
            f"parent checkpoint not found: {missing[0]} (train parents first: python train.py, same --config)"
        )
    loaded, spec, metas = parents_lib.load_parents(paths, fmt)
    if given:
        parents_lib.check_model_overrides(cfg, list(model_overrides), metas)
        configs_util.check_options_for_model(
            cfg, metas[0]["model"]["name"], all(m["has_batchnorm"] for m in metas), f"checkpoint {metas[0]['path']}"
        )
    else:
        parents_lib.check_config_matches(cfg, metas)
    dataset = configs_util.load_data(cfg)
    parents_lib.check_data_matches(metas, dataset)
    parents_lib.check_heldout_unseen(metas, dataset, cfg["data"])
    groups = configs_util.fusion_groups(cfg["experiment"]["groups"], len(loaded))
    settings = configs_util.settings_from(cfg)
    out_dir = out or os.path.join(cfg["workdir"], "fusion")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise OSError(f"cannot write to output directory {out_dir}: {e.strerror or e}") from None
    return FuseJob(cfg, loaded, spec, metas, dataset, groups, settings, out_dir, bool(given))


def describe_fuse(job: FuseJob) -> str:
    """The header line of a fusion run: parents, architecture, data, methods, device."""
    architectures = " | ".join(dict.fromkeys(parents_lib.describe_model(m["model"]) for m in job.metas))
    source = (
        "architecture from the checkpoints (--parents): config.model, parent_widths, num_parents, parents_dir not used"
        if job.from_checkpoints
        else "architecture as config.model"
    )
    return (
        f"{len(job.parents)} parents ({architectures}; {source}), data {job.dataset.name}: "
        f"{len(job.dataset.x_test)} test examples; methods {job.settings.experiment.method}; "
        f"device {jax.devices()[0].device_kind} ({jax.default_backend()})"
    )


def run_fuse(
    job: FuseJob,
    *,
    progress: Echo | None = None,
    on_table: Callable[[experiment.Table], None] | None = None,
) -> experiment.Results:
    """Makes every table of the job (``experiment.run``).

    Raises:
      ValueError: ``FusionError`` for options that do not fit the parents (e.g. weight matching of different
        widths), naming the option.
    """
    return experiment.run(
        job.parents, job.spec, job.dataset, job.settings, job.groups, progress=progress, on_table=on_table
    )


def results_record(job: FuseJob, results: experiment.Results, **more: Any) -> dict[str, Any]:
    """The content of results.json: config, parents, data set, device, tables (rows), barrier, and ``more``."""
    return {
        "config": job.config,
        "parents": job.metas,
        "dataset": {"name": job.dataset.name, "source": job.dataset.source, "test_examples": len(job.dataset.x_test)},
        "device": {"backend": jax.default_backend(), "kind": jax.devices()[0].device_kind, "count": jax.device_count()},
        "tables": [{"parents": list(t.parents), "title": t.title, "rows": t.rows} for t in results.tables],
        "barrier": results.barrier,
        **more,
    }


def write_fuse_results(
    job: FuseJob,
    results: experiment.Results,
    *,
    save_fused: bool = False,
    on_saved: Callable[[str, str], None] | None = None,
    **more: Any,
) -> str:
    """Writes results.md, the PNG plots (``experiment.plots``), the fused checkpoints and results.json, each atomically.

    Args:
      job: The run.
      results: What :func:`run_fuse` returned.
      save_fused: Also save every fused model as ``<out>/fused_<method>_<solver>[_parents<i>-<j>...]``
        (the group suffix when there are several tables), metadata naming its method, model and parents.
      on_saved: Called with (row label, path) after each fused checkpoint is saved.
      **more: Extra top-level entries of results.json (e.g. ``compilation``).

    Returns:
      The path of results.json, written last.
    """
    out_dir = job.out_dir
    tables = results.tables
    io_utils.atomic_write_text(
        os.path.join(out_dir, "results.md"), "\n".join(f"### {t.title}\n\n{t.markdown()}\n" for t in tables)
    )
    if job.settings.experiment.plots:
        from otfusion_jax import plots  # pylint: disable=import-outside-toplevel

        plots.accuracy_plot(os.path.join(out_dir, "accuracy.png"), tables[0].rows, tables[0].title)
        if results.cost_curves:
            plots.ot_cost_plot(os.path.join(out_dir, "ot_cost.png"), results.cost_curves)
        if results.barrier:
            plots.barrier_plot(
                os.path.join(out_dir, "barrier.png"),
                results.barrier,
                "parent A -> parent B, before and after OT alignment",
            )
    if save_fused:
        for table in tables:
            suffix = "" if len(tables) == 1 else "_parents" + "-".join(map(str, table.parents))
            for item in table.fused.values():
                path = os.path.join(out_dir, f"fused_{item.method}_{item.solver}{suffix}")
                meta = {
                    "kind": "fused",
                    "method": item.label,
                    "model": job.metas[table.target]["model"],
                    "parents": job.metas,
                    "config": job.config,
                }
                checkpoints.save(path, item.variables, meta)
                if on_saved is not None:
                    on_saved(item.label, path)
    return io_utils.atomic_write_json(os.path.join(out_dir, "results.json"), results_record(job, results, **more))


# --- train.py ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """A checked training run: the validated config, its data, and the parents to skip (their metadata)."""

    config: dict[str, Any]
    dataset: data_lib.Dataset
    existing: dict[int, dict[str, Any]]


def prepare_train(config: Any, *, overwrite: bool = False) -> TrainJob:
    """Checks a training run before any work: the config, the data, and every existing parent checkpoint.

    An existing checkpoint at ``<parents_dir>/parent_<k>`` is skipped (unless ``overwrite``) and must be what
    the config would train (``parents.check_parent_matches``); a path there that is not a checkpoint is refused.

    Raises:
      One of :data:`ERRORS`, with a one-line message naming the field or path.
    """
    cfg = configs_util.validate(config)
    if cfg["data"]["eval_split"] != "test":  # parents' metadata records test-set accuracy
        raise configs_util.field_error(
            "data.eval_split", cfg["data"]["eval_split"], "is fuse.py's; train.py evaluates parents on the test set"
        )
    dataset = configs_util.load_data(cfg)
    existing = {}
    for k in range(cfg["num_parents"]):
        path = configs_util.parent_dir(cfg, k)
        if os.path.lexists(path) and not checkpoints.exists(path):
            raise ValueError(f"{path} exists but is not a checkpoint; move it away or pick another workdir")
        if checkpoints.exists(path) and not overwrite:
            existing[k] = checkpoints.load_metadata(path)
            try:
                parents_lib.check_parent_matches(cfg, k, path, existing[k].get("model"))
            except ValueError as e:
                raise ValueError(f"{e} (or --overwrite to retrain it)") from None
    return TrainJob(cfg, dataset, existing)


def describe_train(job: TrainJob) -> str:
    """The header line of a training run: data, model, how many parents, where."""
    ds, cfg = job.dataset, job.config
    return (
        f"data {ds.name} ({ds.source}): {len(ds.x_train)} train / {len(ds.x_test)} test, "
        f"input {ds.input_shape}; model {cfg['model']['name']}; {cfg['num_parents']} parent(s) -> "
        f"{configs_util.parents_dir(cfg)}"
    )


def train_parent(
    job: TrainJob, k: int, *, progress: bool = True, echo: Echo | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trains parent ``k`` (seed ``config.seed + k``: initialisation and data order); writes nothing.

    Args:
      job: The run.
      k: The parent's index.
      progress: A progress bar and one line per epoch (``training.train``); False: one line per epoch via ``echo``.
      echo: Called with the user-facing lines.

    Returns:
      ``(variables, metadata)``: metadata as train.py saves it (kind, parent, model name and options, data set,
      seed, train config, the full config as a record, test accuracy and loss, history, seconds).
    """
    say = echo or _quiet
    cfg, dataset = job.config, job.dataset
    seed = configs_util.parent_seed(cfg, k)
    train_cfg = configs_util.train_config_from(cfg, seed=seed)
    module, _ = configs_util.model_from(cfg, dataset.input_shape, dataset.num_classes, k)
    # Jitted init: one compilation shared by all parents instead of op-by-op dispatch.
    init = jax.jit(models.init, static_argnums=(0, 2))
    variables = init(module, jax.random.key(seed), dataset.input_shape)
    say(f"parent {k}: seed {seed}, {train_cfg.epochs} epoch(s)")
    start = time.perf_counter()
    variables, history = training.train(module, variables, dataset, train_cfg, progress=progress)
    if history:
        final = {"loss": history[-1]["test_loss"], "accuracy": history[-1]["test_accuracy"]}
    else:
        final = training.evaluate(module, variables, dataset.x_test, dataset.y_test, train_cfg.eval_batch_size)
    if not progress:
        for record in history:
            say(f"  epoch {record['epoch']}: test accuracy {record['test_accuracy']:.4f}")
    name, options = configs_util.model_options_from(cfg, k)
    metadata = {
        "kind": "parent",
        "parent": k,
        "model": {
            "name": name,
            "options": options,
            "input_shape": list(dataset.input_shape),
            "num_classes": dataset.num_classes,
        },
        "dataset": {
            **configs_util.data_kwargs_from(cfg),
            "source": dataset.source,  # the one used ("auto" resolved)
            "num_train": len(dataset.x_train),
            "num_test": len(dataset.x_test),
        },
        "seed": seed,
        "train_config": train_cfg,
        "config": cfg,
        "test_accuracy": final["accuracy"],
        "test_loss": final["loss"],
        "history": history,
        "train_seconds": time.perf_counter() - start,
    }
    return variables, metadata


def train_parents(job: TrainJob, *, progress: bool = True, echo: Echo | None = None) -> str:
    """Trains and saves every parent of the job that is not skipped, then writes ``<parents_dir>/summary.json``.

    Args:
      job: The run (:func:`prepare_train`).
      progress: See :func:`train_parent`.
      echo: Called with the user-facing lines (one per skipped or saved parent).

    Returns:
      The path of summary.json (written last, atomically).

    Raises:
      checkpoints.CheckpointError: If a parent cannot be saved (the parents saved before it stay).
    """
    say = echo or _quiet
    cfg = job.config
    summary = []
    for k in range(cfg["num_parents"]):
        path = configs_util.parent_dir(cfg, k)
        if k in job.existing:
            meta = job.existing[k]
            say(f"parent {k}: exists ({path}, test accuracy {meta.get('test_accuracy')}); skipped")
            summary.append({"parent": k, "path": path, "test_accuracy": meta.get("test_accuracy"), "skipped": True})
            continue
        variables, metadata = train_parent(job, k, progress=progress, echo=echo)
        checkpoints.save(path, variables, metadata)
        say(f"parent {k}: test accuracy {metadata['test_accuracy']:.4f}, saved to {path}")
        summary.append({"parent": k, "path": path, "test_accuracy": metadata["test_accuracy"], "skipped": False})
    summary_path = os.path.join(configs_util.parents_dir(cfg), "summary.json")
    io_utils.atomic_write_json(summary_path, {"parents": summary, "config": cfg})
    return summary_path
