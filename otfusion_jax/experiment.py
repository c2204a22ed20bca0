"""The fusion experiment behind ``fuse.py``: parents, baselines and every fusion method in one table per group.

Library code (no printing, no files; progress goes to a callback). Typed options in, results out:

>>> settings = experiment.Settings(experiment.ExperimentConfig(method="ot-weights,wm", repair=True))
>>> results = experiment.run(parents, spec, dataset, settings)
>>> print(results.tables[0].markdown())

:class:`ExperimentConfig` holds the driver's options (``config.experiment``); :class:`Settings` bundles it with the
OTFusion options (``fusion.FusionConfig``, ``config.fusion``), weight matching's (``matching.WeightMatching`` and its
seed, ``config.matching``) and the parents' training recipe (fine-tuning starts from it).
``configs_util.settings_from`` builds a :class:`Settings` from a config. ``otfusion_jax.runner`` loads parents and
writes what :func:`run` returns.

Methods are rows of :data:`METHODS` (name -> :class:`Method`): adding one is one entry whose ``fuse`` function
receives the table's :class:`Group` (parents, spec, samples, settings and helpers such as :meth:`Group.run_aligner`)
and returns a :class:`Outcome`; the table rows, REPAIR, fine-tuning and timing are shared.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from otfusion_jax import cca as cca_lib
from otfusion_jax import refit as refit_lib
from otfusion_jax import data as data_lib
from otfusion_jax import engine, learned, models, repair, training
from otfusion_jax import fusion as fusion_lib
from otfusion_jax import matching as matching_lib
from otfusion_jax import plans as plans_lib
from otfusion_jax import spec as spec_lib

__all__ = [
    "ExperimentConfig",
    "Settings",
    "Method",
    "METHODS",
    "METHOD_HELP",
    "Group",
    "Outcome",
    "Fused",
    "Table",
    "Results",
    "parse_methods",
    "averaging_weights",
    "sample_inputs",
    "ensemble_metrics",
    "Parent",
    "run_fusion_table",
    "run",
    "table_title",
    "barrier_curves",
    "interpolation_curve",
    "repair_fused",
    "mean_costs",
    "format_table",
    "TrainLossRanked",
    "RankedInfo",
]

BN_STATS = ("align", "recompute")
WM_RANKS = ("train_loss", "objective")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The experiment driver's options (``config.experiment``): what :func:`run` makes, not how plans are solved.

    Attributes:
      method: comma list of :data:`METHODS` names; methods with solvers (``ot-weights``, ``ot-acts``) may end in
        ``:exact`` or ``:sinkhorn``, overriding ``FusionConfig.solver`` for that method.
      repair: also REPAIR each fused model (its "+ REPAIR" rows).
      repair_output: REPAIR corrects the class layer's logits too (``repair.repair(include_output=True)``): each
        logit's mean and std on the samples become the parents' interpolated ones. Off by default, as in Jordan
        et al. (hidden units only).
      refit: also refit each fused model by least squares (its "+ refit" rows; ``refit.refit``, options in
        ``Settings.refit``): every layer regressed onto the parents' pre-activations moved by the plans.
      learn_steps: "learned": Adam steps through Sinkhorn.
      learn_weights: "learned": also fit per-layer mixing weights.
      num_samples: training samples for activations, BatchNorm recomputation and REPAIR (>= 1).
      acts_kind: activations before ("pre") or after ("post") the ReLU (``models.ACT_COLLECTIONS``).
      sample_seed: which training samples.
      bn_stats: "align" (BatchNorm statistics follow the plans) or "recompute" (on the samples, after fusion).
      groups: tables to make, each a comma list of parent indices ("0,1"); (): one table with every parent.
      finetune_epochs: fine-tune each fused model (and vanilla averaging) for this many epochs ("+ fine-tune" rows).
      finetune_lr: fine-tuning learning rate; None: the parents' (``Settings.train.lr``).
      finetune_distill: weight in [0, 1] of distillation from the group's parents in the fine-tune (the mean of
        their softmax at ``finetune_temperature`` on the training images as soft targets, ``training.TrainConfig
        .distill``); 0: labels only. The same for every fine-tuned row, vanilla averaging included.
      finetune_temperature: the distillation's temperature.
      plots: PNG plots next to results.json (read by the writer, ``runner``).
      weights: per-parent averaging weights (None: 1/K), normalised by ``engine.fuse``.
      ensemble_step: two parents: the target's weight s (the original's ``--ensemble-step``); beats ``weights``.
      target: index (in each group) of the parent whose widths and neuron order the fused model takes.
      many_method: a :data:`METHODS` name added to every table of more than two parents unless listed already
        (default "recommended": for more than two MLPs or conv nets its branch is the best many-parent method
        measured on held-out data, docs/RESULTS.md; for transformers it is the one-shot orthogonal alignment);
        "" adds none.
      barycenter_iterations: "wm-many" / "ot-many" / "ot-acts-many": at most this many rounds of the iterative barycentre.
      wm_rank: how weight matching picks among its restarts (``config.matching.restarts``): "train_loss" (the
        loss of the parent's restart averaged with the target, on ``rank_samples`` training images: training
        data, never the test set) or "objective" (the matching objective, the library's own choice).
      rank_samples: "train_loss": how many training images (drawn with ``sample_seed``).
    """

    method: str = "ot-weights,ot-acts,recommended"
    repair: bool = False
    repair_output: bool = False
    refit: bool = False
    learn_steps: int = 60
    learn_weights: bool = False
    num_samples: int = 200
    acts_kind: str = "pre"
    sample_seed: int = 0
    bn_stats: str = "align"
    groups: tuple[str, ...] = ()
    finetune_epochs: int = 0
    finetune_lr: float | None = None
    finetune_distill: float = 0.0
    finetune_temperature: float = 1.0
    plots: bool = True
    weights: tuple[float, ...] | None = None
    ensemble_step: float | None = None
    target: int = -1
    many_method: str = "recommended"
    barycenter_iterations: int = 10
    wm_rank: str = "train_loss"
    rank_samples: int = 2000

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(self.groups))
        if self.many_method:
            parse_methods(self.many_method, "experiment.many_method")
        if self.wm_rank not in WM_RANKS:
            raise ValueError(f"experiment.wm_rank must be one of {WM_RANKS}, got {self.wm_rank!r}")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        parse_methods(self.method)
        if self.bn_stats not in BN_STATS:
            raise ValueError(f"experiment.bn_stats must be one of {BN_STATS}, got {self.bn_stats!r}")
        if self.acts_kind not in models.ACT_COLLECTIONS:
            raise ValueError(
                f"experiment.acts_kind must be one of {tuple(models.ACT_COLLECTIONS)}, got {self.acts_kind!r}"
            )

    @property
    def methods(self) -> list[tuple[str, str | None]]:
        """``method`` parsed: ``[(name, solver or None), ...]``."""
        return parse_methods(self.method)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything :func:`run_fusion_table` needs besides parents and data, typed and frozen.

    Attributes:
      experiment: the driver's options.
      fusion: OTFusion's options (``mode`` is set per method: ot-weights / ot-acts).
      matching: weight matching's options for the ``wm*`` methods (``soft`` is set per method; its ``backend``
        is taken as given: ``configs_util.settings_from`` passes ``config.fusion.exact_backend``).
      matching_seed: weight matching's key (restart r uses ``fold_in(key, r)``).
      cca: CCA Merge's options (the ``cca`` method).
      refit: the least-squares refit's options ("+ refit" rows).
      train: the parents' training recipe; fine-tuning is this with ``experiment.finetune_epochs`` epochs,
        ``experiment.finetune_lr``, ``experiment.finetune_distill`` / ``finetune_temperature`` and the warm-up
        scaled to the same share of the run (None: TrainConfig's defaults).
    """

    experiment: ExperimentConfig = dataclasses.field(default_factory=lambda: ExperimentConfig())
    fusion: fusion_lib.FusionConfig = dataclasses.field(default_factory=fusion_lib.FusionConfig)
    matching: matching_lib.WeightMatching = dataclasses.field(default_factory=matching_lib.WeightMatching)
    matching_seed: int = 0
    cca: cca_lib.CCAMerge = dataclasses.field(default_factory=cca_lib.CCAMerge)
    refit: refit_lib.RefitConfig = dataclasses.field(default_factory=refit_lib.RefitConfig)
    train: training.TrainConfig | None = None

    @property
    def finetune(self) -> training.TrainConfig | None:
        """The fine-tuning recipe, or None when ``experiment.finetune_epochs`` is 0."""
        exp = self.experiment
        if exp.finetune_epochs <= 0:
            return None
        base = self.train or training.TrainConfig()
        epochs = int(exp.finetune_epochs)
        # The warm-up keeps its share of the run: 2 of 20 epochs stay a tenth of a 2-epoch fine-tune.
        warmup = base.warmup_epochs * epochs / base.epochs if base.epochs else 0.0
        return dataclasses.replace(
            base, epochs=epochs, lr=float(exp.finetune_lr or base.lr), warmup_epochs=warmup,
            distill=float(exp.finetune_distill), distill_temperature=float(exp.finetune_temperature),
        )


@dataclasses.dataclass(frozen=True)
class Parent:
    """One parent model: its module (own widths), variables and a display name."""

    name: str
    module: nn.Module
    variables: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a method's ``fuse`` function returns: one fused model and how it was made.

    Attributes:
      label: the table row's name, e.g. "OT fusion (weights, exact)".
      solver: "exact" or "sinkhorn" (checkpoint names: ``fused_<method>_<solver>``).
      variables: the fused variables (before BatchNorm recomputation).
      aux: the ``engine.FusionAux`` (None where there are no OT costs to plot).
      seconds: fusion wall time, compiled.
      compile_seconds: extra time of the first call (compilation, or loading from the persistent cache).
      align: returns the parents aligned onto the target (REPAIR's input); called only with ``repair``.
      extra: more row fields (warnings, OT costs, learned parameters).
      repair: the method includes REPAIR: its "+ REPAIR" row is made even without ``experiment.repair``
        (where the model allows REPAIR; otherwise the row says why not).
      repair_output: its REPAIR corrects the logits too, whatever ``experiment.repair_output``.
      repair_targets: REPAIR's target statistics on given samples (``repair.moved_target_stats``) instead of
        the aligned parents' (``align``); for plans that are not permutations (CCA Merge).
      plans: per parent, its plans onto the target (``engine.FusionAux.plans``; None for the target): what the
        least-squares refit regresses onto. None: the method has no plans (its "+ refit" row says so).
      refit: the method includes the least-squares refit: its "+ refit" row is made even without
        ``experiment.refit`` (where the model allows it; otherwise the row says why not).
    """

    label: str
    solver: str
    variables: dict[str, Any]
    aux: engine.FusionAux | None
    seconds: float
    compile_seconds: float
    align: Callable[[], Sequence[Mapping[str, Any]]]
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    repair: bool = False
    repair_output: bool = False
    repair_targets: Callable[[np.ndarray], Mapping[str, Any]] | None = None
    plans: Sequence[Mapping[str, Any] | None] | None = None
    refit: bool = False


@dataclasses.dataclass(frozen=True)
class Fused:
    """A fused model of a table: its row label, method name (``METHODS`` key), solver, variables and aux."""

    label: str
    method: str
    solver: str
    variables: dict[str, Any]
    aux: engine.FusionAux | None


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


@dataclasses.dataclass
class Group:
    """One table's parents and everything a method needs to fuse them (built by :func:`run_fusion_table`).

    Attributes:
      parents: the group's parents; ``variables``: their variable dicts.
      spec: their alignment spec.
      dataset: train data (samples, learned fusion), test data.
      settings: the run's options.
      target: index of the target parent in ``parents``.
      weights: the averaging weights (None: 1/K).
      samples: ``experiment.num_samples`` training inputs (activations, BatchNorm, REPAIR).
      say: the progress callback.
    """

    parents: Sequence[Parent]
    spec: spec_lib.AlignmentSpec
    dataset: data_lib.Dataset
    settings: Settings
    target: int
    weights: tuple[float, ...] | None
    samples: np.ndarray
    say: Callable[[str], None]
    _acts: dict[tuple[str, int | None], list[Any]] = dataclasses.field(default_factory=dict)

    @property
    def variables(self) -> list[dict[str, Any]]:
        """The parents' variable dicts, in order."""
        return [p.variables for p in self.parents]

    @property
    def target_module(self) -> nn.Module:
        """The target parent's module: the fused model's architecture."""
        return self.parents[self.target].module

    def activations(self, kind: str | None = None, num: int | None = None) -> list[Any]:
        """Every parent's activations, captured once per group, kind (None: ``experiment.acts_kind``) and number of
        samples (None: the group's ``samples``; else ``num`` training inputs drawn with ``experiment.sample_seed``)."""
        exp = self.settings.experiment
        kind = kind or exp.acts_kind
        num = None if num == len(self.samples) else num
        if (kind, num) not in self._acts:
            x = self.samples if num is None else sample_inputs(self.dataset.x_train, num, exp.sample_seed)
            x = jnp.asarray(x)
            self._acts[kind, num] = [models.capture_activations(p.module, p.variables, x, kind) for p in self.parents]
        return self._acts[kind, num]

    def rank_data(self) -> dict[str, jax.Array]:
        """``experiment.rank_samples`` training images and labels (not the activation / REPAIR samples)."""
        exp = self.settings.experiment
        x_train, y_train = self.dataset.x_train, self.dataset.y_train
        rng = np.random.default_rng(exp.sample_seed + 1)
        idx = np.sort(rng.choice(len(x_train), size=min(exp.rank_samples, len(x_train)), replace=False))
        return {"x": jnp.asarray(x_train[idx]), "y": jnp.asarray(y_train[idx])}

    def run_aligner(
        self,
        aligner: Any,
        label: str,
        solver: str,
        *,
        key: Any = None,
        extra: Mapping[str, Any] | Callable[[engine.FusionAux], Mapping[str, Any]] | None = None,
        acts_kind: str | None = None,
        num_samples: int | None = None,
        **fuse_options: Any,
    ) -> Outcome:
        """Fuses the group with ``engine.fuse`` and ``aligner``: timed twice (compile, then compiled).

        Args:
          aligner: any aligner (``engine.Aligner``).
          label: the row's name.
          solver: "exact" or "sinkhorn" (the fused checkpoint's name).
          key: the aligner's key (weight matching's sweep orders).
          extra: more row fields, or a function of the fusion's aux returning them.
          acts_kind: the activations the aligner gets, "pre" or "post" (None: ``experiment.acts_kind``).
          num_samples: on how many training inputs (None: the group's ``samples``).
          **fuse_options: more keyword arguments of ``engine.fuse`` and ``engine.align_parents``
            (e.g. ``iterations=`` for the iterative barycentre).
        """
        acts = self.activations(acts_kind, num_samples) if aligner.needs_activations else None
        variables, weights, target = self.variables, self.weights, self.target

        def once():
            return engine.fuse(
                variables, self.spec, aligner, activations=acts, weights=weights, target=target, key=key, **fuse_options
            )

        _, first = _timed(once)  # compiles (or loads from the persistent compilation cache)
        (fused, aux), secs = _timed(once)

        def align():
            return engine.align_parents(
                variables, self.spec, aligner, activations=acts, weights=weights, target=target, key=key,
                **fuse_options,
            )[0]

        more = dict(extra(aux) if callable(extra) else (extra or {}))
        return Outcome(label, solver, fused, aux, secs, max(first - secs, 0.0), align, more, plans=aux.plans)


@dataclasses.dataclass(frozen=True)
class Method:
    """One fusion method of the table (a row of :data:`METHODS`).

    Attributes:
      help: one line for ``--help`` and the README.
      fuse: ``fuse(group, solver)`` -> :class:`Outcome`; ``solver`` is the method string's ``:exact`` /
        ``:sinkhorn`` suffix or None. None: a baseline every table shows anyway ("vanilla", "ensemble").
      solvers: the suffixes the method accepts (empty: none).
    """

    help: str
    fuse: Callable[[Group, str | None], Outcome] | None = None
    solvers: tuple[str, ...] = ()


def _orthogonal(base: fusion_lib.FusionConfig, mode: str) -> fusion_lib.FusionConfig:
    """``base`` aligning transformers by rotations (``FusionConfig.symmetry``): exact head maps, one stream plan."""
    return dataclasses.replace(base, mode=mode, solver="exact", symmetry="orthogonal", stream_policy="shared")


def _run_ot(group: Group, cfg: fusion_lib.FusionConfig, label: str) -> Outcome:
    """One OTFusion row: ``cfg`` run on the group, with its unconverged-solver warnings and per-plan OT costs."""
    group.say(label)
    threshold = cfg.sinkhorn_threshold if cfg.solver == "sinkhorn" else None

    def extra(aux):
        return {"warnings": engine.warn_unconverged(aux, threshold, config=cfg), "ot_cost": mean_costs(aux)}

    return group.run_aligner(cfg, label, cfg.solver, extra=extra)


def _ot_method(mode: str) -> Callable[[Group, str | None], Outcome]:
    def fuse_ot(group: Group, solver: str | None) -> Outcome:
        base = group.settings.fusion
        if solver == "orthogonal":  # transformers: rotations of the stream and within heads
            return _run_ot(group, _orthogonal(base, mode), f"OT fusion ({mode}, orthogonal)")
        cfg = dataclasses.replace(base, mode=mode, solver=solver or base.solver)
        return _run_ot(group, cfg, f"OT fusion ({mode}, {cfg.solver})")

    return fuse_ot


def _wm_method(
    name: str, label: str, *, soft: bool = False, refine: bool = False
) -> Callable[[Group, str | None], Outcome]:
    def fuse_wm(group: Group, solver: str | None) -> Outcome:
        del solver  # weight matching takes no suffix (parse_methods refuses one)
        s = group.settings
        group.say(f"weight matching ({name})")
        aligner: Any = dataclasses.replace(s.matching, soft=soft)
        if refine:
            first = dataclasses.replace(s.fusion, mode="weights", solver="exact", symmetry="permutation")
            aligner = matching_lib.Refine(first, aligner)
        options: dict[str, Any] = {}
        if s.experiment.wm_rank == "train_loss" and not soft and s.matching.restarts > 1:
            aligner = TrainLossRanked(aligner, group.target_module)
            options = {"params": group.rank_data(), "extra": _chosen_restarts}
        out = group.run_aligner(aligner, label, "sinkhorn" if soft else "exact", key=int(s.matching_seed), **options)
        return dataclasses.replace(out, aux=None)  # weight matching: no OT costs to plot

    return fuse_wm


class RankedInfo(NamedTuple):
    """``aux.stats[i]`` of :class:`TrainLossRanked`: the matching's report, the restart chosen, every restart's loss."""

    matching: matching_lib.MatchingInfo
    chosen: jax.Array
    losses: jax.Array


@dataclasses.dataclass(frozen=True)
class TrainLossRanked:
    """Weight matching whose restarts are ranked by training loss instead of the matching objective (an aligner).

    For a parent and the target, each restart's permutations move the parent; the restart whose mean with the
    target has the lowest cross-entropy on training images ``params = {"x": ..., "y": ...}`` wins (the
    objective ranks restarts only loosely: docs/RESULTS.md). Training data only: never the test set.
    """

    matching: matching_lib.WeightMatching
    module: nn.Module

    needs_activations = False
    incoming = True

    def check(self, sizes, target):
        self.matching.check(sizes, target)

    def align(self, parent, target, spec, *, parent_acts=None, target_acts=None, key=None, params=None):
        del parent_acts, target_acts
        _, info = self.matching.match(parent, target, spec, key)

        def loss(perms):
            mean = engine.vanilla_average([plans_lib.apply_plans(parent, spec, perms), target])
            logits = self.module.apply(mean, params["x"], train=False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, params["y"]).mean()

        losses = jax.lax.map(loss, info.restart_perms)
        r = jnp.argmin(losses)
        best = {k: p[r] for k, p in info.restart_perms.items()}
        plans = {k: plans_lib.Permutation(p, 1.0) for k, p in best.items()}
        return engine.Alignment(plans, {}, RankedInfo(info, r, losses))


def _chosen_restarts(aux: engine.FusionAux) -> dict[str, Any]:
    return {"restart_chosen_by_train_loss": [int(st.chosen) for st in aux.stats if st is not None]}


def _rounds(aux: engine.FusionAux) -> dict[str, Any]:
    """The iterative barycentre's row fields: rounds run and the last round's plan change."""
    return {"rounds": int(aux.iterations), "plan_change": float(aux.plan_change)}


def _many_method(base: str) -> Callable[[Group, str | None], Outcome]:
    def fuse_many(group: Group, solver: str | None) -> Outcome:
        del solver
        s = group.settings
        n = int(s.experiment.barycenter_iterations)
        if base == "wm":
            # One restart: the barycentre re-aligns every parent each round, so R restarts cost R times a round.
            aligner: Any = dataclasses.replace(s.matching, soft=False, restarts=1)
            label, solver_name = f"weight matching, barycentre (<= {n} rounds)", "exact"
        else:
            mode = "activations" if base == "ot-acts" else "weights"
            # One plan per stream: the barycentre moves activations and weights by each plan (not by mixed ones).
            aligner = dataclasses.replace(s.fusion, mode=mode, solver="exact", stream_policy="shared")
            kind = "orthogonal" if aligner.symmetry == "orthogonal" else "exact"  # transformers' rotations
            label, solver_name = f"OT fusion ({mode}, {kind}), barycentre (<= {n} rounds)", "exact"
        group.say(f"iterative barycentre ({base}, at most {n} rounds)")

        out = group.run_aligner(aligner, label, solver_name, key=int(s.matching_seed), extra=_rounds, iterations=n)
        return dataclasses.replace(out, aux=None)

    return fuse_many


# The recommended method's Sinkhorn epsilons, relative to the mean cost, chosen on held-out training images
# (docs/RESULTS.md, "The recommended method"; never on a test set), with REPAIR of hidden units and logits:
# MLPs by weights (0.02-1.0 tie on the Fashion MLPNet pair: 87.90-88.06%); conv nets by activations, where 0.2
# has the best mean and the best worst case over VGG11, VGG11-BN and ResNet18-BN pairs (89.73%, against 89.53%
# for weights at 0.2 and 88.29% for the former choice, weights at 0.05), and four VGG11s 84.56% (0.05: 82.86%).
RECOMMENDED_EPSILON = 0.05
RECOMMENDED_CONV_EPSILON = 0.2


def _is_conv_net(group: Group) -> bool:
    return any(np.ndim(leaf) == 4 for leaf in jax.tree_util.tree_leaves(group.parents[group.target].variables))


def _passes(check: Callable[[], Any]) -> bool:
    """Whether ``check()`` returns without a FusionError."""
    try:
        check()
    except engine.FusionError:
        return False
    return True


def _sizes(group: Group) -> list[dict[str, int]]:
    return [group.spec.check_variables(v) for v in group.variables]


def _cca_fits(group: Group) -> bool:
    """CCA Merge can fuse the group: no norms, heads or permutation-only plans (``cca.check_spec``), equal widths
    (``CCAMerge.check``)."""

    def check():
        cca_lib.check_spec(group.spec)
        group.settings.cca.check(_sizes(group), group.target)

    return _passes(check)


def _equal_widths(group: Group) -> bool:
    """Every plan has the target's width in every parent."""
    return _passes(lambda: engine.check_equal_widths(_sizes(group), group.target, ""))


def _recommended_method(group: Group, solver: str | None) -> Outcome:
    """The best method measured on held-out training images (docs/RESULTS.md, "The recommended method", "CCA
    Merge" and "Least-squares refit"), by architecture and number of parents. Each alignment is followed by the
    least-squares refit (``config.refit``) where it can regress the model (no LayerNorm or heads) and the parents
    are MLPs, a conv-net pair of equal widths, or more than two VGGs of equal widths without BatchNorm (CCA Merge);
    else by REPAIR of hidden units (residual streams too) and logits:

    * transformers: OT by activations with their rotation symmetries (no REPAIR: it does not help them);
    * more than two parents of equal widths without BatchNorm or residual streams (MLPs, VGGs):
      CCA Merge (``config.cca``: post-ReLU activations of 1,000 samples) + the refit. Held-out: four Fashion
      MLPNets 88.06% (parents' mean 88.51%; the activation barycentre + refit 87.96%, OT by weights with Sinkhorn
      + refit 87.14%, CCA Merge + REPAIR 87.76%), four VGG11s 88.74% (92.00%; OT by activations with Sinkhorn +
      refit 76.14%, + REPAIR 84.56%);
    * two MLPs, and more of different widths: OT by weights, Sinkhorn (epsilon 0.05 of the mean cost) for two,
      the barycentre by activations (exact plans from post-ReLU correlation costs) for more; + the refit.
      Held-out: the Fashion MLPNet pair 88.32% (CCA Merge + refit 88.24%, OT + REPAIR 87.90%); 800-400-200 into
      400-200-100 88.74% (+ REPAIR 88.64%); with a third parent 87.18% (+ REPAIR 83.50%);
    * other conv nets, any number: OT by activations, Sinkhorn (epsilon 0.2 of the mean cost), + the refit for
      a pair of equal widths (held-out VGG11 pair: 89.88%, loss 0.284; + REPAIR 89.90%, loss 0.323; CCA Merge +
      refit 89.32%; BatchNorm-free ResNet18 pair 86.98% against 84.78%; VGG11-BN pair 92.30% against 88.72%;
      ResNet18-BN pair 92.52% against 90.56%), + REPAIR otherwise (different widths: VGG11 width 0.5 into 0.25,
      REPAIR 92.10%, the refit 91.22%; more than two ResNets or BatchNorm nets: not measured, REPAIR as before).
    """
    del solver
    base = group.settings.fusion
    if group.spec.heads:
        return _run_ot(group, _orthogonal(base, "activations"), "recommended: OT fusion (activations, orthogonal)")
    conv, pair = _is_conv_net(group), len(group.parents) == 2
    try:  # the refit can regress the model: Dense and Conv layers, BatchNorm, residual sums; no LayerNorm or heads
        layers, refits = refit_lib.check_spec(group.spec), True
    except engine.FusionError:
        layers, refits = {}, False
    streams = any(len(ls) > 1 for ls in layers.values())
    # More than two ResNets: CCA Merge + refit not measured (their pair: 86.76% against 86.98% for OT + refit).
    if refits and not pair and not streams and _cca_fits(group):
        return dataclasses.replace(_cca_method(group, None, "recommended: "), refit=True)
    refit_it = refits and (not conv or (pair and _equal_widths(group)))
    correction = {"refit": True} if refit_it else {"repair": True, "repair_output": True}
    if not conv and len(group.parents) > 2:
        n = int(group.settings.experiment.barycenter_iterations)
        cfg = dataclasses.replace(
            base, mode="activations", solver="exact", ground_metric="correlation", stream_policy="shared"
        )
        label = f"recommended: OT fusion (activations, exact, post-ReLU correlation), barycentre (<= {n} rounds)"
        group.say(label)
        out = group.run_aligner(cfg, label, "exact", extra=_rounds, acts_kind="post", iterations=n)
        out = dataclasses.replace(out, aux=None)
    else:
        mode, eps = ("activations", RECOMMENDED_CONV_EPSILON) if conv else ("weights", RECOMMENDED_EPSILON)
        cfg = dataclasses.replace(base, mode=mode, solver="sinkhorn", epsilon=eps, relative_epsilon="mean")
        out = _run_ot(group, cfg, f"recommended: OT fusion ({mode}, sinkhorn {eps:g} x mean cost)")
    return dataclasses.replace(out, **correction)


def _cca_method(group: Group, solver: str | None, prefix: str = "") -> Outcome:
    del solver
    aligner = group.settings.cca
    label = f"{prefix}CCA Merge ({aligner.acts_kind}-ReLU activations, regularization {aligner.regularization:g})"
    group.say(label)

    def extra(aux):  # per layer, the mean canonical correlation (of the shrunk problem) over the aligned parents
        infos = [info for info in aux.info if info is not None]
        return {"cca_correlation": {n: float(np.mean([-float(i[n].cost) for i in infos])) for n in infos[0]}}

    out = group.run_aligner(
        aligner, label, "exact", acts_kind=aligner.acts_kind, num_samples=aligner.num_samples, extra=extra
    )
    plans, weights = out.aux.plans, group.weights
    parents = [(p.module, p.variables) for p in group.parents]

    def targets(x):  # the aligned parents are not their parents' functions: restore what the maps ask for
        return repair.moved_target_stats(parents, plans, jnp.asarray(x), weights=weights)

    return dataclasses.replace(out, aux=None, repair_targets=targets)  # aux None: no OT costs to plot


def _learned_method(group: Group, solver: str | None) -> Outcome:
    del solver
    s, exp = group.settings, group.settings.experiment
    # One stream plan: the learned epsilons are keyed by the model spec's plans.
    cfg = dataclasses.replace(s.fusion, mode="weights", solver="sinkhorn", implicit_diff=False, stream_policy="shared")
    group.say(f"learned fusion ({exp.learn_steps} Adam steps through Sinkhorn)")
    variables, target = group.variables, group.target
    (fused, aux), secs = _timed(
        lambda: learned.learn_fusion(
            group.target_module,
            variables,
            group.spec,
            cfg,
            group.dataset.x_train,
            group.dataset.y_train,
            learned.LearnConfig(steps=int(exp.learn_steps), learn_weights=bool(exp.learn_weights)),
            target=target,
        )
    )
    report = next(st for st in aux.stats if st is not None)
    params, hist = report.params, report.history

    def align():
        return learned.aligned_from_params(params, variables, group.spec, cfg, target=target)[0]

    what = "Sinkhorn eps + layer weights" if exp.learn_weights else "Sinkhorn eps"
    extra = {
        "learned_epsilon": {p: float(jnp.exp(v)) for p, v in params["log_eps"].items()},
        "learn_loss": [hist[0], hist[-1]],
        "learned_weights": {p: np.asarray(jax.nn.softmax(v)).tolist() for p, v in params["logits"].items()},
    }
    # One call: compilation is part of the fit's time (compile_seconds 0, as before).
    return Outcome(f"learned fusion ({what})", "sinkhorn", fused, aux, secs, 0.0, align, extra, plans=aux.plans)


# name -> Method. "vanilla" and "ensemble" are rows of every table (accepted in method strings for clarity).
METHODS: dict[str, Method] = {
    "ot-weights": Method(
        "OTFusion, costs between incoming weights (:orthogonal: transformers' rotation symmetries)",
        _ot_method("weights"),
        ("exact", "sinkhorn", "orthogonal"),
    ),
    "ot-acts": Method(
        "OTFusion, costs between activations on num_samples training inputs (:orthogonal as ot-weights)",
        _ot_method("activations"),
        ("exact", "sinkhorn", "orthogonal"),
    ),
    "wm": Method(
        "weight matching (Git Re-Basin): coordinate descent over all plans, exact assignments, config.matching",
        _wm_method("wm", "weight matching"),
    ),
    "wm-refine": Method(
        "weight matching started from OTFusion's exact weight plans",
        _wm_method("wm-refine", "weight matching from OTFusion plans", refine=True),
    ),
    "wm-soft": Method(
        "weight matching with Sinkhorn (soft) plans", _wm_method("wm-soft", "soft weight matching", soft=True)
    ),
    "cca": Method(
        "CCA Merge (Horoi et al. 2024): invertible linear maps of the neurons from canonical correlations of"
        " activations (config.cca; models without BatchNorm, LayerNorm or attention)",
        _cca_method,
    ),
    "learned": Method(
        "OTFusion by weights with per-layer Sinkhorn epsilons (and mixing weights) fitted by gradient descent",
        _learned_method,
    ),
    "recommended": Method(
        "the recommended method (chosen on held-out data): more than two parents of equal widths without BatchNorm:"
        " CCA Merge (config.cca) + the least-squares refit (config.refit); MLPs otherwise: OT by weights, Sinkhorn"
        " 0.05 (pairs) or the activation barycentre (more), + the refit; conv nets otherwise: OT by activations,"
        " Sinkhorn 0.2, + the refit (pairs of equal widths, BatchNorm or not) or REPAIR; transformers: OT by"
        " activations, orthogonal (no REPAIR)",
        _recommended_method,
    ),
    "wm-many": Method(
        "many parents: weight matching in the iterative barycentre (each parent re-aligned onto the others' mean)",
        _many_method("wm"),
    ),
    "ot-many": Method(
        "many parents: OTFusion by weights (exact) in the iterative barycentre", _many_method("ot")
    ),
    "ot-acts-many": Method(
        "many parents: OTFusion by activations (exact) in the iterative barycentre (onto the others' moved activations)",
        _many_method("ot-acts"),
    ),
    "vanilla": Method("vanilla averaging (a row of every table)"),
    "ensemble": Method("the prediction ensemble (a row of every table)"),
}
METHOD_HELP = {name: m.help for name, m in METHODS.items() if m.fuse is not None}


def parse_methods(method: str | Sequence[str], field: str = "experiment.method") -> list[tuple[str, str | None]]:
    """``"ot-weights,ot-acts:sinkhorn"`` -> [("ot-weights", None), ("ot-acts", "sinkhorn")].

    ``field`` names the config field in the errors.

    Raises:
      ValueError: ``experiment.method: unknown ...`` for a name not in :data:`METHODS`, a suffix the method does not
        take, or an empty list.
    """
    if not isinstance(method, str) and not (isinstance(method, Sequence) and all(isinstance(m, str) for m in method)):
        raise ValueError(f"{field} must be a comma list of methods, got {method!r}")
    items = [m.strip() for m in (method.split(",") if isinstance(method, str) else method) if m.strip()]
    out = []
    for item in items:
        name, colon, solver = item.partition(":")
        entry = METHODS.get(name)
        if entry is None or (colon and solver not in entry.solvers):
            with_solvers = ", ".join(n for n, m in METHODS.items() if m.solvers)
            raise ValueError(
                f"{field}: unknown {item!r}; choose from {', '.join(METHODS)} "
                f"({with_solvers} may end in :exact or :sinkhorn; ot-weights and ot-acts also in :orthogonal)"
            )
        out.append((name, solver or None))
    if not out:
        raise ValueError(f"{field} is empty")
    return out


def averaging_weights(exp: ExperimentConfig, k: int) -> tuple[float, ...] | None:
    """The averaging weights of ``exp.weights`` / ``exp.ensemble_step`` for K parents (None: 1/K).

    ``ensemble_step`` (two parents, the original's flag) takes precedence over ``weights``.
    """
    if exp.ensemble_step is not None:
        return engine.ensemble_weights(exp.ensemble_step, k, exp.target)
    if exp.weights:
        if len(exp.weights) != k:
            raise engine.FusionError(f"experiment.weights has {len(exp.weights)} entries for {k} parents")
        return tuple(exp.weights)
    return None


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


def repair_fused(
    module: nn.Module,
    spec: spec_lib.AlignmentSpec,
    fused: Mapping[str, Any],
    aligned: Sequence[Mapping[str, Any]],
    x: np.ndarray,
    weights: Any = None,
    include_output: bool = False,
    targets: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """REPAIR a fused model (``weights``: the fusion's; ``targets``: statistics to restore instead of the aligned
    parents', ``repair.repair``); a bias-free model without BatchNorm (or with it, when ``include_output``: the
    logits are corrected too) gets zero biases first.

    Returns:
      (the module to evaluate the result with, the repaired variables).
    """
    # BatchNorm models: biases only for the logits' correction (zero biases on every layer: the same function)
    needs_biases = "batch_stats" not in fused or (include_output and spec.output_plan is not None)
    if needs_biases and any(ls.role == "weight" and not _has_bias(spec, p) for p, ls in spec.leaves):
        spec_b = spec_lib.with_biases(spec)
        module = module.clone(use_bias=True)
        fused = repair.add_zero_biases(fused, spec_b)
        aligned = [repair.add_zero_biases(a, spec_b) for a in aligned]
        spec = spec_b
    return module, repair.repair(
        module, fused, aligned, spec, jnp.asarray(x), weights=weights, include_output=include_output, targets=targets
    )


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


def barrier_curves(
    a: Parent,
    b: Parent,
    spec: spec_lib.AlignmentSpec,
    dataset: data_lib.Dataset,
    config: fusion_lib.FusionConfig,
    num_test: int = 2000,
    samples: np.ndarray | None = None,
    acts_kind: str = "pre",
) -> dict[str, dict[str, list[float]]] | None:
    """Loss/accuracy along the line from ``a`` to ``b``, before and after aligning ``a`` onto ``b`` (weights, exact).

    For transformers (a spec with attention head groups) and given ``samples``, a third curve: after the
    orthogonal alignment by activations (``FusionConfig(symmetry="orthogonal")``), the best one-shot
    alignment of a ViT pair here (docs/RESULTS.md).

    Args:
      a: the parent aligned onto ``b`` (the curve's t = 0 end).
      b: the other parent (t = 1), of the same architecture.
      spec: their alignment spec.
      dataset: its first ``num_test`` test examples are evaluated.
      config: OTFusion's options (mode and solver are set to weights, exact).
      num_test: how many test examples.
      samples: training inputs for the activations of the transformers' third curve.
      acts_kind: "pre" or "post" activations for it.

    Returns:
      ``{"plain (no alignment)": curve, "after OT alignment (weights, exact)": curve}`` (see
      :func:`interpolation_curve`; the second with ``config``'s symmetry), plus
      ``"after orthogonal alignment (activations)"`` for transformers, or None for parents of different widths:
      no straight line joins them.
    """
    if a.module != b.module:
        return None
    x, y = dataset.x_test[:num_test], dataset.y_test[:num_test]
    cfg = dataclasses.replace(config, mode="weights", solver="exact")
    # Both ends as the aligner returns them: with symmetry="orthogonal" both come with their norms folded.
    aligned, target = engine.align_parents([a.variables, b.variables], spec, cfg)[0]
    curves = {
        "plain (no alignment)": interpolation_curve(b.module, a.variables, b.variables, x, y),
        "after OT alignment (weights, exact)": interpolation_curve(b.module, aligned, target, x, y),
    }
    if spec.heads and samples is not None:
        ortho = _orthogonal(dataclasses.replace(config, past_correction=True), "activations")
        acts = [models.capture_activations(p.module, p.variables, samples, acts_kind) for p in (a, b)]
        aligned, target = engine.align_parents([a.variables, b.variables], spec, ortho, activations=acts)[0]
        curves["after orthogonal alignment (activations)"] = interpolation_curve(b.module, aligned, target, x, y)
    return curves


def run_fusion_table(
    parents: Sequence[Parent],
    spec: spec_lib.AlignmentSpec,
    dataset: data_lib.Dataset,
    settings: Settings | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Fused]]:
    """Evaluates every parent, the baselines and each fusion method of ``settings.experiment.method`` on the test set.

    Args:
      parents: K parents; the fused model takes the architecture of parent ``settings.experiment.target``.
      spec: their alignment spec.
      dataset: test data for evaluation, train data for samples and fine-tuning.
      settings: the run's options (see :class:`Settings`; None: the defaults).
      progress: called with a short status line before each step.

    Returns:
      ``(rows, fused)``: rows are ``{"method", "accuracy", "loss", "seconds", "compile_seconds", ...}`` dicts in
      table order ("+ REPAIR" and "+ fine-tune" rows after their method's); ``fused`` maps each fusion method's
      row label to its :class:`Fused`.
    """
    say = progress or (lambda _msg: None)
    settings = settings or Settings()
    exp = settings.experiment
    finetune = settings.finetune
    x_test, y_test = dataset.x_test, dataset.y_test
    target = exp.target % len(parents)
    weights = averaging_weights(exp, len(parents))
    samples = sample_inputs(dataset.x_train, exp.num_samples, exp.sample_seed)
    group = Group(parents, spec, dataset, settings, target, weights, samples, say)
    t_module = group.target_module

    def finish(variables):
        return models.recompute_batch_stats(t_module, variables, samples) if exp.bn_stats == "recompute" else variables

    rows: list[dict[str, Any]] = []
    teacher = None  # the parents' soft targets for a distilled fine-tune, computed once, timed apart
    if finetune is not None and finetune.distill > 0:
        say(f"teacher: the {len(parents)} parents' mean softmax (T={finetune.distill_temperature:g}) on the training images")
        models_ = [(p.module, p.variables) for p in parents]
        teacher, teacher_secs = _timed(
            lambda: training.teacher_probabilities(models_, dataset.x_train, finetune.distill_temperature)
        )
        say(f"teacher: {teacher_secs:.1f} s")

    def tune(variables):
        return training.train(t_module, variables, dataset, finetune, progress=False, teacher=teacher)[0]

    ft_label = "" if finetune is None else f"{finetune.epochs} ep" + (
        f", distilled {finetune.distill:g} at T={finetune.distill_temperature:g}" if finetune.distill > 0 else ""
    )

    def add(label, variables, **extra):
        rows.append({"method": label, **training.evaluate(t_module, variables, x_test, y_test), **extra})
        if finetune is not None:
            say(f"fine-tuning {label} for {finetune.epochs} epoch(s)")
            tuned, secs = _timed(lambda: tune(variables))
            rows.append(
                {
                    "method": f"{label} + fine-tune ({ft_label})",
                    **training.evaluate(t_module, tuned, x_test, y_test),
                    "finetune_seconds": secs,
                }
            )

    def corrected(label, out, run, *, strict):
        """A "+ REPAIR" / "+ refit" row and its variables: ``run()`` -> (module, variables), timed twice (compile
        or load, then warm, as the fusion rows); where it raises a ValueError, a row with the reason and None (or
        the error if ``strict``)."""
        try:
            _, first = _timed(run)
            (module_c, variables_c), secs = _timed(run)
        except ValueError as e:
            if strict:
                raise
            return {"method": label, "accuracy": None, "loss": None, "note": str(e)}, None
        row = {
            "method": label,
            **training.evaluate(module_c, variables_c, x_test, y_test),
            "seconds": out.seconds + secs,
            "compile_seconds": max(first - secs, 0.0),
        }
        return row, variables_c

    for p in parents:
        say(f"evaluating {p.name}")
        rows.append({"method": p.name, **training.evaluate(p.module, p.variables, x_test, y_test)})
    say("evaluating the prediction ensemble")
    rows.append({"method": "ensemble (mean softmax)", **ensemble_metrics(parents, x_test, y_test)})
    shapes = [jax.tree_util.tree_map(jnp.shape, p.variables) for p in parents]
    say("vanilla averaging")
    if all(s == shapes[0] for s in shapes):

        def average():
            return finish(engine.vanilla_average(group.variables, weights))

        _, first = _timed(average)
        avg, secs = _timed(average)
        add("vanilla averaging", avg, seconds=secs, compile_seconds=max(first - secs, 0.0))
    else:
        rows.append({"method": "vanilla averaging", "accuracy": None, "loss": None, "note": "parents differ in width"})

    fused_out: dict[str, Fused] = {}
    methods = exp.methods
    many = exp.many_method
    if many == "wm-many" and not all(sh == shapes[0] for sh in shapes):
        many = "ot-many"  # weight matching needs equal widths; OTFusion's barycentre takes any
    if len(parents) > 2 and many and many not in {m for m, _ in methods}:
        methods = methods + parse_methods(many)  # the many-parent method, by default
    for name, solver in methods:
        entry = METHODS[name]
        if entry.fuse is None:
            continue
        out = entry.fuse(group, solver)
        variables = finish(out.variables)
        add(out.label, variables, seconds=out.seconds, compile_seconds=out.compile_seconds, **out.extra)
        fused_out[out.label] = Fused(out.label, name, out.solver, variables, out.aux)
        if exp.repair or out.repair:
            say(f"REPAIR of {out.label}")

            def run_repair(out=out, variables=variables):
                targets = out.repair_targets(samples) if out.repair_targets is not None else None
                aligned = out.align() if targets is None else []
                return repair_fused(
                    t_module, spec, variables, aligned, samples, weights, exp.repair_output or out.repair_output,
                    targets=targets,
                )

            # With experiment.repair asked for, a model REPAIR cannot correct is an error; the method's own REPAIR
            # row says why instead.
            rows.append(corrected(f"{out.label} + REPAIR", out, run_repair, strict=exp.repair)[0])
        if exp.refit or out.refit:
            say(f"least-squares refit of {out.label}")
            run_refit = functools.partial(_refit_fused, group, out, variables)
            row, refitted = corrected(f"{out.label} + refit", out, run_refit, strict=exp.refit)
            rows.append(row)
            if refitted is not None:  # the target's architecture: saved by --save_fused next to the one-shot model
                fused_out[row["method"]] = Fused(row["method"], name, f"{out.solver}-refit", refitted, None)
    return rows, fused_out


def _refit_fused(group: Group, out: Outcome, variables: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """``(module, refitted variables)``: ``refit.refit`` of one method's fused model onto its parents'
    pre-activations moved by its plans, on ``config.refit.num_samples`` training inputs."""
    if out.plans is None:
        raise engine.FusionError(f"refit: {out.label} has no plans to refit onto")
    refit_lib.check_spec(group.spec)
    cfg, exp = group.settings.refit, group.settings.experiment
    x = jnp.asarray(sample_inputs(group.dataset.x_train, cfg.num_samples, exp.sample_seed))
    parents = [(p.module, p.variables) for p in group.parents]
    targets = refit_lib.moved_mean_activations(parents, out.plans, x, weights=group.weights)
    return group.target_module, refit_lib.refit(group.target_module, variables, group.spec, x, targets, cfg)


@dataclasses.dataclass(frozen=True)
class Table:
    """One group's table: its parent indices (into the run's parents), title, target index, rows and fused models."""

    parents: tuple[int, ...]
    title: str
    target: int
    rows: list[dict[str, Any]]
    fused: dict[str, Fused]
    split: str = "test"

    def markdown(self) -> str:
        """The rows as a Markdown table (:func:`format_table`)."""
        return format_table(self.rows, self.split)


@dataclasses.dataclass(frozen=True)
class Results:
    """What :func:`run` made: one :class:`Table` per group, the barrier curves and the per-layer OT costs.

    Attributes:
      tables: in the order of the groups.
      barrier: :func:`barrier_curves` of the first two-parent group of equal widths (None if there is none).
      cost_curves: ``"<row label> [<group>]"`` -> per-plan mean transport cost, for every fusion with OT costs.
    """

    tables: list[Table]
    barrier: dict[str, dict[str, list[float]]] | None
    cost_curves: dict[str, dict[str, float]]


def table_title(group: Sequence[int], target: int) -> str:
    """``"parents 0, 1 (target: parent 1)"``; ``target`` indexes ``group`` (negative: from the end)."""
    return f"parents {', '.join(map(str, group))} (target: parent {group[target % len(group)]})"


def run(
    parents: Sequence[Parent],
    spec: spec_lib.AlignmentSpec,
    dataset: data_lib.Dataset,
    settings: Settings | None = None,
    groups: Sequence[Sequence[int]] | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    on_table: Callable[[Table], None] | None = None,
) -> Results:
    """Makes one table per group of parents (:func:`run_fusion_table`), then the loss-barrier curves.

    Args:
      parents: every parent of the run.
      spec: their alignment spec.
      dataset: train and test data.
      settings: the run's options (None: the defaults).
      groups: lists of indices into ``parents``, one per table; None: one table with every parent.
      progress: called with a short status line before each step.
      on_table: called with each table as soon as it is made (``fuse.py`` prints it).

    Returns:
      The :class:`Results`.

    Raises:
      ValueError, engine.FusionError: For options that do not fit the parents (e.g. weight matching of
        different widths), naming the option.
    """
    say = progress or (lambda _msg: None)
    settings = settings or Settings()
    groups = [list(g) for g in groups] if groups is not None else [list(range(len(parents)))]
    tables, cost_curves, barrier_pair = [], {}, None
    for group in groups:
        members = [parents[i] for i in group]
        title = table_title(group, settings.experiment.target)
        say(f"table for {title}")
        rows, fused = run_fusion_table(members, spec, dataset, settings, progress=progress)
        if dataset.eval_split != "test":
            title += f" [evaluated on the {dataset.eval_split} training images, not the test set]"
        table = Table(tuple(group), title, group[settings.experiment.target % len(group)], rows, fused, dataset.eval_split)
        tables.append(table)
        if on_table is not None:
            on_table(table)
        for label, item in fused.items():
            if item.aux is not None:
                cost_curves[f"{label} [{','.join(map(str, group))}]"] = mean_costs(item.aux)
        if barrier_pair is None and len(group) == 2 and fused and members[0].module == members[1].module:
            barrier_pair = members
    barrier = None
    if barrier_pair is not None:
        say("loss barrier between the two parents")
        exp = settings.experiment
        samples = sample_inputs(dataset.x_train, exp.num_samples, exp.sample_seed) if spec.heads else None
        barrier = barrier_curves(*barrier_pair, spec, dataset, settings.fusion, samples=samples, acts_kind=exp.acts_kind)
    return Results(tables, barrier, cost_curves)


def mean_costs(aux: engine.FusionAux) -> dict[str, float]:
    """Per plan, the transport cost averaged over the non-target parents."""
    infos = [info for info in aux.info if info is not None]
    return {name: float(np.mean([float(info[name].cost) for info in infos])) for name in infos[0]}


def format_table(rows: Sequence[Mapping[str, Any]], split: str = "test") -> str:
    """A Markdown table: method, test accuracy (%), test loss, loss barrier, fusion time and compile time (s).

    ``split="heldout"``: the accuracy and loss (and so the loss barrier) are on the held-out training images
    (``data.eval_split``) instead of the test set, and the header says so.

    The loss barrier of a fused model (the midpoint of its parents, once aligned) is its test loss minus the
    parents' mean test loss. The compile time is the first call's extra time: compilation, or loading the
    compiled program from the persistent compilation cache.
    """

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    def opt(v, spec):
        return "" if v is None else format(v, spec)

    parent_losses = [r["loss"] for r in rows if r["method"].startswith("parent") and r.get("loss") is not None]
    base = float(np.mean(parent_losses)) if parent_losses else None
    lines = [
        f"| method | {split} accuracy (%) | {split} loss | loss barrier | fusion time (s) | compile (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        acc = None if r.get("accuracy") is None else 100 * r["accuracy"]
        fused_row = not r["method"].startswith(("parent", "ensemble")) and "fine-tune" not in r["method"]
        barrier = r["loss"] - base if fused_row and base is not None and r.get("loss") is not None else None
        lines.append(
            f"| {r['method']} | {fmt(acc, '.2f')} | {fmt(r.get('loss'), '.4f')} | {opt(barrier, '.4f')} | "
            f"{opt(r.get('seconds'), '.3f')} | {opt(r.get('compile_seconds'), '.2f')} |"
        )
    return "\n".join(lines)
