#!/usr/bin/env python
"""Fusion time per number of parents K for the many-parent methods (issue 13: "time per K in bench/").

MLPNet 784-400-200-100-10 without biases (the Fashion parents' shapes), K NumPy-drawn parents fused onto the last,
activations of 1,000 inputs (CCA Merge's default; the barycentre gets the same). Each figure is the median of
warm ``otf.fuse`` calls (``block_until_ready``), after one call that compiles; interleaved over methods within
each K, so that load drifts hit every method alike::

    python bench/bench_many.py                                  # K = 2 4 8, a table on stdout, bench/many.json
    python bench/bench_many.py --ks 2 4 --repeats 3 --out /tmp/many.json

Methods: CCA Merge (``otf.CCAMerge``), the barycentre by activations (exact, post-ReLU correlation costs, at most
10 rounds: the many-parent method before CCA Merge), weight matching's barycentre (one restart, at most 10 rounds).
Capture of the activations is timed apart (it is the same for the two methods that need it).
Nothing here is a test: the figures depend on the machine and its load (the JSON records both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import otfusion_jax as otf  # noqa: E402
from otfusion_jax import models  # noqa: E402
from otfusion_jax import spec as spec_lib  # noqa: E402
from otfusion_jax.io_utils import atomic_write_text  # noqa: E402

SHAPE = (28, 28, 1)


def _parents(model, k: int, seed: int) -> list[dict]:
    shapes = spec_lib.flatten_paths(jax.eval_shape(lambda: models.init(model, jax.random.key(0), SHAPE)))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(k):
        flat = {p: jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(s.shape[0]), s.dtype) for p, s in shapes.items()}
        out.append(spec_lib.unflatten_paths(flat))
    return out


def _methods(iterations: int) -> dict:
    corr = otf.FusionConfig(mode="activations", solver="exact", ground_metric="correlation", stream_policy="shared")
    return {
        "cca": (otf.CCAMerge(), "post", {}),
        "ot-acts barycentre (correlation)": (corr, "post", {"iterations": iterations}),
        "weight matching barycentre": (otf.WeightMatching(restarts=1), None, {"iterations": iterations, "key": 0}),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8], help="numbers of parents (default 2 4 8)")
    p.add_argument("--samples", type=int, default=1000, help="activation inputs (default 1000)")
    p.add_argument("--repeats", type=int, default=5, help="warm calls per figure (default 5)")
    p.add_argument("--iterations", type=int, default=10, help="barycentre rounds at most (default 10)")
    p.add_argument("--widths", type=int, nargs="+", default=[400, 200, 100], help="hidden widths (default 400 200 100)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "many.json"), help="JSON results (atomic write)")
    args = p.parse_args(argv)

    model, spec = models.build("mlpnet", input_shape=SHAPE, bias=False, widths=tuple(args.widths))
    x = jax.random.normal(jax.random.key(1), (args.samples, *SHAPE))
    rows = []
    for k in args.ks:
        parents = _parents(model, k, k)
        t0 = time.perf_counter()
        acts = jax.block_until_ready([models.capture_activations(model, v, x, "post") for v in parents])
        capture_s = time.perf_counter() - t0
        calls = {}
        for name, (aligner, kind, opts) in _methods(args.iterations).items():
            a = acts if kind else None

            def call(aligner=aligner, a=a, opts=opts):
                return jax.block_until_ready(otf.fuse(parents, spec, aligner, activations=a, **opts))

            t0 = time.perf_counter()
            call()
            calls[name] = (call, time.perf_counter() - t0, [])
        for _ in range(args.repeats):  # interleaved: every method sees the same load drift
            for name, (call, _, times) in calls.items():
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
        for name, (_, first, times) in calls.items():
            med = statistics.median(times)
            rows.append({"k": k, "method": name, "fusion_ms": 1e3 * med, "first_call_s": first,
                         "compile_s": max(first - med, 0.0), "capture_s": capture_s, "times_s": times})
            print(f"K={k:2d}  {name:34s} {1e3 * med:9.1f} ms  (first call {first:5.1f} s; capture {capture_s:4.1f} s)",
                  flush=True)
    report = {
        "device": str(jax.devices()[0]), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg(), "jax": jax.__version__, "widths": args.widths, "samples": args.samples,
        "repeats": args.repeats,
        "rows": rows,
    }
    atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
