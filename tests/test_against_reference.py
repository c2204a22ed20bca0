"""The library's ``fuse`` against the independent NumPy + POT reference (``reference_otfusion.py``).

Two *independently initialised* parents (not permuted copies, so every plan is a
non-trivial permutation or a spread-out Sinkhorn plan) are fused by
``otfusion_jax.fuse`` (float32, Flax layouts) and by ``fuse_reference`` (float64,
PyTorch layouts) for each option combination that changes the result; every fused
layer (weights and biases) and every corrected plan must agree.

Layouts: ours are converted to PyTorch's with ``fusion_helpers.to_torch_layers``
(dense (in, out) -> (out, in); conv HWIO -> OIHW; the dense layer after the flatten
from (H, W, C)-ordered rows to (C, H, W)-ordered columns); activations with
``layouts.acts_to_torch`` (NHWC -> NCHW).

Tolerances (parameter values are O(0.1-1)):

* exact OT: both sides pick the same (unique) optimum, so plans agree to float32
  rounding and fused weights differ by float32 vs float64 arithmetic (observed
  <= 1e-7): ``atol=1e-6``, plus ``rtol=1e-5`` for ``proper_marginals``, where our
  correction divides by ``column mass + 1e-7`` (as the original does; the
  reference divides exactly): a relative change of 1e-7 / mass, up to ~1e-6 for
  uniform masses 1/12 and a few 1e-6 with importance marginals. Plans: ``atol=1e-5``.
* Sinkhorn: our float32 cost carries a relative error ~1e-7, which moves the plan
  by ~|C| * 1e-7 / epsilon relative (epsilon = 0.05 on a mean-normalised cost, so
  ~2e-6); ours stops at a marginal error of 1e-6 (float32), the reference at 1e-12;
  plan errors feed the next layer's cost: ``atol=2e-5`` on weights and plans
  (observed <= ~3e-6). Every one of our Sinkhorn solves must have converged, so
  the tolerance cannot hide an unconverged plan.

All options are pinned explicitly (``BASE``), not taken from ``FusionConfig``'s
defaults (which differ from the original's on purpose, e.g. ``align_output``).

Known, intended difference (see
``test_align_output_false_without_past_correction_quirk``): with
``align_output=False`` and ``past_correction=False`` the original (and the
reference) still fuse the output layer from the input-*aligned* ``W_A`` (its
``--skip-last-layer`` branch always averages the aligned weights), while the
library applies ``past_correction=False`` to every layer and averages the raw
``W_A`` there. ``align_output=False`` is therefore compared with
``past_correction=True`` only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import otfusion_jax as otf
from otfusion_jax.interop import layouts
from otfusion_jax.models import build, capture_activations, init

from fusion_helpers import SmallCNN, small_cnn_spec, to_torch_layers

try:  # tests/ as a plain directory (pytest's default "prepend" import mode)
    import reference_otfusion as ref
except ModuleNotFoundError:  # tests/ made a package
    from tests import reference_otfusion as ref

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

EXACT_TOL = {"rtol": 1e-5, "atol": 1e-6}
EXACT_PLAN_TOL = {"rtol": 0.0, "atol": 1e-5}
SINKHORN_TOL = {"rtol": 0.0, "atol": 2e-5}

N_SAMPLES = 32
MLP_SHAPE = (4, 4, 1)
MLP_WIDTHS = (12, 9)
MLP_WIDE = (14, 11)  # parent A wider than the target B
MLP_KINDS = [("fc1", "dense"), ("fc2", "dense"), ("fc3", "dense")]
CNN_SHAPE = (8, 8, 3)
CNN_HW = (4, 4)  # conv2's map (after one 2x2 pool), flattened into fc1
CNN_KINDS = [("conv1", "conv"), ("conv2", "conv"), ("fc1", "flatten"), ("fc2", "dense")]
CNN_NARROW = dict(c1=6, c2=8, hidden=12)
CNN_WIDE = dict(c1=7, c2=10, hidden=14)
NUM_CLASSES = 5

# Sinkhorn on a mean-normalised cost with an absolute epsilon: both float32 (ours)
# and float64 (reference) converge tightly there.
SK = dict(
    solver="sinkhorn",
    normalize_cost="mean",
    epsilon=0.05,
    relative_epsilon=None,
    sinkhorn_threshold=1e-6,
    sinkhorn_max_iterations=20000,
)
# Activation costs have a wider spread: a larger epsilon keeps float32 Sinkhorn fast to converge.
SK_ACTS = {**SK, "mode": "activations", "epsilon": 0.1}
REF_SINKHORN = dict(sinkhorn_max_iter=50000, sinkhorn_threshold=1e-12)


# ----------------------------------------------------------------------------- parents


@dataclasses.dataclass
class Pair:
    """Two parents in both layouts, with their activations on the same samples."""

    spec: Any
    parents: list[dict]
    acts: list[dict]  # ours: plan -> tuple of (S, ..., n)
    kinds: list[tuple[str, str]]
    flatten_hw: tuple[int, int] | None
    torch_w: list[list[np.ndarray]]
    torch_b: list[list[np.ndarray] | None]
    torch_acts: list[list[np.ndarray]]

    @property
    def flatten_shapes(self):
        if self.flatten_hw is None:
            return None
        layer = [k for _, k in self.kinds].index("flatten")
        return {layer: (-1, *self.flatten_hw)}  # the reference uses only H * W


def _random_variables(model, shape, seed):
    """Independent random parameters (NumPy RNG: no per-shape eager jit of Flax's initialisers).

    Kernels ~ N(0, 1/fan_in); biases ~ N(0, 0.3^2) (Flax would initialise them to
    zero, which would leave the bias paths of cost and fusion untested).
    """
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: init(model, jax.random.key(0), shape))

    def draw(path, leaf):
        if path[-1].key == "bias":
            return jnp.asarray(rng.normal(size=leaf.shape) * 0.3, jnp.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _make_pair(models, spec, shape, kinds, flatten_hw, seeds=(0, 1)):
    x = jax.random.normal(jax.random.key(123), (N_SAMPLES, *shape))
    parents, acts = [], []
    for model, seed in zip(models, seeds):
        v = _random_variables(model, shape, seed)
        parents.append(v)
        acts.append(capture_activations(model, v, x, "pre"))
    torch_w, torch_b, torch_acts = [], [], []
    for v, a in zip(parents, acts):
        w, b = to_torch_layers(v, kinds, flatten_hw)
        torch_w.append(w)
        torch_b.append(b)
        torch_acts.append([layouts.acts_to_torch(np.asarray(a[name][0], np.float64)) for name, _ in kinds])
    return Pair(spec, parents, acts, kinds, flatten_hw, torch_w, torch_b, torch_acts)


def _mlp_pair(widths_a, bias):
    models, spec = [], None
    for widths in (widths_a, MLP_WIDTHS):
        model, spec = build("mlpnet", input_shape=MLP_SHAPE, num_classes=NUM_CLASSES, widths=widths, bias=bias)
        models.append(model)
    return _make_pair(models, spec, MLP_SHAPE, MLP_KINDS, None)


def _cnn_pair(dims_a, bias):
    models = [SmallCNN(**dims, num_classes=NUM_CLASSES, use_bias=bias) for dims in (dims_a, CNN_NARROW)]
    return _make_pair(models, small_cnn_spec(CNN_HW, bias), CNN_SHAPE, CNN_KINDS, CNN_HW)


_PAIR_BUILDERS = {
    "mlp": lambda: _mlp_pair(MLP_WIDTHS, bias=True),
    "mlp-nobias": lambda: _mlp_pair(MLP_WIDTHS, bias=False),
    "mlp-wide": lambda: _mlp_pair(MLP_WIDE, bias=True),
    "cnn": lambda: _cnn_pair(CNN_NARROW, bias=True),
    "cnn-nobias": lambda: _cnn_pair(CNN_NARROW, bias=False),
    "cnn-wide": lambda: _cnn_pair(CNN_WIDE, bias=True),
}


@pytest.fixture(scope="module")
def pairs():
    cache: dict[str, Pair] = {}

    def get(name):
        if name not in cache:
            cache[name] = _PAIR_BUILDERS[name]()
        return cache[name]

    return get


# ----------------------------------------------------------------------------- running both


def _reference_kwargs(pair: Pair, config: otf.FusionConfig, step: float | None = None) -> dict:
    return dict(
        biases_a=pair.torch_b[0],
        biases_b=pair.torch_b[1],
        acts_a=pair.torch_acts[0],
        acts_b=pair.torch_acts[1],
        mode=config.mode,
        solver=config.solver,
        reg=config.epsilon,
        ground_metric=config.ground_metric,
        squared=config.squared,
        normalize_cost=config.normalize_cost,
        unit_norm_rows=config.unit_norm_rows,
        correction=config.correction,
        proper_marginals=config.proper_marginals,
        past_correction=config.past_correction,
        ensemble_step=0.5 if step is None else step,
        importance=config.importance,
        align_last=config.align_output,
        flatten_shapes=pair.flatten_shapes,
        **REF_SINKHORN,
    )


def _run_both(pair: Pair, config: otf.FusionConfig, step: float | None = None):
    acts = pair.acts if config.mode == "activations" else None
    weights = None if step is None else otf.ensemble_weights(step)
    fused, aux = otf.fuse(pair.parents, pair.spec, config, activations=acts, weights=weights)
    ours_w, ours_b = to_torch_layers(jax.device_get(fused), pair.kinds, pair.flatten_hw)
    ref_w, ref_b, ref_plans = ref.fuse_reference(
        pair.torch_w[0], pair.torch_w[1], **_reference_kwargs(pair, config, step)
    )
    return (ours_w, ours_b, aux), (ref_w, ref_b, ref_plans)


def _ref_corrected(ref_plans, layer, n_layers, config):
    raw = ref_plans[layer]
    if layer == n_layers - 1 and not config.align_output:
        return raw  # identity, used as is
    return ref.correct_plan(raw, correction=config.correction, proper_marginals=config.proper_marginals)


# ----------------------------------------------------------------------------- cases

# Every option is pinned here (the published setting: weight mode, exact OT,
# correction, past correction, euclidean not squared, no cost normalisation, output
# layer aligned, s = 0.5), so a change of the library's defaults cannot silently
# change what these cases compare.
BASE = dict(
    mode="weights",
    solver="exact",
    exact_backend="device",
    ground_metric="euclidean",
    squared=False,
    normalize_cost="none",
    unit_norm_rows=False,
    bias_in_cost=True,  # the reference appends the bias to each neuron's cost row
    tau=1.0,
    correction=True,
    proper_marginals=False,
    past_correction=True,
    importance=None,
    align_output=True,
)


def F(**options) -> otf.FusionConfig:
    return otf.FusionConfig(**{**BASE, **options})


COST_NORMS = ("none", "log", "max", "median", "mean")

CASES = [
    # (pair, config, id[, ensemble step: the target's averaging weight]).
    # Options are combined where they are independent, to keep the number of jit
    # compilations (one per distinct config and shapes) and so the runtime down;
    # some exact cases use the host solver (POT network simplex), which compiles
    # faster than the device Hungarian and gives the same (unique) permutation.
    # --- MLP, exact OT (device Hungarian for equal widths and uniform marginals)
    ("mlp", F(), "exact-weights"),
    ("mlp", F(mode="activations"), "exact-acts"),
    ("mlp-nobias", F(mode="activations"), "exact-acts"),
    ("mlp-nobias", F(past_correction=False, exact_backend="host"), "exact-weights-nopast-host"),
    ("mlp", F(exact_backend="host", squared=True), "exact-weights-host-squared"),
    ("mlp", F(ground_metric="cosine"), "exact-weights-cosine"),
    ("mlp", F(mode="activations", ground_metric="cosine", correction=False, exact_backend="host"), "exact-acts-cosine-nocorrection-host"),
    ("mlp", F(normalize_cost="log", unit_norm_rows=True, exact_backend="host"), "exact-weights-log-unitrows-host"),  # log1p changes exact plans
    ("mlp", F(correction=False), "exact-weights-nocorrection-step0.3", 0.3),
    ("mlp", F(proper_marginals=True, align_output=False), "exact-weights-proper-noalignout"),
    ("mlp", F(mode="activations", past_correction=False, squared=True, exact_backend="host"), "exact-acts-nopast-squared-host"),
    ("mlp", F(importance="l1", proper_marginals=True), "exact-weights-l1-proper"),
    ("mlp", F(mode="activations", importance="l2", align_output=False), "exact-acts-l2-noalignout"),
    # --- MLP, Sinkhorn, every cost normalisation
    *[("mlp", F(**{**SK, "normalize_cost": norm}), f"sinkhorn-weights-{norm}") for norm in COST_NORMS],
    ("mlp", F(**SK_ACTS), "sinkhorn-acts"),
    ("mlp", F(**SK, squared=True, unit_norm_rows=True), "sinkhorn-weights-squared-unitrows"),
    ("mlp", F(**SK, ground_metric="cosine", correction=False), "sinkhorn-weights-cosine-nocorrection"),
    ("mlp", F(**SK, importance="l2", proper_marginals=True, align_output=False), "sinkhorn-weights-l2-proper-noalignout"),
    ("mlp", F(**SK, past_correction=False), "sinkhorn-weights-nopast-step0.3", 0.3),
    # --- MLP, A wider than B: exact is a transport problem (host), Sinkhorn directly
    ("mlp-wide", F(), "exact-weights"),
    ("mlp-wide", F(importance="l1", proper_marginals=True), "exact-weights-l1-proper"),
    ("mlp-wide", F(mode="activations", proper_marginals=True), "exact-acts-proper"),
    ("mlp-wide", F(**SK, proper_marginals=True), "sinkhorn-weights-proper"),
    ("mlp-wide", F(**SK_ACTS, proper_marginals=True), "sinkhorn-acts-proper"),
    # --- SmallCNN: conv -> pool -> conv -> flatten -> dense -> dense
    ("cnn", F(), "exact-weights"),
    ("cnn", F(mode="activations"), "exact-acts"),
    ("cnn-nobias", F(past_correction=False), "exact-weights-nopast"),
    ("cnn", F(importance="l2", proper_marginals=True, align_output=False), "exact-weights-l2-proper-noalignout"),
    ("cnn", F(**SK), "sinkhorn-weights"),
    ("cnn", F(**SK_ACTS), "sinkhorn-acts"),
    ("cnn-wide", F(proper_marginals=True), "exact-weights-proper"),
    ("cnn-wide", F(mode="activations", proper_marginals=True), "exact-acts-proper"),
    ("cnn-wide", F(**SK, proper_marginals=True), "sinkhorn-weights-proper"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "pair_name,config,step",
    [(p, c, step[0] if step else None) for p, c, _, *step in CASES],
    ids=[f"{p}-{i}" for p, _, i, *_ in CASES],
)
def test_fuse_matches_reference(pairs, pair_name, config, step):
    pair = pairs(pair_name)
    (ours_w, ours_b, aux), (ref_w, ref_b, ref_plans) = _run_both(pair, config, step)
    sinkhorn = config.solver == "sinkhorn"
    tol = SINKHORN_TOL if sinkhorn else EXACT_TOL
    plan_tol = SINKHORN_TOL if sinkhorn else EXACT_PLAN_TOL
    n_layers = len(pair.kinds)

    if sinkhorn:
        unconverged = {n: float(i.error) for n, i in aux.info[0].items() if not bool(i.converged)}
        assert not unconverged, f"our Sinkhorn did not converge: {unconverged}"

    assert len(ours_w) == len(ref_w) == n_layers
    for layer, (name, _) in enumerate(pair.kinds):
        assert ours_w[layer].shape == ref_w[layer].shape, name
        np.testing.assert_allclose(ours_w[layer], ref_w[layer], **tol, err_msg=f"{name} weight")
        if ref_b is not None:
            np.testing.assert_allclose(ours_b[layer], ref_b[layer], **tol, err_msg=f"{name} bias")
        expected_plan = _ref_corrected(ref_plans, layer, n_layers, config)
        np.testing.assert_allclose(
            np.asarray(aux.plans[0][name], np.float64), expected_plan, **plan_tol, err_msg=f"{name} plan"
        )
    assert ours_b is None if ref_b is None else len(ours_b) == n_layers


def test_parents_are_not_trivially_aligned(pairs):
    """Guards the premise: exact plans between the independent parents are non-identity permutations."""
    for name in ("mlp", "cnn"):
        pair = pairs(name)
        _, (_, _, ref_plans) = _run_both(pair, F())
        for layer, (lname, _) in enumerate(pair.kinds[:-1]):
            plan = ref_plans[layer]
            moved = np.count_nonzero(np.argmax(plan, axis=0) != np.arange(plan.shape[1]))
            assert moved >= plan.shape[1] // 2, f"{name}/{lname}: only {moved} neurons move"


def test_align_output_false_without_past_correction_quirk(pairs):
    """align_output=False with past_correction=False: the one place where we knowingly differ.

    The original's ``--skip-last-layer`` branch averages the *input-aligned* output
    weights even without ``--past-correction`` (the reference reproduces this); the
    library applies ``past_correction=False`` uniformly and averages the raw ``W_A``.
    Everything else (hidden layers, all biases, all plans) agrees.
    """
    pair = pairs("mlp")
    config = F(align_output=False, past_correction=False)
    (ours_w, ours_b, aux), (ref_w, ref_b, ref_plans) = _run_both(pair, config)
    for layer in range(len(pair.kinds) - 1):
        np.testing.assert_allclose(ours_w[layer], ref_w[layer], **EXACT_TOL)
    for layer, (name, _) in enumerate(pair.kinds):
        np.testing.assert_allclose(ours_b[layer], ref_b[layer], **EXACT_TOL)
        expected_plan = _ref_corrected(ref_plans, layer, len(pair.kinds), config)
        np.testing.assert_allclose(np.asarray(aux.plans[0][name]), expected_plan, **EXACT_PLAN_TOL)
    w_a, w_b = pair.torch_w[0][-1], pair.torch_w[1][-1]
    np.testing.assert_allclose(ours_w[-1], 0.5 * (w_a + w_b), **EXACT_TOL)  # raw W_A
    aligned_a = ref.align_incoming(w_a, ref.correct_plan(ref_plans[-2]))
    np.testing.assert_allclose(ref_w[-1], 0.5 * (aligned_a + w_b), **EXACT_TOL)  # aligned W_A
    assert not np.allclose(ours_w[-1], ref_w[-1], atol=1e-3)
