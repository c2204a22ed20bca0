"""Weight matching against Git Re-Basin's own loop on the shipped MLPNet pairs (docs/RESULTS.md, issue 13).

    python docs/scripts/wm_vs_rebasin.py [--out docs/scripts/wm_vs_rebasin.json]

For the digits pair and the Fashion-MNIST pair (parents 0 and 1 of
``checkpoints/``): test accuracy and matching objective of

* the reference (``tests/reference_rebasin.py``: a NumPy + scipy transcription of
  samuela/git-re-basin's ``weight_matching``: identity start, a fresh random
  order every iteration, at most 100 iterations) over 8 seeds;
* ours: ``WeightMatching(start="identity", restarts=1)`` over the same 8 seeds
  (our own sweep orders), the greedy start, and the default (identity, 8 restarts
  in one vmapped call, the best objective kept).

Nothing is chosen on the test set: the restarts are ranked by the objective.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402

import otfusion_jax as otf  # noqa: E402
import reference_rebasin as ref  # noqa: E402
from otfusion_jax import checkpoints, configs_util  # noqa: E402
from otfusion_jax import spec as spec_lib  # noqa: E402
from configs import digits_mlpnet, fashion_mlpnet  # noqa: E402

SEEDS = range(8)


def _plain(v):
    return {k.removeprefix("params/"): np.asarray(x) for k, x in spec_lib.flatten_paths(v).items()}


def _unplain(flat):
    return spec_lib.unflatten_paths({f"params/{k}": v for k, v in flat.items()})


def run(name, cfgmod):
    config = cfgmod.get_config()
    parents = []
    for i in range(2):
        v, meta = checkpoints.load(os.path.join(ROOT, configs_util.parent_dir(config, i)))
        parents.append(v)
    module, spec = configs_util.model_from_metadata(meta)
    ds = configs_util.load_data(config)
    parent, target = parents

    def evaluate(aligned_parent):
        fused = otf.vanilla_average([aligned_parent, target])
        return otf.training.evaluate(module, fused, ds.x_test, ds.y_test)["accuracy"]

    hidden = [p for p in spec.plans if p != spec.output_plan]
    perm_to_axes = ref.mlp_perm_to_axes(len(hidden), bias=False)
    rows = []
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        orders = [rng.permutation(len(hidden)) for _ in range(100)]
        t = time.perf_counter()
        perm, iters = ref.weight_matching(_plain(target), _plain(parent), perm_to_axes, orders)
        secs = time.perf_counter() - t
        moved = _unplain(ref.permute(_plain(parent), perm_to_axes, perm))
        rows.append({"method": "Git Re-Basin reference", "seed": seed, "accuracy": evaluate(moved), "iterations": iters,
                     "objective": ref.objective(_plain(target), _plain(parent), perm_to_axes, perm), "seconds": secs})
    ours = [("ours, identity start", otf.WeightMatching(restarts=1), SEEDS),
            ("ours, greedy start", otf.WeightMatching(start="greedy", restarts=1), SEEDS),
            ("ours, default (identity, 8 restarts)", otf.WeightMatching(), [0])]
    for label, wm, seeds in ours:
        for seed in seeds:
            perms, info = otf.weight_matching(parent, target, spec, wm, seed=seed)
            t = time.perf_counter()
            perms, info = jax.block_until_ready(otf.weight_matching(parent, target, spec, wm, seed=seed))
            secs = time.perf_counter() - t
            rows.append({"method": label, "seed": seed, "accuracy": evaluate(otf.apply_plans(parent, spec, perms)),
                         "iterations": int(info.n_sweeps), "objective": float(info.objective[-1]), "seconds": secs,
                         "restart_objectives": np.asarray(info.restart_objectives).tolist()})
    return {"pair": name, "parents": [0, 1], "rows": rows}


def markdown(results):
    lines = ["| pair | method | seeds | accuracy (%) min / mean / max | objective min / max | sweeps | s per call |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for res in results:
        methods = dict.fromkeys(r["method"] for r in res["rows"])
        for m in methods:
            rs = [r for r in res["rows"] if r["method"] == m]
            acc = [100 * r["accuracy"] for r in rs]
            obj = [r["objective"] for r in rs]
            lines.append(
                f"| {res['pair']} | {m} | {len(rs)} | {min(acc):.2f} / {np.mean(acc):.2f} / {max(acc):.2f} | "
                f"{min(obj):.2f} / {max(obj):.2f} | {np.mean([r['iterations'] for r in rs]):.1f} | "
                f"{np.median([r['seconds'] for r in rs]):.2f} |"
            )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "scripts", "wm_vs_rebasin.json"))
    args = p.parse_args()
    results = [run("digits MLPNet", digits_mlpnet), run("Fashion-MNIST MLPNet", fashion_mlpnet)]
    device = {"backend": jax.default_backend(), "kind": jax.devices()[0].device_kind}
    otf.io_utils.atomic_write_json(args.out, {"device": device, "results": results})
    print(markdown(results))


if __name__ == "__main__":
    main()
