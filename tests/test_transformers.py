"""Transformers: head-structured plans, permutation-only streams, the ViT and its fusion (issue 12)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import otfusion_jax as otf
from otfusion_jax import heads as heads_lib
from otfusion_jax import ot
from otfusion_jax import models
from otfusion_jax import spec as spec_lib

from fusion_helpers import apply_jit, init_jit, max_abs_diff, permuted_copy

X8 = (8, 8, 1)


def _vit(seed=0, **options):
    opts = dict(depth=1, embed_dim=8, num_heads=2, mlp_dim=6, patch_size=4)
    opts.update(options)
    model, spec = models.build("vit", input_shape=X8, num_classes=3, **opts)
    variables = init_jit(model, jax.random.key(seed), X8)
    # cls_token starts at zero and biases too: give every leaf a nonzero random part
    rng = np.random.default_rng(seed + 100)
    variables = jax.tree_util.tree_map(
        lambda a: a + 0.2 * jnp.asarray(rng.standard_normal(a.shape), a.dtype), variables
    )
    return model, spec, variables


def _images(seed=1, n=6):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, *X8)), jnp.float32)


def _head_sources(plan, heads):
    """Per target head, the number of parent heads that send it mass (1: whole heads move)."""
    m = np.asarray(plan)
    d = m.shape[0] // heads
    mass = np.abs(m.reshape(heads, d, heads, d)).sum((1, 3))  # [parent head, target head]
    return (mass > 1e-6).sum(0), np.argmax(mass, 0)


def _is_permutation(plan):
    m = np.asarray(plan)
    return bool(np.all(np.isin(m, (0.0, 1.0))) and np.all(m.sum(0) == 1) and np.all(m.sum(1) == 1))


# ----------------------------------------------------------------------------- the head solvers


def _brute_force(costs, heads):
    """Minimum of sum_p C_p over all head-structured permutations (shared head map), by enumeration."""
    best = np.inf
    ds = [c.shape[0] // heads for c in costs]
    for sigma in itertools.permutations(range(heads)):
        total = 0.0
        for c, d in zip(costs, ds):
            for g, h in enumerate(sigma):  # target head g takes parent head h
                block = c[h * d:(h + 1) * d, g * d:(g + 1) * d]
                total += min(sum(block[p[j], j] for j in range(d)) for p in itertools.permutations(range(d)))
        best = min(best, total)
    return best


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), heads=st.sampled_from([1, 2, 3]), dims=st.sampled_from([(2, 2), (2, 3), (3, 1)]))
def test_head_assignment_is_the_optimum_over_head_structured_permutations(seed, heads, dims):
    rng = np.random.default_rng(seed)
    costs = [rng.integers(0, 5, (heads * d, heads * d)).astype(np.float32) for d in dims]  # ties included
    perms, head_perm, total = jax.jit(lambda cs: heads_lib.head_assignment(cs, heads, "host"))(
        [jnp.asarray(c) for c in costs]
    )
    assert np.isclose(float(total), _brute_force(costs, heads))
    for c, d, p in zip(costs, dims, perms):
        p = np.asarray(p)
        assert sorted(p.tolist()) == list(range(heads * d))  # a permutation
        src_heads = p.reshape(heads, d) // d
        assert np.all(src_heads == np.asarray(head_perm)[:, None])  # whole heads, the same map for every plan
    assert np.isclose(float(total), sum(c[np.asarray(p), np.arange(len(p))].sum() for c, p in zip(costs, perms)))


def test_head_sinkhorn_has_uniform_marginals_and_approaches_the_exact_plan():
    rng = np.random.default_rng(0)
    heads, d = 3, 4
    base = np.asarray(
        np.eye(heads * d)[:, np.concatenate([h * d + rng.permutation(d) for h in rng.permutation(heads)])]
    )
    costs = [jnp.asarray(1.0 - base + 0.05 * rng.random(base.shape), jnp.float32)]
    plans, info = heads_lib.head_sinkhorn(
        costs, heads, epsilon=0.01, relative_epsilon=None, threshold=1e-5, max_iterations=5000, implicit_diff=False
    )
    t = np.asarray(plans[0])
    n = heads * d
    np.testing.assert_allclose(t.sum(0), 1.0 / n, atol=1e-4)
    np.testing.assert_allclose(t.sum(1), 1.0 / n, atol=1e-4)
    np.testing.assert_allclose(t * n, base, atol=0.02)
    assert bool(info.converged)


# ----------------------------------------------------------------------------- spec checks


def test_head_groups_and_permutation_only_plans_are_checked():
    _, spec, variables = _vit()
    leaves = dict(spec.leaves)
    with pytest.raises(spec_lib.SpecError, match="consecutively"):
        spec_lib.AlignmentSpec.build(
            leaves, ("res", "block0_qk", "block0_mlp", "block0_vo", "head"), "head",
            heads=[spec_lib.HeadGroup(("block0_qk", "block0_vo"), 2)],
        )
    with pytest.raises(spec_lib.SpecError, match="permutation_only names plans not in spec.plans"):
        spec_lib.AlignmentSpec.build(leaves, spec.plans, "head", heads=spec.heads, permutation_only=["stream"])
    with pytest.raises(spec_lib.SpecError, match="heads must be an int >= 1"):
        spec_lib.HeadGroup(("a",), 0)
    three = spec_lib.AlignmentSpec.build(leaves, spec.plans, "head", heads=[spec_lib.HeadGroup(("block0_qk", "block0_vo"), 3)])
    with pytest.raises(spec_lib.SpecError, match="plan 'block0_qk' has 8 neurons .* not a multiple of its head group's 3 heads"):
        three.check_variables(variables)


def test_the_vit_spec_shares_one_stream_plan_through_every_sum_and_layernorm():
    _, spec, _ = _vit(depth=2)
    stream = {p for p, ax in spec.members("res")}
    for b in range(2):
        for leaf in ("attn/out/kernel", "attn/out/bias", "mlp/fc2/kernel", "norm1/scale", "norm2/bias",
                     "attn/query/kernel", "mlp/fc1/kernel"):
            assert f"params/block{b}/{leaf}" in stream
    assert {"params/cls_token", "params/pos_embed", "params/patch_embed/kernel", "params/norm/scale",
            "params/head/kernel"} <= stream
    assert spec.permutation_only == ("res",)
    assert [g.plans for g in spec.heads] == [("block0_qk", "block0_vo"), ("block1_qk", "block1_vo")]
    # the stream's weight-mode cost reads every producer ready at its turn: the embeddings, and the biases of
    # the projections that write into the stream (their kernels read plans solved later)
    assert set(spec.cost_producers("res")) == {
        "params/patch_embed/kernel", "params/patch_embed/bias", "params/cls_token", "params/pos_embed",
        *[f"params/block{b}/{leaf}/bias" for b in range(2) for leaf in ("attn/out", "mlp/fc2")]}


# ----------------------------------------------------------------------------- permuted copies


@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 1000),
    depth=st.sampled_from([1, 2]),
    shape=st.sampled_from([(8, 2), (6, 3), (8, 4), (4, 1)]),  # (width, heads)
    mlp_dim=st.sampled_from([4, 6]),
)
def test_a_permuted_vit_computes_the_same_logits(seed, depth, shape, mlp_dim):
    width, heads = shape
    model, spec, variables = _vit(seed, depth=depth, embed_dim=width, num_heads=heads, mlp_dim=mlp_dim)
    copy = permuted_copy(variables, spec, seed)
    assert max_abs_diff(copy, variables) > 0.1  # really moved
    x = _images(seed)
    np.testing.assert_allclose(apply_jit(model, copy, x), apply_jit(model, variables, x), atol=2e-5)


def test_a_flat_permutation_across_heads_changes_the_function():
    """The reason for head groups: moving a neuron to another head changes q . k."""
    model, spec, variables = _vit()
    sizes = spec.check_variables(variables)
    perms = {p: np.arange(n) for p, n in sizes.items()}
    perms["block0_qk"] = np.array([0, 1, 2, 4, 3, 5, 6, 7])  # neurons 3 and 4 swap heads
    moved = otf.apply_plans(variables, spec, {k: jnp.asarray(v) for k, v in perms.items()})
    x = _images()
    assert float(jnp.max(jnp.abs(apply_jit(model, moved, x) - apply_jit(model, variables, x)))) > 1e-3


ALIGNERS = {
    "ot-weights": otf.FusionConfig(mode="weights"),
    "ot-acts": otf.FusionConfig(mode="activations"),
    "wm": otf.WeightMatching(restarts=1),
    "wm-greedy": otf.WeightMatching(start="greedy", restarts=1),
    "ot-weights-mean": otf.FusionConfig(mode="weights", stream_policy="mean"),
    "ot-acts-mean": otf.FusionConfig(mode="activations", stream_policy="mean"),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(ALIGNERS))
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 1000), depth=st.sampled_from([1, 2]), shape=st.sampled_from([(8, 2), (6, 3)]))
def test_fusing_a_vit_with_its_permuted_copy_gives_it_back(method, seed, depth, shape):
    width, heads = shape
    model, spec, variables = _vit(seed, depth=depth, embed_dim=width, num_heads=heads)
    copy = permuted_copy(variables, spec, seed + 1)
    aligner = ALIGNERS[method]
    acts = None
    if aligner.needs_activations:
        x = _images(seed)
        acts = [models.capture_activations(model, v, x) for v in (copy, variables)]
    fused, _ = otf.fuse([copy, variables], spec, aligner, activations=acts)
    assert max_abs_diff(fused, variables) < 1e-5


# ----------------------------------------------------------------------------- independent parents


SOFT = {
    "ot-sinkhorn": otf.FusionConfig(mode="weights", solver="sinkhorn", epsilon=0.05, relative_epsilon="mean"),
    "wm-soft": otf.WeightMatching(soft=True, restarts=1),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ot-weights", "wm", "ot-sinkhorn", "wm-soft"])
def test_plans_move_whole_heads_and_keep_the_stream_a_permutation(method):
    _, spec, a = _vit(0, num_heads=2)
    _, _, b = _vit(7, num_heads=2)
    aligner = {**ALIGNERS, **SOFT}[method]
    _, aux = otf.fuse([a, b], spec, aligner)
    plans = aux.plans[0]
    assert _is_permutation(plans["res"])  # LayerNorm's stream, whatever the solver
    qk_sources, qk_map = _head_sources(plans["block0_qk"], 2)
    vo_sources, vo_map = _head_sources(plans["block0_vo"], 2)
    if method in SOFT:
        assert not _is_permutation(plans["block0_qk"])  # soft inside heads
        np.testing.assert_allclose(np.asarray(plans["block0_qk"]).sum(0), 1.0, atol=1e-2)  # barycentric columns
        # one head plan for the group: the mass parent head h sends to target head g is the same for Q/K and V/O
        mass = [np.asarray(plans[p]).reshape(2, 4, 2, 4).sum((1, 3)) for p in ("block0_qk", "block0_vo")]
        np.testing.assert_allclose(mass[0], mass[1], atol=1e-3)
    else:
        assert list(qk_sources) == [1, 1] and list(vo_sources) == [1, 1]  # one parent head per target head
        assert list(qk_map) == list(vo_map)  # Q/K and V/O share the head map
        assert _is_permutation(plans["block0_qk"]) and _is_permutation(plans["block0_vo"])


@pytest.mark.slow
def test_a_vit_fuses_with_a_wider_mlp_by_ot_and_weight_matching_refuses_it():
    model, spec, a = _vit(0, mlp_dim=6)
    _, spec8, b = _vit(1, mlp_dim=8)
    assert spec8 == spec  # the MLP width is not in the spec: parents of different MLP widths share it
    fused, aux = otf.fuse([a, b], spec, otf.FusionConfig(mode="weights", solver="sinkhorn", epsilon=0.05,
                                                          relative_epsilon="mean"))
    assert fused["params"]["block0"]["mlp"]["fc1"]["kernel"].shape == (8, 8)
    assert aux.plans[0]["block0_mlp"].shape == (6, 8)
    with pytest.raises(otf.FusionError, match="weight matching needs equal widths, but plan 'block0_mlp'"):
        otf.fuse([a, b], spec, otf.WeightMatching())


def test_a_permutation_only_plan_of_different_widths_is_refused_naming_the_plan():
    _, mlp_spec = models.build("mlpnet", input_shape=X8, num_classes=3, widths=(4,))
    spec = spec_lib.AlignmentSpec.build(
        dict(mlp_spec.leaves), mlp_spec.plans, mlp_spec.output_plan, permutation_only=["fc1"]
    )
    a = {"params": {"fc1": {"kernel": jnp.ones((64, 6))}, "fc2": {"kernel": jnp.ones((6, 3))}}}
    b = {"params": {"fc1": {"kernel": jnp.ones((64, 4))}, "fc2": {"kernel": jnp.ones((4, 3))}}}
    with pytest.raises(otf.FusionError, match="'fc1' must stay a permutation .* LayerNorm.*got 6 and 4"):
        otf.fuse([a, b], spec, otf.FusionConfig(mode="weights"))
    # a ViT's stream width is in its attention views: the leaf is named
    _, vit_spec, c = _vit(0, embed_dim=8, num_heads=2)
    _, _, d = _vit(1, embed_dim=6, num_heads=2)
    with pytest.raises(otf.FusionError, match=r"attn/key/bias of shape \(2, 3\) cannot be viewed as \(8,\)"):
        otf.fuse([d, c], vit_spec, otf.FusionConfig(mode="weights"))


@pytest.mark.slow
def test_vit_fusion_under_vmap_matches_one_pair_at_a_time():
    _, spec, a = _vit(0)
    pairs = [(_vit(s)[2], a) for s in (3, 4)]
    stack = lambda trees: jax.tree_util.tree_map(lambda *x: jnp.stack(x), *trees)  # noqa: E731
    aligner = otf.FusionConfig(mode="weights")
    batched = jax.vmap(lambda p, q: otf.fuse([p, q], spec, aligner)[0])(
        stack([p for p, _ in pairs]), stack([q for _, q in pairs])
    )
    for i, (p, q) in enumerate(pairs):
        one, _ = otf.fuse([p, q], spec, aligner)
        assert max_abs_diff(jax.tree_util.tree_map(lambda x: x[i], batched), one) < 1e-6


@pytest.mark.slow
def test_gradients_flow_through_head_structured_sinkhorn():
    model, spec, a = _vit(0)
    _, _, b = _vit(1)
    x = _images()
    aligner = otf.FusionConfig(mode="weights", solver="sinkhorn", epsilon=0.05, relative_epsilon="mean",
                               sinkhorn_max_iterations=200, sinkhorn_threshold=1e-2)  # unrolled: keep it short

    def loss(log_eps):
        params = {p: jnp.exp(log_eps) for p in spec.plans}
        fused, _ = otf.fuse([a, b], spec, aligner, params=params)
        return jnp.mean(model.apply(fused, x) ** 2)

    g = jax.grad(loss)(jnp.log(0.05))
    assert np.isfinite(float(g)) and float(g) != 0.0


# ----------------------------------------------------------------------------- a decoder-only block

from otfusion_jax.models import decoder as decoder_lib  # noqa: E402


def _decoder(seed, **options):
    module, spec = decoder_lib.build_decoder(vocab_size=11, max_len=8, depth=1, embed_dim=8, num_heads=2,
                                             mlp_dim=6, **options)
    variables = decoder_lib.init_decoder(module, jax.random.key(seed))
    rng = np.random.default_rng(seed + 100)
    variables = jax.tree_util.tree_map(lambda a: a + 0.2 * jnp.asarray(rng.standard_normal(a.shape), a.dtype), variables)
    return module, spec, variables


@pytest.mark.slow
@pytest.mark.parametrize("positions,norm", [("learned", "layer"), ("rotary", "rms")])
def test_a_permuted_decoder_computes_the_same_logits_and_fuses_back(positions, norm):
    module, spec, variables = _decoder(0, positions=positions, norm=norm)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 11, (3, 8)))
    copy = permuted_copy(variables, spec, 5)
    if positions == "rotary":
        assert spec.heads[0].rigid == ("block0_qk",)
        # rotary pairs fixed dimensions: the copy may only move whole Q/K heads
        sizes = spec.check_variables(variables)
        perms = {p: np.arange(n) for p, n in sizes.items()}
        perms["block0_qk"] = np.array([4, 5, 6, 7, 0, 1, 2, 3])  # swap the two heads of Q/K
        perms["block0_vo"] = np.array([6, 4, 5, 7, 2, 0, 3, 1])  # the same head swap for V/O, shuffled inside
        perms["res"], perms["block0_mlp"] = np.random.default_rng(2).permutation(8), np.arange(6)[::-1]
        copy = otf.apply_plans(variables, spec, {k: jnp.asarray(v) for k, v in perms.items()})
        inside = dict(perms, block0_qk=np.array([1, 0, 2, 3, 4, 5, 6, 7]))  # one rotary pair broken
        broken = otf.apply_plans(variables, spec, {k: jnp.asarray(v) for k, v in inside.items()})
        assert float(jnp.max(jnp.abs(module.apply(broken, tokens) - module.apply(variables, tokens)))) > 1e-3
    np.testing.assert_allclose(module.apply(copy, tokens), module.apply(variables, tokens), atol=2e-5)
    assert max_abs_diff(copy, variables) > 0.1
    for aligner in (otf.FusionConfig(mode="weights"), otf.WeightMatching(restarts=1),
                    otf.FusionConfig(mode="weights", stream_policy="mean")):
        fused, aux = otf.fuse([copy, variables], spec, aligner)
        assert max_abs_diff(fused, variables) < 1e-5, type(aligner).__name__
        if positions == "rotary":  # Q/K keep every dimension's place within its head
            qk = np.asarray(aux.plans[0]["block0_qk"])
            assert set(np.argmax(qk, 0) % 4 == np.arange(8) % 4) == {True}


@pytest.mark.slow
@pytest.mark.parametrize("aligner", [otf.WeightMatching(restarts=1), otf.FusionConfig(mode="weights")],
                         ids=["wm-many", "ot-many"])
def test_three_permuted_vits_fuse_back_one_shot_and_by_the_barycentre(aligner):
    _, spec, variables = _vit(3)
    parents = [permuted_copy(variables, spec, s) for s in (11, 12)] + [variables]
    for iterations in (1, 3):
        fused, aux = otf.fuse(parents, spec, aligner, iterations=iterations)
        assert max_abs_diff(fused, variables) < 1e-5
    assert int(aux.iterations) == 2  # the plans stopped changing after the first re-alignment


# ----------------------------------------------------------------------------- orthogonal symmetries


def _random_orthogonal(rng, n, keep_ones=False):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    q = q * np.sign(np.diag(r))
    if not keep_ones:
        return q
    u = np.ones((n, 1)) / np.sqrt(n)
    comp = np.linalg.qr(np.concatenate([u, rng.standard_normal((n, n - 1))], 1))[0][:, 1:]
    inner = np.linalg.qr(rng.standard_normal((n - 1, n - 1)))[0]
    return comp @ inner @ comp.T + np.ones((n, n)) / n


def _rotated_copy(variables, spec, seed):
    """A function-equal copy of folded ViT variables: the stream rotated (keeping ones), heads permuted and
    rotated within (Q/K together, V/O together), MLP units permuted."""
    rng = np.random.default_rng(seed)
    sizes = spec.check_variables(variables)
    plans = {p: np.eye(n)[:, rng.permutation(n)] for p, n in sizes.items()}
    plans["head"] = np.eye(sizes["head"])
    plans["res"] = _random_orthogonal(rng, sizes["res"], keep_ones=True)
    for group in spec.heads:
        sigma = rng.permutation(group.heads)
        for p in group.plans:
            n = sizes[p]
            d = n // group.heads
            t = np.zeros((n, n))
            for g in range(group.heads):
                h = sigma[g]
                t[h * d:(h + 1) * d, g * d:(g + 1) * d] = _random_orthogonal(rng, d)
            plans[p] = t
    return otf.apply_plans(variables, spec, {k: jnp.asarray(v, jnp.float32) for k, v in plans.items()})


def test_folding_the_norms_keeps_the_function_and_leaves_plain_norms():
    model, spec, variables = _vit(0, depth=2)
    folded = spec_lib.fold_norms(variables, spec)
    x = _images()
    np.testing.assert_allclose(apply_jit(model, folded, x), apply_jit(model, variables, x), atol=2e-5)
    flat = spec_lib.flatten_paths(folded)
    for norm, _ in spec.folds:
        assert np.all(np.asarray(flat[f"params/{norm}/scale"]) == 1.0)
        assert np.all(np.asarray(flat[f"params/{norm}/bias"]) == 0.0)
    assert {n for n, _ in spec.folds} == {"norm", "block0/norm1", "block0/norm2", "block1/norm1", "block1/norm2"}


def test_orthogonal_plans_keep_ones_and_recover_a_rotation():
    rng = np.random.default_rng(0)
    r = _random_orthogonal(rng, 6, keep_ones=True)
    x = rng.standard_normal((40, 6))
    plan = np.asarray(ot.orthogonal_plan(ot.cross_gram([jnp.asarray(x)], [jnp.asarray(x @ r)])[0]))
    np.testing.assert_allclose(plan, r, atol=1e-5)
    np.testing.assert_allclose(plan @ plan.T, np.eye(6), atol=1e-5)
    np.testing.assert_allclose(plan.sum(0), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["activations", "weights"])
def test_a_rotated_vit_computes_the_same_logits_and_orthogonal_fusion_gives_it_back(mode):
    model, spec, variables = _vit(2, depth=2, embed_dim=8, num_heads=2)
    folded = spec_lib.fold_norms(variables, spec)
    copy = _rotated_copy(folded, spec, 4)
    x = _images(n=8)
    np.testing.assert_allclose(apply_jit(model, copy, x), apply_jit(model, variables, x), atol=2e-5)
    aligner = otf.FusionConfig(mode=mode, symmetry="orthogonal")
    acts = [models.capture_activations(model, v, x) for v in (copy, variables)] if mode == "activations" else None
    # the unfolded original as the target: the engine folds both (aligner.prepare), the fused model is the folded one
    fused, aux = otf.fuse([copy, variables], spec, aligner, activations=acts)
    if mode == "activations":
        assert max_abs_diff(fused, folded) < 1e-4
    else:  # the stream's producers ready at its turn (embeddings, biases) pin the rotation down; heads by weights
        np.testing.assert_allclose(apply_jit(model, fused, x), apply_jit(model, variables, x), atol=1e-3)
    plan = np.asarray(aux.plans[0]["res"])
    np.testing.assert_allclose(plan @ plan.T, np.eye(8), atol=1e-5)  # orthogonal, not a permutation


def test_permutation_symmetry_cannot_undo_a_rotation():
    """The case for symmetry='orthogonal': a rotated copy is the same function, but permutations cannot align it."""
    model, spec, variables = _vit(2, depth=1)
    folded = spec_lib.fold_norms(variables, spec)
    copy = _rotated_copy(folded, spec, 5)
    x = _images(n=8)
    acts = [models.capture_activations(model, v, x) for v in (copy, folded)]
    perm, _ = otf.fuse([copy, folded], spec, otf.FusionConfig(mode="activations"), activations=acts)
    orth, _ = otf.fuse([copy, folded], spec, otf.FusionConfig(mode="activations", symmetry="orthogonal"),
                       activations=acts)
    assert max_abs_diff(orth, folded) < 1e-4 < max_abs_diff(perm, folded)


@pytest.mark.slow
def test_orthogonal_fusion_of_a_bias_free_vit_folds_only_the_norm_scales():
    model, spec, variables = _vit(6, bias=False)
    folded = spec_lib.fold_norms(variables, spec)  # the readers have no bias: the norms keep theirs, over the scale
    flat, orig = spec_lib.flatten_paths(folded), spec_lib.flatten_paths(variables)
    np.testing.assert_allclose(flat["params/block0/norm1/bias"],
                               orig["params/block0/norm1/bias"] / orig["params/block0/norm1/scale"], rtol=1e-6)
    assert np.all(np.asarray(flat["params/block0/norm1/scale"]) == 1.0)
    copy = _rotated_copy(folded, spec, 7)
    x = _images(n=8)
    np.testing.assert_allclose(apply_jit(model, copy, x), apply_jit(model, variables, x), atol=2e-5)
    acts = [models.capture_activations(model, v, x) for v in (copy, variables)]
    fused, _ = otf.fuse([copy, variables], spec, otf.FusionConfig(mode="activations", symmetry="orthogonal"),
                        activations=acts)
    assert max_abs_diff(fused, folded) < 1e-4


def test_orthogonal_symmetry_needs_every_stream_norm_folded():
    _, spec, variables = _vit(0)
    unfolded = spec_lib.AlignmentSpec.build(
        dict(spec.leaves), spec.plans, spec.output_plan, heads=spec.heads, permutation_only=spec.permutation_only,
        folds={k: v for k, v in spec.folds if k != "norm"},
    )
    with pytest.raises(otf.FusionError, match="the norm 'params/norm' on stream 'res' is not in spec.folds"):
        otf.fuse([variables, variables], unfolded, otf.FusionConfig(symmetry="orthogonal"))


@pytest.mark.parametrize("heads,d", [(1, 4), (3, 1)])
def test_head_sinkhorn_with_one_head_or_heads_of_one(heads, d):
    rng = np.random.default_rng(0)
    costs = [jnp.asarray(rng.random((heads * d, heads * d)), jnp.float32)]
    plans, info = heads_lib.head_sinkhorn(costs, heads, epsilon=0.5, relative_epsilon="std", threshold=1e-5,
                                          max_iterations=5000, implicit_diff=False)
    t = np.asarray(plans[0])
    assert np.all(np.isfinite(t)) and np.isfinite(float(info.cost)) and bool(info.converged)
    np.testing.assert_allclose(t.sum(0), 1.0 / (heads * d), atol=1e-4)
    np.testing.assert_allclose(t.sum(), 1.0, atol=1e-4)


def test_fuse_py_methods_take_the_orthogonal_suffix():
    from otfusion_jax import experiment  # noqa: PLC0415

    assert experiment.parse_methods("ot-acts:orthogonal,ot-weights:orthogonal,ot-acts") == [
        ("ot-acts", "orthogonal"), ("ot-weights", "orthogonal"), ("ot-acts", None)]
    with pytest.raises(ValueError, match=r"unknown 'wm:orthogonal'.*also in :orthogonal"):
        experiment.parse_methods("wm:orthogonal")
    with pytest.raises(otf.FusionError, match="symmetry='orthogonal' needs past_correction=True"):
        otf.FusionConfig(symmetry="orthogonal", past_correction=False)


# ----------------------------------------------------------------------------- transformer-fusion's residual policy


def test_per_sum_plans_give_each_branch_a_plan_and_each_sum_the_mean():
    _, spec, _ = _vit(depth=2)
    split = spec_lib.per_sum_plans(spec)
    lm = split.leaf_map
    assert lm["params/cls_token"].axes[-1] == "res@0" and lm["params/block0/attn/query/kernel"].axes[0] == "res@0"
    assert lm["params/block0/attn/out/kernel"].axes == ("block0_vo", "res@1.branch")
    assert lm["params/block0/norm2/scale"].axes == ("res@1",) and lm["params/block0/mlp/fc1/kernel"].axes[0] == "res@1"
    assert lm["params/block1/mlp/fc2/bias"].axes == ("res@4.branch",)
    assert lm["params/norm/bias"].axes == ("res@4",) and lm["params/head/kernel"].axes[0] == "res@4"
    assert dict(split.derived) == {f"res@{i}": (f"res@{i - 1}", f"res@{i}.branch") for i in range(1, 5)}
    assert split.permutation_only == () and "res" not in split.plans
    # each branch is solved after its input plans, from its own projection
    assert split.plans.index("res@1.branch") > split.plans.index("block0_vo")
    assert split.cost_producers("res@2.branch") == ["params/block0/mlp/fc2/bias", "params/block0/mlp/fc2/kernel"]
    # activations: the stream after sum 0, then what each sum adds
    taps = tuple(jnp.full((2, 3, 8), float(i * i)) for i in range(5))
    acts = spec_lib.stream_activations(split, {"res": taps})
    assert float(acts["res@0"][0][0, 0, 0]) == 0.0 and float(acts["res@3.branch"][0][0, 0, 0]) == 9.0 - 4.0
    with pytest.raises(spec_lib.SpecError, match="stream 'res': 4 activation taps, but the spec's stream has 5 sums"):
        spec_lib.stream_activations(split, {"res": taps[:4]})
    mlp = models.build("mlpnet", widths=(4,))[1]
    with pytest.raises(spec_lib.SpecError, match="declares its streams' sums"):
        spec_lib.per_sum_plans(mlp)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["weights", "activations"])
def test_the_mean_policy_averages_the_incoming_and_branch_plans(mode):
    model, spec, a = _vit(0, depth=2)
    _, _, b = _vit(1, depth=2)
    x = _images(n=16)
    acts = [models.capture_activations(model, v, x) for v in (a, b)] if mode == "activations" else None
    aligner = otf.FusionConfig(mode=mode, stream_policy="mean")
    fused, aux = otf.fuse([a, b], spec, aligner, activations=acts)
    plans = aux.plans[0]
    for i in range(1, 5):
        np.testing.assert_allclose(plans[f"res@{i}"], (plans[f"res@{i - 1}"] + plans[f"res@{i}.branch"]) / 2, atol=1e-6)
        assert _is_permutation(plans[f"res@{i}.branch"])  # exact solver: each branch a permutation
    assert not _is_permutation(plans["res@4"])  # independent parents: the plans differ, their mean is soft
    shared, _ = otf.fuse([a, b], spec, otf.FusionConfig(mode=mode), activations=acts)
    assert max_abs_diff(fused, shared) > 1e-3  # another fusion than the shared stream plan's
    with pytest.raises(otf.FusionError, match="stream_policy='mean' mixes plans"):
        otf.FusionConfig(stream_policy="mean", symmetry="orthogonal")
    with pytest.raises(otf.FusionError, match="iterative barycentre .* use stream_policy='shared'"):
        otf.fuse([a, b, b], spec, aligner, activations=acts and acts + acts[1:], iterations=2)
    mlp_model, mlp_spec = models.build("mlpnet", widths=(4,))
    v = init_jit(mlp_model, jax.random.key(0), (28, 28, 1))
    with pytest.raises(otf.FusionError, match="declares none"):
        otf.fuse([v, v], mlp_spec, otf.FusionConfig(stream_policy="mean"))


@pytest.mark.slow
def test_repair_of_a_bias_free_vit_adds_biases_inside_the_stream_sums():
    from otfusion_jax import experiment  # noqa: PLC0415

    model, spec, a = _vit(0, depth=2, bias=False)
    _, _, b = _vit(1, depth=2, bias=False)
    spec_b = spec_lib.with_biases(spec)
    sums = dict(zip(range(5), spec_b.streams[0].sums))
    assert "params/block0/attn/out/bias" in sums[1][0] and "params/patch_embed/bias" in sums[0][0]
    spec_lib.per_sum_plans(spec_b)  # still a consistent stream
    aligned, _ = otf.align_parents([a, b], spec, otf.FusionConfig(mode="weights"))
    fused = otf.engine.weighted_sum(aligned, jnp.array([0.5, 0.5]))
    module_r, repaired = experiment.repair_fused(model, spec, fused, aligned, np.asarray(_images(n=32)))
    logits = module_r.apply(repaired, _images())
    assert bool(jnp.all(jnp.isfinite(logits))) and "bias" in repaired["params"]["block0"]["mlp"]["fc1"]


@pytest.mark.slow
def test_the_recommended_method_aligns_transformers_by_rotations():
    from otfusion_jax import data as data_lib  # noqa: PLC0415
    from otfusion_jax import experiment  # noqa: PLC0415

    model, spec, a = _vit(0)
    _, _, b = _vit(1)
    x = np.asarray(_images(n=24))
    y = np.arange(24) % 3
    ds = data_lib.Dataset("digits", "sklearn", x[:16], y[:16], x[16:], y[16:], 3)
    settings = experiment.Settings(experiment.ExperimentConfig(method="recommended", num_samples=8))
    parents = [experiment.Parent(f"parent {k}", model, v) for k, v in enumerate((a, b))]
    rows, fused = experiment.run_fusion_table(parents, spec, ds, settings)
    assert list(fused) == ["recommended: OT fusion (activations, orthogonal)"]
    assert not any("REPAIR" in r["method"] for r in rows)  # no REPAIR for transformers
    want, _ = otf.fuse([a, b], spec, otf.FusionConfig(mode="activations", symmetry="orthogonal"),
                       activations=[models.capture_activations(model, v, jnp.asarray(experiment.sample_inputs(x[:16], 8, 0)))
                                    for v in (a, b)])
    assert max_abs_diff(fused["recommended: OT fusion (activations, orthogonal)"].variables, want) < 1e-5
