r"""Fuses K trained parents and prints one table with every baseline and method.

Rows: each parent, the prediction ensemble (mean softmax), vanilla averaging
(plain weight mean), and each method of --config.fusion.method:
  ot-weights, ot-acts   OTFusion by weights / activations (":exact" or ":sinkhorn" overrides fusion.solver)
  wm, wm-refine, wm-soft  weight matching (Git Re-Basin), from OTFusion's plans, with Sinkhorn plans
  learned               OTFusion with per-layer Sinkhorn epsilons fitted through Sinkhorn
with test accuracy, loss, loss barrier and fusion time; "+ REPAIR" rows with
--config.fusion.repair=True and "+ fine-tune" rows with --config.fusion.finetune_epochs=N.
One table per --config.fusion.groups entry (e.g. "0,1" and "0,1,2,3"). Writes
<out>/results.json, <out>/results.md and PNG plots (accuracy, barrier, OT cost)
atomically, and optionally the fused checkpoints.

Parents come from <parents_dir>/parent_<k> (written by train.py; ready-made ones
in checkpoints/), or from --parents=PATH,PATH,... (our checkpoints, or the
original OTFusion's PyTorch checkpoints, detected from their content or forced
with --format=torch).

Examples:

  python fuse.py                                      # the ready-made digits MLPNet parents
  python fuse.py --config.fusion.method=ot-weights,ot-acts:sinkhorn,wm --config.fusion.repair=True
  python fuse.py --config=configs/fashion_mlpnet.py --config.fusion.num_samples=400
  python fuse.py --config=configs/fashion_mlpnet_experiment.py     # K=2, K=4, widths, fine-tuning
  python fuse.py --parents=model_0/final.checkpoint,model_1/final.checkpoint --config=configs/mnist_mlpnet.py

Any config field can be overridden with --config.<section>.<field>=<value>; an
unknown field is an error. See configs/default.py for every fusion option.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `from configs import default`
from otfusion_jax.cli import clean_error, define_config_flag, run, usage_error  # noqa: E402

_PROG = "fuse.py"
_CONFIG = define_config_flag(_PROG, config_flags, flags)
_PARENTS = flags.DEFINE_list("parents", None, "Parent checkpoints (default: <workdir>/parents/parent_<k>).")
_FORMAT = flags.DEFINE_enum("format", "auto", ["auto", "ours", "torch"], "Format of --parents files.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <workdir>/fusion).")
_SAVE = flags.DEFINE_bool("save_fused", False, "Also save each fused model as a checkpoint in the output directory.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Print a status line before each step.")


def _load_parents(paths, fmt):
    """Loads parent checkpoints -> (parents, spec, metadata list)."""
    from otfusion_jax import checkpoints, configs_util, experiment  # pylint: disable=import-outside-toplevel
    from otfusion_jax import spec as spec_lib  # pylint: disable=import-outside-toplevel
    from otfusion_jax.interop import is_torch_checkpoint, load_torch_checkpoint  # pylint: disable=import-outside-toplevel

    parents, metas, spec = [], [], None
    for k, path in enumerate(paths):
        if fmt == "torch" or (fmt == "auto" and is_torch_checkpoint(path)):
            _, _, variables, meta = load_torch_checkpoint(path)
        else:
            variables, meta = checkpoints.load(path)
        module, pspec = configs_util.model_from_metadata(meta)
        try:
            pspec.check_variables(variables, what=f"checkpoint {path}")
        except spec_lib.SpecError as e:
            raise ValueError(str(e)) from None
        _check_leaves_fit_model(path, module, meta, variables)
        if spec is not None and {p for p, _ in pspec.leaves} != {p for p, _ in spec.leaves}:
            raise ValueError(
                f"checkpoint {path}: architecture {meta['model']['name']} {meta['model']['options']} "
                f"differs from parent 0's ({metas[0]['model']['name']} {metas[0]['model']['options']})"
            )
        spec = spec or pspec
        acc = meta.get("test_accuracy")
        parents.append(experiment.Parent(f"parent {k}" + (f" (seed {meta['seed']})" if "seed" in meta else ""), module, variables))
        metas.append({"path": os.path.abspath(path), "test_accuracy_at_training": acc, "model": meta.get("model")})
    return parents, spec, metas


def _check_leaves_fit_model(path, module, meta, variables):
    """Every leaf has the shape and dtype the model of the metadata creates, or a ValueError naming it."""
    import jax  # pylint: disable=import-outside-toplevel

    from otfusion_jax import fusion, models  # pylint: disable=import-outside-toplevel
    from otfusion_jax import spec as spec_lib  # pylint: disable=import-outside-toplevel

    try:
        want = jax.eval_shape(lambda: models.init(module, jax.random.key(0), tuple(meta["model"]["input_shape"])))
    except Exception as e:  # noqa: BLE001 - flax raises many types for a bad model description.
        raise ValueError(f"checkpoint {path}: its metadata describes no buildable model: {type(e).__name__}: {e}") from None
    want, have = spec_lib.flatten_paths(want), spec_lib.flatten_paths(variables)
    for leaf, w in want.items():
        h = have.get(leaf)
        if h is None:
            raise ValueError(f"checkpoint {path}: leaf {leaf} is missing (the model of its metadata has it)")
        if tuple(h.shape) != tuple(w.shape) or h.dtype != w.dtype:
            raise ValueError(
                f"checkpoint {path}: leaf {leaf} is {h.dtype}{tuple(h.shape)} but the model of its metadata "
                f"({meta['model']['name']} {meta['model']['options']}) expects {w.dtype}{tuple(w.shape)}"
            )
    extra = sorted(set(have) - set(want))
    if extra:
        raise ValueError(f"checkpoint {path}: leaf {extra[0]} is not part of the model of its metadata")
    try:
        fusion.check_finite([variables])
    except fusion.FusionError as e:
        raise ValueError(f"checkpoint {path}: {str(e).removeprefix('parent 0: ')}") from None


def _groups(spec_groups, k_total):
    """Parent index lists of the tables to make ((): one table with every parent)."""
    if not spec_groups:
        return [list(range(k_total))]
    groups = []
    for g in spec_groups:
        try:
            idx = [int(i) for i in str(g).split(",")]
        except ValueError:
            raise ValueError(f"fusion.groups: {g!r} is not a comma list of parent indices") from None
        bad = [i for i in idx if not 0 <= i < k_total]
        if bad or len(idx) < 2:
            raise ValueError(f"fusion.groups: {g!r} needs >= 2 parent indices in 0..{k_total - 1}")
        groups.append(idx)
    return groups


def _barrier(members, spec, dataset, fusion_cfg, say):
    """Loss/accuracy along the line between two parents, before and after OT alignment (weights, exact).

    None for parents of different widths: no straight line joins them.
    """
    import jax  # pylint: disable=import-outside-toplevel

    import otfusion_jax as otf  # pylint: disable=import-outside-toplevel
    from otfusion_jax import experiment  # pylint: disable=import-outside-toplevel

    a, b = members
    if a.module != b.module:
        return None
    if say:
        say("loss barrier between the two parents")
    x, y = dataset.x_test[:2000], dataset.y_test[:2000]
    cfg = experiment.fusion_config_from(fusion_cfg, "weights")
    align = jax.jit(otf.align, static_argnums=(2, 3))
    aligned, _, _ = align(a.variables, b.variables, spec, dataclasses.replace(cfg, solver="exact"))
    return {
        "plain (no alignment)": experiment.interpolation_curve(b.module, a.variables, b.variables, x, y),
        "after OT alignment (weights, exact)": experiment.interpolation_curve(b.module, aligned, b.variables, x, y),
    }


def main(argv: list[str]) -> None:
    """Loads parents and data, fuses, prints the table, writes results."""
    if len(argv) > 1:
        usage_error(_PROG, f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    import jax  # pylint: disable=import-outside-toplevel

    import otfusion_jax as otf  # pylint: disable=import-outside-toplevel
    from otfusion_jax import checkpoints, configs_util, data, experiment, io_utils  # pylint: disable=import-outside-toplevel

    try:
        config = _CONFIG.value
        config_dict = configs_util.validate(config)
        experiment.parse_methods(config_dict["fusion"]["method"])
        experiment.fusion_config_from(config_dict["fusion"], "weights")  # validates the options early
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        usage_error(_PROG, f"bad config: {clean_error(e)}")
    paths = _PARENTS.value or [configs_util.parent_dir(config, k) for k in range(config_dict["num_parents"])]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        usage_error(_PROG, f"parent checkpoint not found: {missing[0]} (train parents first: python train.py, same --config)")
    out_dir = _OUT.value or os.path.join(config_dict["workdir"], "fusion")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        usage_error(_PROG, f"cannot write to output directory {out_dir}: {e.strerror or e}")
    try:
        parents, spec, metas = _load_parents(paths, _FORMAT.value)
        dataset = configs_util.load_data(config)
        for m in metas:
            model = m.get("model") or {}
            if tuple(model.get("input_shape") or ()) != tuple(dataset.input_shape) or model.get("num_classes") != dataset.num_classes:
                raise ValueError(
                    f"checkpoint {m['path']}: trained on inputs {tuple(model.get('input_shape') or ())} with "
                    f"{model.get('num_classes')} classes, but data {dataset.name} has {tuple(dataset.input_shape)} "
                    f"with {dataset.num_classes} classes (pick the config the parents were trained with)"
                )
    except (ImportError, ValueError, OSError, checkpoints.CheckpointError, data.DataSourceError) as e:
        usage_error(_PROG, e)
    say = (lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)) if _PROGRESS.value else None
    fusion_cfg = config_dict["fusion"]
    try:
        groups = _groups(fusion_cfg.get("groups") or (), len(parents))
        finetune = None
        if fusion_cfg.get("finetune_epochs", 0) > 0:
            finetune = dataclasses.replace(
                configs_util.train_config_from(config),
                epochs=int(fusion_cfg["finetune_epochs"]),
                lr=float(fusion_cfg.get("finetune_lr") or config_dict["train"]["lr"]),
            )
    except ValueError as e:
        usage_error(_PROG, e)
    print(
        f"{len(parents)} parents ({metas[0]['model']['name']}), data {dataset.name}: {len(dataset.x_test)} test examples; "
        f"methods {fusion_cfg['method']}; device {jax.devices()[0].device_kind} ({jax.default_backend()})"
    )
    tables, markdown, cost_curves, to_save = [], [], {}, []
    barrier = None
    for group in groups:
        members = [parents[i] for i in group]
        title = f"parents {', '.join(map(str, group))} (target: parent {group[fusion_cfg.get('target', -1) % len(group)]})"
        if say:
            say(f"table for {title}")
        try:
            rows, fused = experiment.run_fusion_table(members, spec, dataset, fusion_cfg, finetune=finetune, progress=say)
        except (ValueError, otf.FusionError) as e:
            usage_error(_PROG, e)
        table = experiment.format_table(rows)
        print(f"\n{title}\n\n{table}\n")
        tables.append({"parents": list(group), "title": title, "rows": rows})
        markdown.append(f"### {title}\n\n{table}\n")
        target = group[fusion_cfg.get("target", -1) % len(group)]
        suffix = "" if len(groups) == 1 else "_parents" + "-".join(map(str, group))
        to_save += [(item, target, suffix) for item in fused.values()]
        for label, item in fused.items():
            if item["aux"] is None:  # weight matching / learned fusion: no OT costs
                continue
            cost_curves[f"{label} [{','.join(map(str, group))}]"] = experiment.mean_costs(item["aux"])
        if barrier is None and len(group) == 2 and fused:
            barrier = _barrier(members, spec, dataset, fusion_cfg, say)
    results = {
        "config": config_dict,
        "parents": metas,
        "dataset": {"name": dataset.name, "source": dataset.source, "test_examples": len(dataset.x_test)},
        "device": {"backend": jax.default_backend(), "kind": jax.devices()[0].device_kind, "count": jax.device_count()},
        "tables": tables,
        "barrier": barrier,
    }
    io_utils.atomic_write_json(os.path.join(out_dir, "results.json"), results)
    io_utils.atomic_write_text(os.path.join(out_dir, "results.md"), "\n".join(markdown))
    if fusion_cfg.get("plots", True):
        from otfusion_jax import plots  # pylint: disable=import-outside-toplevel

        plots.accuracy_plot(os.path.join(out_dir, "accuracy.png"), tables[0]["rows"], tables[0]["title"])
        if cost_curves:
            plots.ot_cost_plot(os.path.join(out_dir, "ot_cost.png"), cost_curves)
        if barrier:
            plots.barrier_plot(os.path.join(out_dir, "barrier.png"), barrier, "parent A -> parent B, before and after OT alignment")
    if _SAVE.value:
        for item, target, suffix in to_save:
            path = os.path.join(out_dir, "fused_" + item["method"] + "_" + item["solver"] + suffix)
            meta = {"kind": "fused", "method": item["label"], "model": metas[target]["model"], "parents": metas, "config": config_dict}
            checkpoints.save(path, item["variables"], meta)
            print(f"saved {item['label']} to {path}")
    print(f"\nresults: {os.path.join(out_dir, 'results.json')}")


if __name__ == "__main__":
    run(_PROG, main)
