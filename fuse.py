r"""Fuses K trained parents and prints one table with every baseline and method.

Rows: each parent, the prediction ensemble (mean softmax), vanilla averaging
(plain weight mean), and each method of --config.experiment.method:
  ot-weights, ot-acts   OTFusion by weights / activations (":exact" or ":sinkhorn" overrides fusion.solver)
  recommended           the best method measured on held-out images, by architecture (README)
  cca                   CCA Merge: invertible linear maps of the neurons (config.cca)
  wm, wm-refine, wm-soft  weight matching (Git Re-Basin), from OTFusion's plans, with Sinkhorn plans
  learned               OTFusion with per-layer Sinkhorn epsilons fitted through Sinkhorn
  wm-many, ot-many, ot-acts-many  the iterative barycentre of many parents
with test accuracy, loss, loss barrier, fusion time and compile time (the first
call's extra time); "+ REPAIR" rows with --config.experiment.repair=True and
"+ fine-tune" rows with --config.experiment.finetune_epochs=N. One table per
--config.experiment.groups entry (e.g. "0,1" and "0,1,2,3"). Writes
<out>/results.md, PNG plots (accuracy, barrier, OT cost), optionally the fused
checkpoints, and <out>/results.json last, each atomically.

Config sections: config.fusion is OTFusion's options (otf.FusionConfig),
config.matching weight matching's (otf.WeightMatching, its own seed; the exact
solver is config.fusion.exact_backend), config.cca CCA Merge's (otf.CCAMerge),
config.experiment what this script
makes (methods, tables, REPAIR, fine-tuning, plots, averaging weights, target).

Compiled programs are kept in a persistent compilation cache
($OTFUSION_JAX_CACHE, default ~/.cache/otfusion-jax/jax; OTFUSION_JAX_CACHE=off
turns it off): a second run on the same shapes loads them instead of compiling,
except programs with host callbacks, which JAX does not cache (exact_backend
"host", what "auto" picks on a CPU: see README, "Compile time").

Parents come from <parents_dir>/parent_<k> (written by train.py; ready-made ones
in checkpoints/), or from --parents=PATH,PATH,... (our checkpoints, or the
original OTFusion's PyTorch checkpoints or torch.save'd timm ViT state dicts,
detected from their content or forced with --format=torch).

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
  python fuse.py --config.experiment.method=ot-weights,ot-acts:sinkhorn,wm --config.experiment.repair=True
  python fuse.py --config.experiment.method=wm --config.matching.restarts=16 --config.matching.seed=3
  python fuse.py --config=configs/fashion_mlpnet.py --config.experiment.num_samples=400
  python fuse.py --config=configs/fashion_mlpnet_experiment.py     # K=2, K=4, widths, fine-tuning
  python fuse.py --config=configs/fashion_vit.py --config.experiment.method=ot-acts,ot-acts:orthogonal
                                                    # ViTs: permutations vs the orthogonal symmetries
  python fuse.py --parents=model_0/final.checkpoint,model_1/final.checkpoint --config=configs/mnist_mlpnet.py

Any config field can be overridden with --config.<section>.<field>=<value>; an
unknown field is an error. See configs/default.py for every option.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `from configs import default`
from otfusion_jax.cli import CompileLog, define_config_flag, enable_compilation_cache, run, usage_error  # noqa: E402

_PROG = "fuse.py"
_CONFIG = define_config_flag(_PROG, config_flags, flags)
_PARENTS = flags.DEFINE_list("parents", None, "Parent checkpoints (default: <workdir>/parents/parent_<k>).")
_FORMAT = flags.DEFINE_enum("format", "auto", ["auto", "ours", "torch"], "Format of --parents files.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <workdir>/fusion).")
_SAVE = flags.DEFINE_bool(
    "save_fused", False,
    "Also save each fused model as a checkpoint in the output directory (fused_<method>_<solver>; a refitted one as"
    " fused_<method>_<solver>-refit; REPAIR'd models are not saved).",
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Print a status line before each step.")


def main(argv: list[str]) -> None:
    """Checks everything (runner.prepare_fuse), fuses (runner.run_fuse), prints the tables, writes the results."""
    if len(argv) > 1:
        usage_error(_PROG, f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    cache_dir = enable_compilation_cache()
    before = CompileLog.snapshot()
    from otfusion_jax import runner  # pylint: disable=import-outside-toplevel

    overridden = [p.split(".", 1)[1] for p in config_flags.get_override_values(flags.FLAGS["config"]) if p.startswith("model.")]
    try:
        job = runner.prepare_fuse(
            _CONFIG.value, parents=_PARENTS.value, fmt=_FORMAT.value, model_overrides=overridden, out=_OUT.value
        )
    except runner.ERRORS as e:
        usage_error(_PROG, e)
    say = (lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)) if _PROGRESS.value else None
    print(runner.describe_fuse(job))
    try:
        results = runner.run_fuse(job, progress=say, on_table=lambda t: print(f"\n{t.title}\n\n{t.markdown()}\n"))
    except ValueError as e:
        usage_error(_PROG, e)
    compilation = {"cache_dir": cache_dir, **CompileLog.since(before)}
    try:
        path = runner.write_fuse_results(
            job, results, save_fused=_SAVE.value, on_saved=lambda label, p: print(f"saved {label} to {p}"),
            compilation=compilation,
        )
    except runner.ERRORS as e:  # e.g. a --save_fused path that holds something other than a checkpoint
        usage_error(_PROG, e)
    print(
        f"compilation: {compilation['programs']} programs in {compilation['compile_seconds']:.1f} s, "
        f"{compilation['loaded']} loaded from the cache, {compilation['written']} written to it "
        f"({cache_dir or 'persistent cache off'})"
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    run(_PROG, main)
