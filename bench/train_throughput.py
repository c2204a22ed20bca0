#!/usr/bin/env python
"""Training speed of the conv nets on this machine: images per second of ``training.train_step``.

Issue 14 asks how fast XLA trains VGG11 and ResNet18 on a CPU, and what makes it faster, before parents are
sized. Each case times warm SGD steps (momentum, weight decay: the parents' recipe) on 32x32x1 inputs
(Fashion-MNIST padded), random data (the speed does not depend on the values), after one compile step::

    python bench/train_throughput.py                       # the default grid, a table on stdout
    python bench/train_throughput.py --models vgg11 --widths 0.25 0.5 --batches 128 --out t.json

Nothing here is a test: the figures depend on the machine and its load (the JSON records both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from otfusion_jax import models, training  # noqa: E402
from otfusion_jax.io_utils import atomic_write_text  # noqa: E402

# (model, options) per case: the two variants issue 14 trains of each architecture.
VARIANTS = {
    "vgg11": [dict(bias=False, norm=False), dict(bias=False, norm=True)],
    "resnet18": [dict(bias=False, norm=False), dict(bias=False, norm=True)],
}


def time_case(name: str, opts: dict, width: float, batch: int, steps: int) -> dict:
    """Images per second of warm training steps of one model, and its compile time."""
    model, _ = models.build(name, input_shape=(32, 32, 1), num_classes=10, width=width, **opts)
    variables = models.init(model, jax.random.key(0), (32, 32, 1))
    cfg = training.TrainConfig(batch_size=batch, lr=0.05, momentum=0.9, weight_decay=5e-4)
    tx = training.make_optimizer(cfg, steps_per_epoch=100)
    state = training.TrainState.create(dict(variables), tx)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 32, 32, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=batch).astype(np.int32)
    t0 = time.perf_counter()
    state, m = training.train_step(state, (x, y), module=model, tx=tx)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = training.train_step(state, (x, y), module=model, tx=tx)
    jax.block_until_ready(m)
    secs = time.perf_counter() - t0
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables["params"]))
    return {
        "model": name, **opts, "width": width, "batch": batch, "steps": steps, "params": n_params,
        "compile_s": round(compile_s, 2), "images_per_s": round(steps * batch / secs, 1),
        "epoch_60k_s": round(60000 / (steps * batch / secs), 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--widths", type=float, nargs="*", default=[0.25, 0.5])
    p.add_argument("--batches", type=int, nargs="*", default=[128])
    p.add_argument("--steps", type=int, default=10, help="timed steps per case (after one compile step)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here (atomically)")
    args = p.parse_args(argv)
    rows = []
    load = os.getloadavg()[0]
    print("| model | bias | norm | width | batch | params | compile (s) | images/s | 60k epoch (s) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        for opts in VARIANTS[name]:
            for width in args.widths:
                for batch in args.batches:
                    r = time_case(name, opts, width, batch, args.steps)
                    rows.append(r)
                    print(f"| {name} | {r['bias']} | {r['norm']} | {width} | {batch} | {r['params']:,} | "
                          f"{r['compile_s']} | {r['images_per_s']} | {r['epoch_60k_s']} |", flush=True)
    if args.out:
        report = {
            "device": {"backend": jax.default_backend(), "cpu": platform.processor() or platform.machine(),
                       "cores": os.cpu_count(), "jax": jax.__version__},
            "loadavg_start": load, "rows": rows,
        }
        atomic_write_text(args.out, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
