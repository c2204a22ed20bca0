"""The fusion experiment behind ``fuse.py``: parents, baselines and OT fusion in one table.

Library code (no printing, no files): ``fuse.py`` loads parents and data,
calls :func:`run_fusion_table` and writes what it returns.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from otfusion_jax import data as data_lib
from otfusion_jax import fusion, models, training
from otfusion_jax import spec as spec_lib

__all__ = [
    "METHODS",
    "FUSION_FIELDS",
    "fusion_config_from",
    "parse_methods",
    "sample_inputs",
    "ensemble_metrics",
    "Parent",
    "run_fusion_table",
    "interpolation_curve",
    "mean_costs",
    "format_table",
]

METHODS = ("ot-weights", "ot-acts", "vanilla", "ensemble")
FUSION_FIELDS = tuple(f.name for f in dataclasses.fields(fusion.FusionConfig))


@dataclasses.dataclass
class Parent:
    """One parent model: its module (own widths), variables and a display name."""

    name: str
    module: nn.Module
    variables: dict[str, Any]


def fusion_config_from(fusion_cfg: Mapping[str, Any], mode: str) -> fusion.FusionConfig:
    """The FusionConfig for ``mode`` from a config's ``fusion`` section (unknown keys ignored here)."""
    kwargs = {k: fusion_cfg[k] for k in FUSION_FIELDS if k in fusion_cfg and k != "mode"}
    if kwargs.get("weights") is not None:
        kwargs["weights"] = tuple(kwargs["weights"]) or None
    return fusion.FusionConfig(mode=mode, **kwargs)


def parse_methods(method: str | Sequence[str]) -> list[tuple[str, str | None]]:
    """``"ot-weights,ot-acts:sinkhorn"`` -> [("ot-weights", None), ("ot-acts", "sinkhorn")].

    A ``:exact`` / ``:sinkhorn`` suffix overrides ``fusion.solver`` for that method.
    """
    items = [m.strip() for m in (method.split(",") if isinstance(method, str) else method) if m.strip()]
    out = []
    for item in items:
        name, _, solver = item.partition(":")
        if name not in METHODS or (solver and solver not in ("exact", "sinkhorn")):
            raise ValueError(
                f"fusion.method: unknown {item!r}; choose from {', '.join(METHODS)} "
                "(OT methods may end in :exact or :sinkhorn)"
            )
        out.append((name, solver or None))
    if not out:
        raise ValueError("fusion.method is empty")
    return out


def sample_inputs(x: np.ndarray, num: int, seed: int) -> np.ndarray:
    """``num`` training inputs drawn without replacement (the activation / BatchNorm samples)."""
    num = min(int(num), len(x))
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=num, replace=False))
    return x[idx]


def ensemble_metrics(parents: Sequence[Parent], x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Prediction ensemble: the mean of the parents' softmax outputs."""
    probs = np.mean([jax.nn.softmax(training.predict_logits(p.module, p.variables, x), axis=-1) for p in parents], 0)
    nll = -np.mean(np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12)))
    return {"loss": float(nll), "accuracy": float(np.mean(np.argmax(probs, -1) == y))}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def interpolation_curve(
    module: nn.Module, a: Mapping[str, Any], b: Mapping[str, Any], x: np.ndarray, y: np.ndarray, num: int = 11
) -> dict[str, list[float]]:
    """Test loss and accuracy of (1 - t) a + t b for ``num`` values of t in [0, 1] (the barrier)."""
    ts = np.linspace(0.0, 1.0, num)
    losses, accs = [], []
    for t in ts:
        m = training.evaluate(module, fusion.vanilla_average([a, b], [1.0 - t, t]), x, y)
        losses.append(m["loss"])
        accs.append(m["accuracy"])
    return {"t": ts.tolist(), "loss": losses, "accuracy": accs}


def run_fusion_table(
    parents: Sequence[Parent],
    spec: spec_lib.AlignmentSpec,
    dataset: data_lib.Dataset,
    fusion_cfg: Mapping[str, Any],
    *,
    finetune: training.TrainConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Evaluates every parent, the baselines and each OT fusion method on the test set.

    Args:
      parents: K parents; the fused model takes the architecture of parent
        ``fusion_cfg["target"]`` (default the last).
      spec: their alignment spec.
      dataset: test data for evaluation, train data for samples and fine-tuning.
      fusion_cfg: the config's ``fusion`` section: ``method`` (comma list of
        METHODS, OT methods optionally suffixed ``:exact``/``:sinkhorn``),
        FusionConfig fields, ``num_samples``, ``acts_kind``, ``sample_seed``,
        ``bn_stats`` ("align" | "recompute").
      finetune: if given (epochs > 0), vanilla averaging and each OT fusion are
        also fine-tuned with it and evaluated again ("+ fine-tune" rows).
      progress: called with a short status line before each step.

    Returns:
      (rows, fused) where rows are ``{"method", "accuracy", "loss", "seconds",
      "compile_seconds", ...}`` dicts in table order and ``fused`` maps each OT
      method label to ``{"variables", "aux", "label"}``.
    """
    say = progress or (lambda _msg: None)
    methods = parse_methods(fusion_cfg.get("method", "ot-weights"))
    bn_stats = fusion_cfg.get("bn_stats", "align")
    if bn_stats not in ("align", "recompute"):
        raise ValueError(f"fusion.bn_stats must be 'align' or 'recompute', got {bn_stats!r}")
    x_test, y_test = dataset.x_test, dataset.y_test
    target = fusion_cfg.get("target", -1) % len(parents)
    t_module = parents[target].module
    samples = sample_inputs(dataset.x_train, fusion_cfg.get("num_samples", 200), fusion_cfg.get("sample_seed", 0))

    def finish(variables):
        return models.recompute_batch_stats(t_module, variables, samples) if bn_stats == "recompute" else variables

    rows: list[dict[str, Any]] = []

    def add(label, variables, **extra):
        rows.append({"method": label, **training.evaluate(t_module, variables, x_test, y_test), **extra})
        if finetune is not None and finetune.epochs > 0:
            say(f"fine-tuning {label} for {finetune.epochs} epoch(s)")
            tuned, secs = _timed(lambda: training.train(t_module, variables, dataset, finetune, progress=False)[0])
            rows.append(
                {
                    "method": f"{label} + fine-tune ({finetune.epochs} ep)",
                    **training.evaluate(t_module, tuned, x_test, y_test),
                    "finetune_seconds": secs,
                }
            )

    for p in parents:
        say(f"evaluating {p.name}")
        rows.append({"method": p.name, **training.evaluate(p.module, p.variables, x_test, y_test)})
    # Every table shows the parents and both baselines ("vanilla"/"ensemble" in
    # fusion.method are accepted for clarity; they change nothing).
    say("evaluating the prediction ensemble")
    rows.append({"method": "ensemble (mean softmax)", **ensemble_metrics(parents, x_test, y_test)})
    shapes = [jax.tree_util.tree_map(jnp.shape, p.variables) for p in parents]
    say("vanilla averaging")
    if all(s == shapes[0] for s in shapes):
        avg, secs = _timed(lambda: finish(fusion.vanilla_average([p.variables for p in parents])))
        add("vanilla averaging", avg, seconds=secs)
    else:
        rows.append({"method": "vanilla averaging", "accuracy": None, "loss": None, "note": "parents differ in width"})

    fused_out: dict[str, dict[str, Any]] = {}
    for method, solver in [m for m in methods if m[0].startswith("ot-")]:
        mode = "weights" if method == "ot-weights" else "activations"
        cfg = fusion_config_from(fusion_cfg, mode)
        if solver is not None:
            cfg = dataclasses.replace(cfg, solver=solver)
        say(f"OT fusion by {mode} ({cfg.solver})")
        variables = [p.variables for p in parents]

        def run_once():
            acts = None
            if mode == "activations":
                kind = fusion_cfg.get("acts_kind", "pre")
                acts = [models.capture_activations(p.module, p.variables, jnp.asarray(samples), kind) for p in parents]
            return fusion.fuse(variables, spec, cfg, activations=acts)

        _, first = _timed(run_once)  # compiles
        (fused, aux), secs = _timed(run_once)
        messages = fusion.warn_unconverged(aux, cfg.sinkhorn_threshold) if cfg.solver == "sinkhorn" else []
        fused = finish(fused)
        label = f"OT fusion ({mode}, {cfg.solver})"
        add(
            label,
            fused,
            seconds=secs,
            compile_seconds=max(first - secs, 0.0),
            warnings=messages,
            ot_cost=mean_costs(aux),
        )
        fused_out[label] = {"variables": fused, "aux": aux, "label": label, "method": method, "solver": cfg.solver}
    return rows, fused_out


def mean_costs(aux: fusion.FusionAux) -> dict[str, float]:
    """Per plan, the transport cost averaged over the non-target parents."""
    infos = [info for info in aux.info if info is not None]
    return {name: float(np.mean([float(info[name].cost) for info in infos])) for name in infos[0]}


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table: method, test accuracy (%), test loss, time (s)."""

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = ["| method | test accuracy (%) | test loss | fusion time (s) |", "|---|---:|---:|---:|"]
    for r in rows:
        acc = None if r.get("accuracy") is None else 100 * r["accuracy"]
        secs = r.get("seconds")
        lines.append(
            f"| {r['method']} | {fmt(acc, '.2f')} | {fmt(r.get('loss'), '.4f')} | "
            f"{'' if secs is None else format(secs, '.3f')} |"
        )
    return "\n".join(lines)
