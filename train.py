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
Compiled programs are kept in the persistent compilation cache that fuse.py uses
($OTFUSION_JAX_CACHE, default ~/.cache/otfusion-jax/jax; off: OTFUSION_JAX_CACHE=off).
"""

from __future__ import annotations

import os
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `from configs import default`
from otfusion_jax.cli import define_config_flag, enable_compilation_cache, run, usage_error  # noqa: E402

_PROG = "train.py"
_CONFIG = define_config_flag(_PROG, config_flags, flags)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Retrain and replace parents whose checkpoint exists.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (and one line per epoch).")


def main(argv: list[str]) -> None:
    """Checks everything (runner.prepare_train), then trains and saves every parent (runner.train_parents)."""
    if len(argv) > 1:
        usage_error(_PROG, f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and jax log a lot at INFO
    enable_compilation_cache()
    # Heavy imports after flag parsing keep --help fast.
    from otfusion_jax import runner  # pylint: disable=import-outside-toplevel

    try:
        job = runner.prepare_train(_CONFIG.value, overwrite=_OVERWRITE.value)  # every check, before any training
    except runner.ERRORS as e:
        usage_error(_PROG, e)
    print(runner.describe_train(job))
    try:
        summary = runner.train_parents(job, progress=_PROGRESS.value, echo=print)
    except runner.ERRORS as e:
        usage_error(_PROG, e)
    print(f"summary: {summary}")


if __name__ == "__main__":
    run(_PROG, main)
