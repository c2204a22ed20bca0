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


def parse_methods(method: str | Sequence[str]) -> list[str]:
    """``"ot-weights,ot-acts"`` -> ["ot-weights", "ot-acts"]; checks each name."""
    items = [m.strip() for m in (method.split(",") if isinstance(method, str) else method) if m.strip()]
    bad = [m for m in items if m not in METHODS]
    if bad or not items:
        raise ValueError(f"fusion.method: unknown {bad or method!r}; choose from {', '.join(METHODS)}")
    return items


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


def run_fusion_table(
    parents: Sequence[Parent],
    spec: spec_lib.AlignmentSpec,
    dataset: data_lib.Dataset,
    fusion_cfg: Mapping[str, Any],
    *,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Evaluates every parent, the baselines and each OT fusion method on the test set.

    Args:
      parents: K parents; the fused model takes the architecture of parent
        ``fusion_cfg["target"]`` (default the last).
      spec: their alignment spec.
      dataset: test data for evaluation, train data for samples.
      fusion_cfg: the config's ``fusion`` section: ``method`` (comma list of
        METHODS), FusionConfig fields, ``num_samples``, ``acts_kind``,
        ``sample_seed``, ``bn_stats`` ("align" | "recompute").
      progress: called with a short status line before each step.

    Returns:
      (rows, fused) where rows are ``{"method", "accuracy", "loss", "seconds",
      "compile_seconds", ...}`` dicts in table order and ``fused`` maps an OT
      method to ``{"variables", "aux"}``.
    """
    say = progress or (lambda _msg: None)
    methods = parse_methods(fusion_cfg.get("method", "ot-weights"))
    x_test, y_test = dataset.x_test, dataset.y_test
    target = fusion_cfg.get("target", -1) % len(parents)
    t_module = parents[target].module
    samples = sample_inputs(dataset.x_train, fusion_cfg.get("num_samples", 200), fusion_cfg.get("sample_seed", 0))
    recompute_bn = fusion_cfg.get("bn_stats", "align") == "recompute"
    if fusion_cfg.get("bn_stats", "align") not in ("align", "recompute"):
        raise ValueError(f"fusion.bn_stats must be 'align' or 'recompute', got {fusion_cfg['bn_stats']!r}")

    def finish(variables):
        return models.recompute_batch_stats(t_module, variables, samples) if recompute_bn else variables

    rows: list[dict[str, Any]] = []
    for p in parents:
        say(f"evaluating {p.name}")
        rows.append({"method": p.name, **training.evaluate(p.module, p.variables, x_test, y_test)})
    # Every table shows the parents and both baselines ("vanilla"/"ensemble" in
    # fusion.method are accepted for clarity; they change nothing).
    say("evaluating the prediction ensemble")
    rows.append({"method": "ensemble (mean softmax)", **ensemble_metrics(parents, x_test, y_test)})
    shapes = {jax.tree_util.tree_structure(p.variables) for p in parents}
    same = len(shapes) == 1 and all(
        jax.tree_util.tree_map(jnp.shape, p.variables) == jax.tree_util.tree_map(jnp.shape, parents[0].variables)
        for p in parents
    )
    say("vanilla averaging")
    if same:
        avg, secs = _timed(lambda: finish(fusion.vanilla_average([p.variables for p in parents])))
        rows.append({"method": "vanilla averaging", **training.evaluate(t_module, avg, x_test, y_test), "seconds": secs})
    else:
        rows.append({"method": "vanilla averaging", "accuracy": None, "loss": None, "note": "parents differ in width"})

    fused_out: dict[str, dict[str, Any]] = {}
    for method in [m for m in methods if m.startswith("ot-")]:
        mode = "weights" if method == "ot-weights" else "activations"
        cfg = fusion_config_from(fusion_cfg, mode)
        say(f"OT fusion by {mode} ({cfg.solver})")
        variables = [p.variables for p in parents]

        def run_once():
            acts = None
            if mode == "activations":
                acts = [
                    models.capture_activations(p.module, p.variables, jnp.asarray(samples), fusion_cfg.get("acts_kind", "pre"))
                    for p in parents
                ]
            return fusion.fuse(variables, spec, cfg, activations=acts)

        _, first = _timed(run_once)  # compiles
        (fused, aux), secs = _timed(run_once)
        messages = fusion.warn_unconverged(aux, cfg.sinkhorn_threshold) if cfg.solver == "sinkhorn" else []
        fused = finish(fused)
        label = f"OT fusion ({mode}, {cfg.solver})"
        rows.append(
            {
                "method": label,
                **training.evaluate(t_module, fused, x_test, y_test),
                "seconds": secs,
                "compile_seconds": max(first - secs, 0.0),
                "warnings": messages,
                "ot_cost": _mean_costs(aux),
            }
        )
        fused_out[method] = {"variables": fused, "aux": aux, "label": label}
    return rows, fused_out


def _mean_costs(aux: fusion.FusionAux) -> dict[str, float]:
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
