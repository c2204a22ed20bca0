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
from otfusion_jax import engine, fusion, learned, matching, models, repair, training
from otfusion_jax import spec as spec_lib

__all__ = [
    "METHODS",
    "FUSION_FIELDS",
    "fusion_config_from",
    "averaging_weights_from",
    "parse_methods",
    "sample_inputs",
    "ensemble_metrics",
    "Parent",
    "run_fusion_table",
    "interpolation_curve",
    "repair_fused",
    "METHOD_HELP",
    "mean_costs",
    "format_table",
]

METHODS = ("ot-weights", "ot-acts", "wm", "wm-refine", "wm-soft", "learned", "vanilla", "ensemble")
METHOD_HELP = {
    "ot-weights": "OTFusion, costs between incoming weights",
    "ot-acts": "OTFusion, costs between activations on num_samples training inputs",
    "wm": "weight matching (Git Re-Basin): coordinate descent over all plans, Hungarian",
    "wm-refine": "weight matching started from OTFusion's exact weight plans",
    "wm-soft": "weight matching with Sinkhorn (soft) plans",
    "learned": "OTFusion by weights with per-layer Sinkhorn epsilons and mixing weights fitted by gradient descent",
}
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
    return fusion.FusionConfig(mode=mode, **kwargs)


def averaging_weights_from(fusion_cfg: Mapping[str, Any], k: int) -> tuple[float, ...] | None:
    """The averaging weights of ``fusion.weights`` / ``fusion.ensemble_step`` for K parents (None: 1/K).

    ``ensemble_step`` (two parents, the original's flag) takes precedence over ``weights``.
    """
    target = fusion_cfg.get("target", -1)
    if fusion_cfg.get("ensemble_step") is not None:
        return engine.ensemble_weights(fusion_cfg["ensemble_step"], k, target)
    weights = fusion_cfg.get("weights")
    if weights:
        if len(weights) != k:
            raise engine.FusionError(f"fusion.weights has {len(weights)} entries for {k} parents")
        return tuple(float(w) for w in weights)
    return None


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


def repair_fused(
    module: nn.Module,
    spec: spec_lib.AlignmentSpec,
    fused: Mapping[str, Any],
    aligned: Sequence[Mapping[str, Any]],
    x: np.ndarray,
    weights: Any = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """REPAIR a fused model (``weights``: the fusion's); a bias-free model without BatchNorm gets zero biases first.

    Returns:
      (the module to evaluate the result with, the repaired variables).
    """
    if "batch_stats" not in fused and any(ls.role == "weight" and not _has_bias(spec, p) for p, ls in spec.leaves):
        spec_b = spec_lib.with_biases(spec)
        module = module.clone(use_bias=True)
        fused = repair.add_zero_biases(fused, spec_b)
        aligned = [repair.add_zero_biases(a, spec_b) for a in aligned]
        spec = spec_b
    return module, repair.repair(module, fused, aligned, spec, jnp.asarray(x), weights=weights)


def _has_bias(spec: spec_lib.AlignmentSpec, kernel_path: str) -> bool:
    return kernel_path.rsplit("/", 1)[0] + "/bias" in spec.leaf_map


def interpolation_curve(
    module: nn.Module, a: Mapping[str, Any], b: Mapping[str, Any], x: np.ndarray, y: np.ndarray, num: int = 11
) -> dict[str, list[float]]:
    """Test loss and accuracy of (1 - t) a + t b for ``num`` values of t in [0, 1] (the barrier)."""
    ts = np.linspace(0.0, 1.0, num)
    losses, accs = [], []
    for t in ts:
        m = training.evaluate(module, engine.vanilla_average([a, b], [1.0 - t, t]), x, y)
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
    weights = averaging_weights_from(fusion_cfg, len(parents))
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
        avg, secs = _timed(lambda: finish(engine.vanilla_average([p.variables for p in parents], weights)))
        add("vanilla averaging", avg, seconds=secs)
    else:
        rows.append({"method": "vanilla averaging", "accuracy": None, "loss": None, "note": "parents differ in width"})

    fused_out: dict[str, dict[str, Any]] = {}
    variables = [p.variables for p in parents]
    use_repair = bool(fusion_cfg.get("repair", False))

    def record(label, method, solver, fused, align, secs, first, aux=None, **extra):
        """Adds the rows of one fused model; ``align()`` gives the aligned parents (REPAIR only)."""
        fused = finish(fused)
        add(label, fused, seconds=secs, compile_seconds=max(first - secs, 0.0), **extra)
        fused_out[label] = {"variables": fused, "aux": aux, "label": label, "method": method, "solver": solver}
        if use_repair:
            say(f"REPAIR of {label}")
            (module_r, repaired), rsecs = _timed(
                lambda: repair_fused(t_module, spec, fused, align(), samples, weights)
            )
            rows.append(
                {"method": f"{label} + REPAIR", **training.evaluate(module_r, repaired, x_test, y_test), "seconds": secs + rsecs}
            )

    def run_aligner(aligner, key=None):
        """(fused, aux, secs, first-call secs, align) of one aligner on the group's parents."""
        acts = None
        if aligner.needs_activations:
            kind = fusion_cfg.get("acts_kind", "pre")
            acts = [models.capture_activations(p.module, p.variables, jnp.asarray(samples), kind) for p in parents]

        def once():
            return engine.fuse(variables, spec, aligner, activations=acts, weights=weights, target=target, key=key)

        _, first = _timed(once)  # compiles
        (fused, aux), secs = _timed(once)

        def align():
            return engine.align_parents(variables, spec, aligner, activations=acts, target=target, key=key)[0]

        return fused, aux, secs, first, align

    backend = fusion_config_from(fusion_cfg, "weights").exact_backend
    for method, solver in [m for m in methods if m[0] not in ("vanilla", "ensemble")]:
        if method in ("ot-weights", "ot-acts"):
            mode = "weights" if method == "ot-weights" else "activations"
            cfg = fusion_config_from(fusion_cfg, mode)
            if solver is not None:
                cfg = dataclasses.replace(cfg, solver=solver)
            say(f"OT fusion by {mode} ({cfg.solver})")
            fused, aux, secs, first, align = run_aligner(cfg)
            threshold = cfg.sinkhorn_threshold if cfg.solver == "sinkhorn" else None
            messages = engine.warn_unconverged(aux, threshold, config=cfg)
            record(
                f"OT fusion ({mode}, {cfg.solver})", method, cfg.solver, fused, align, secs, first, aux,
                warnings=messages, ot_cost=mean_costs(aux),
            )
        elif method.startswith("wm"):
            say(f"weight matching ({method})")
            wm = matching.WeightMatching(soft=method == "wm-soft", backend=backend)
            if method == "wm-refine":
                first_cfg = dataclasses.replace(fusion_config_from(fusion_cfg, "weights"), solver="exact")
                wm = matching.Refine(first_cfg, wm)
            fused, _, secs, first, align = run_aligner(wm, key=int(fusion_cfg.get("sample_seed", 0)))
            label = {"wm": "weight matching", "wm-refine": "weight matching from OTFusion plans", "wm-soft": "soft weight matching"}[method]
            record(label, method, "exact" if method != "wm-soft" else "sinkhorn", fused, align, secs, first)
        elif method == "learned":
            cfg = dataclasses.replace(fusion_config_from(fusion_cfg, "weights"), solver="sinkhorn", implicit_diff=False)
            steps = int(fusion_cfg.get("learn_steps", 60))
            learn_weights = bool(fusion_cfg.get("learn_weights", False))
            say(f"learned fusion ({steps} Adam steps through Sinkhorn)")
            (fused, aux), secs = _timed(
                lambda: learned.learn_fusion(
                    t_module, variables, spec, cfg, dataset.x_train, dataset.y_train,
                    learned.LearnConfig(steps=steps, learn_weights=learn_weights), target=target,
                )
            )
            report = next(s for s in aux.stats if s is not None)
            params, hist = report.params, report.history
            eps = {p: float(jnp.exp(v)) for p, v in params["log_eps"].items()}

            def align(params=params):
                return learned.aligned_from_params(params, variables, spec, cfg, target=target)[0]

            what = "Sinkhorn eps + layer weights" if learn_weights else "Sinkhorn eps"
            record(f"learned fusion ({what})", method, "sinkhorn", fused, align, secs, secs,
                   learned_epsilon=eps, learn_loss=[hist[0], hist[-1]],
                   learned_weights={p: np.asarray(jax.nn.softmax(v)).tolist() for p, v in params["logits"].items()})
    return rows, fused_out


def mean_costs(aux: engine.FusionAux) -> dict[str, float]:
    """Per plan, the transport cost averaged over the non-target parents."""
    infos = [info for info in aux.info if info is not None]
    return {name: float(np.mean([float(info[name].cost) for info in infos])) for name in infos[0]}


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table: method, test accuracy (%), test loss, loss barrier, time (s).

    The loss barrier of a fused model (the midpoint of its parents, once
    aligned) is its test loss minus the parents' mean test loss.
    """

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    parent_losses = [r["loss"] for r in rows if r["method"].startswith("parent") and r.get("loss") is not None]
    base = float(np.mean(parent_losses)) if parent_losses else None
    lines = [
        "| method | test accuracy (%) | test loss | loss barrier | fusion time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        acc = None if r.get("accuracy") is None else 100 * r["accuracy"]
        secs = r.get("seconds")
        fused_row = not r["method"].startswith(("parent", "ensemble")) and "fine-tune" not in r["method"]
        barrier = r["loss"] - base if fused_row and base is not None and r.get("loss") is not None else None
        lines.append(
            f"| {r['method']} | {fmt(acc, '.2f')} | {fmt(r.get('loss'), '.4f')} | "
            f"{'' if barrier is None else format(barrier, '.4f')} | {'' if secs is None else format(secs, '.3f')} |"
        )
    return "\n".join(lines)
