r"""Trains the K parent models of a fusion experiment and checkpoints them.

Parent k (k = 0..K-1) differs from the others only by its seed, config.seed + k,
which sets its initialisation and its data order. Each is saved atomically to
<workdir>/parents/parent_<k> with metadata (model name and options, data set,
seed, the full config, test accuracy, per-epoch history). A parent whose
checkpoint already exists is skipped unless --overwrite is given.

Examples:

  python train.py                                        # digits, MLPNet (offline, seconds)
  python train.py --config=configs/fashion_mlpnet.py
  python train.py --config.train.epochs=3 --config.num_parents=4
  python train.py --config=configs/mnist_mlpnet.py \
      --config.data.source=idx --config.data.data_dir=/data/mnist

Any config field can be overridden with --config.<section>.<field>=<value>; an
unknown field is an error. Every field is checked before any work
(configs_util.validate): a bad value is one line naming the field and its allowed
values, exit status 2, nothing written. See configs/default.py for every field.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `from configs import default`
from otfusion_jax.cli import define_config_flag, run, usage_error  # noqa: E402

_PROG = "train.py"
_CONFIG = define_config_flag(_PROG, config_flags, flags)


def _usage_error(message: object) -> None:
    usage_error(_PROG, message)


_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Retrain and replace parents whose checkpoint exists.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (and one line per epoch).")


def main(argv: list[str]) -> None:
    """Trains and saves every parent of the config."""
    if len(argv) > 1:
        _usage_error(f"unexpected arguments: {' '.join(argv[1:])}")

    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and jax log a lot at INFO
    # Heavy imports after flag parsing keep --help fast.
    import jax  # pylint: disable=import-outside-toplevel

    from otfusion_jax import checkpoints, configs_util, data, models, training  # pylint: disable=import-outside-toplevel
    from otfusion_jax import io_utils  # pylint: disable=import-outside-toplevel
    from otfusion_jax import parents as parents_lib  # pylint: disable=import-outside-toplevel

    try:
        config = configs_util.validate(_CONFIG.value)  # every field, before any work
    except ValueError as e:
        _usage_error(e)
    try:
        dataset = configs_util.load_data(config)
    except (ValueError, data.DataSourceError) as e:
        _usage_error(e)

    k_total = config["num_parents"]
    print(
        f"data {dataset.name} ({dataset.source}): {len(dataset.x_train)} train / {len(dataset.x_test)} test, "
        f"input {dataset.input_shape}; model {config['model']['name']}; {k_total} parent(s) -> "
        f"{configs_util.parents_dir(config)}"
    )
    existing = {}  # parents to skip, checked against the config before any training
    for k in range(k_total):
        path = configs_util.parent_dir(config, k)
        if os.path.lexists(path) and not checkpoints.exists(path):
            _usage_error(f"{path} exists but is not a checkpoint; move it away or pick another workdir")
        if checkpoints.exists(path) and not _OVERWRITE.value:
            try:
                existing[k] = checkpoints.load_metadata(path)
            except checkpoints.CheckpointError as e:
                _usage_error(e)
            try:
                parents_lib.check_parent_matches(config, k, path, existing[k].get("model"))
            except ValueError as e:
                _usage_error(f"{e} (or --overwrite to retrain it)")
    summary = []
    for k in range(k_total):
        path = configs_util.parent_dir(config, k)
        if k in existing:
            meta = existing[k]
            print(f"parent {k}: exists ({path}, test accuracy {meta.get('test_accuracy')}); skipped")
            summary.append(
                {"parent": k, "path": path, "test_accuracy": meta.get("test_accuracy"), "skipped": True}
            )
            continue
        seed = configs_util.parent_seed(config, k)
        try:
            train_cfg = configs_util.train_config_from(config, seed=seed)
            module, _ = configs_util.model_from(config, dataset.input_shape, dataset.num_classes, k)
        except ValueError as e:
            _usage_error(e)
        # Jitted init: one compilation shared by all parents instead of op-by-op dispatch.
        init = jax.jit(models.init, static_argnums=(0, 2))
        variables = init(module, jax.random.key(seed), dataset.input_shape)
        print(f"parent {k}: seed {seed}, {train_cfg.epochs} epoch(s)")
        start = time.perf_counter()
        variables, history = training.train(module, variables, dataset, train_cfg, progress=_PROGRESS.value)
        if history:
            final = {"loss": history[-1]["test_loss"], "accuracy": history[-1]["test_accuracy"]}
        else:
            final = training.evaluate(
                module, variables, dataset.x_test, dataset.y_test, train_cfg.eval_batch_size
            )
        if not _PROGRESS.value:
            for record in history:
                print(f"  epoch {record['epoch']}: test accuracy {record['test_accuracy']:.4f}")
        name, options = configs_util.model_options_from(config, k)
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
                **configs_util.data_kwargs_from(config),
                "source": dataset.source,  # the one used ("auto" resolved)
                "num_train": len(dataset.x_train),
                "num_test": len(dataset.x_test),
            },
            "seed": seed,
            "train_config": train_cfg,
            "config": config,
            "test_accuracy": final["accuracy"],
            "test_loss": final["loss"],
            "history": history,
            "train_seconds": time.perf_counter() - start,
        }
        try:
            checkpoints.save(path, variables, metadata)
        except checkpoints.CheckpointError as e:
            _usage_error(e)
        print(f"parent {k}: test accuracy {final['accuracy']:.4f}, saved to {path}")
        summary.append({"parent": k, "path": path, "test_accuracy": final["accuracy"], "skipped": False})

    summary_path = os.path.join(configs_util.parents_dir(config), "summary.json")
    io_utils.atomic_write_json(summary_path, {"parents": summary, "config": config})
    print(f"summary: {summary_path}")


if __name__ == "__main__":
    run(_PROG, main)
