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

The config and the parents' checkpoints must agree:
  parents from <parents_dir>  config.model (with config.parent_widths for parent k)
                              describes them, as train.py made them; a field that
                              contradicts a checkpoint's metadata (model name, bias,
                              norm, width, widths) is an error naming both values.
  --parents=PATH,...          the architecture is the checkpoints' (their metadata;
                              PyTorch files: their content): config.model,
                              config.parent_widths, config.num_parents and
                              config.parents_dir are not used, and the header line
                              says so; a --config.model.<field> given on the command
                              line that contradicts a checkpoint is an error naming
                              both values.
Every config field is checked before any work (configs_util.validate): a bad value
is one line naming the field and its allowed values, exit status 2, nothing written.

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
from otfusion_jax.cli import define_config_flag, run, usage_error  # noqa: E402

_PROG = "fuse.py"
_CONFIG = define_config_flag(_PROG, config_flags, flags)
_PARENTS = flags.DEFINE_list("parents", None, "Parent checkpoints (default: <workdir>/parents/parent_<k>).")
_FORMAT = flags.DEFINE_enum("format", "auto", ["auto", "ours", "torch"], "Format of --parents files.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <workdir>/fusion).")
_SAVE = flags.DEFINE_bool("save_fused", False, "Also save each fused model as a checkpoint in the output directory.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Print a status line before each step.")


def _barrier(members, spec, dataset, fusion_cfg, say):
    """Loss/accuracy along the line between two parents, before and after OT alignment (weights, exact).

    None for parents of different widths: no straight line joins them.
    """
    import otfusion_jax as otf  # pylint: disable=import-outside-toplevel
    from otfusion_jax import experiment  # pylint: disable=import-outside-toplevel

    a, b = members
    if a.module != b.module:
        return None
    if say:
        say("loss barrier between the two parents")
    x, y = dataset.x_test[:2000], dataset.y_test[:2000]
    cfg = dataclasses.replace(experiment.fusion_config_from(fusion_cfg, "weights"), solver="exact")
    aligned = otf.align_parents([a.variables, b.variables], spec, cfg)[0][0]
    return {
        "plain (no alignment)": experiment.interpolation_curve(b.module, a.variables, b.variables, x, y),
        "after OT alignment (weights, exact)": experiment.interpolation_curve(b.module, aligned, b.variables, x, y),
    }


def main(argv: list[str]) -> None:
    """Checks the config, loads and checks parents and data, fuses, prints the table, writes results."""
    if len(argv) > 1:
        usage_error(_PROG, f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    import jax  # pylint: disable=import-outside-toplevel

    import otfusion_jax as otf  # pylint: disable=import-outside-toplevel
    from otfusion_jax import checkpoints, configs_util, data, experiment, io_utils  # pylint: disable=import-outside-toplevel
    from otfusion_jax import parents as parents_lib  # pylint: disable=import-outside-toplevel

    given = _PARENTS.value
    try:
        config_dict = configs_util.validate(
            _CONFIG.value, num_parents=len(given) if given else None, model_from_config=not given
        )
    except ValueError as e:
        usage_error(_PROG, e)
    k_total = len(given) if given else config_dict["num_parents"]
    if k_total < 2:
        where = f"--parents gives {k_total} checkpoint" if given else f"config.num_parents={k_total}"
        usage_error(_PROG, f"{where}: fusion needs >= 2 parents")
    paths = given or [configs_util.parent_dir(config_dict, k) for k in range(k_total)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        usage_error(_PROG, f"parent checkpoint not found: {missing[0]} (train parents first: python train.py, same --config)")
    fusion_cfg = config_dict["fusion"]
    try:
        parents, spec, metas = parents_lib.load_parents(paths, _FORMAT.value)
        if given:
            overridden = [p.split(".", 1)[1] for p in config_flags.get_override_values(flags.FLAGS["config"]) if p.startswith("model.")]
            parents_lib.check_model_overrides(config_dict, overridden, metas)
            configs_util.check_fusion_for_model(
                fusion_cfg, metas[0]["model"]["name"], all(m["has_batchnorm"] for m in metas), f"checkpoint {metas[0]['path']}"
            )
        else:
            parents_lib.check_config_matches(config_dict, metas)
        dataset = configs_util.load_data(config_dict)
        for m in metas:
            model = m.get("model") or {}
            if tuple(model.get("input_shape") or ()) != tuple(dataset.input_shape) or model.get("num_classes") != dataset.num_classes:
                raise ValueError(
                    f"checkpoint {m['path']}: trained on inputs {tuple(model.get('input_shape') or ())} with "
                    f"{model.get('num_classes')} classes, but data {dataset.name} has {tuple(dataset.input_shape)} "
                    f"with {dataset.num_classes} classes (pick the config the parents were trained with)"
                )
        groups = configs_util.fusion_groups(fusion_cfg, len(parents))
    except (ImportError, ValueError, OSError, checkpoints.CheckpointError, data.DataSourceError) as e:
        usage_error(_PROG, e)
    finetune = None
    if fusion_cfg["finetune_epochs"] > 0:
        finetune = dataclasses.replace(
            configs_util.train_config_from(config_dict),
            epochs=int(fusion_cfg["finetune_epochs"]),
            lr=float(fusion_cfg["finetune_lr"] or config_dict["train"]["lr"]),
        )
    out_dir = _OUT.value or os.path.join(config_dict["workdir"], "fusion")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        usage_error(_PROG, f"cannot write to output directory {out_dir}: {e.strerror or e}")
    say = (lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)) if _PROGRESS.value else None
    architectures = " | ".join(dict.fromkeys(parents_lib.describe_model(m["model"]) for m in metas))
    source = (
        "architecture from the checkpoints (--parents): config.model, parent_widths, num_parents, parents_dir not used"
        if given
        else "architecture as config.model"
    )
    print(
        f"{len(parents)} parents ({architectures}; {source}), data {dataset.name}: {len(dataset.x_test)} test examples; "
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
