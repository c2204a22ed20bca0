"""timm ViT state dicts -> our vit and back (issue 12): logits equal to torch's, exact round trips, errors."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from otfusion_jax import models, parents  # noqa: E402
from otfusion_jax.interop import TorchCheckpointError, load_torch_checkpoint, timm_vit  # noqa: E402

import timm_mirror  # noqa: E402

CASES = [  # img, patch, chans, classes, dim, depth, heads, mlp_ratio
    (8, 4, 1, 3, 8, 1, 2, 2.0),
    (12, 3, 3, 5, 12, 2, 3, 1.5),
]


def _torch_vit(case, seed=0):
    torch.manual_seed(seed)
    img, patch, chans, classes, dim, depth, heads, ratio = case
    model = timm_mirror.VisionTransformer(img, patch, chans, classes, dim, depth, heads, ratio).eval()
    with torch.no_grad():  # nonzero biases and LayerNorm affines everywhere
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _compare(model, sd, case, num_heads):
    img, _, chans = case[0], case[1], case[2]
    options, shape, classes, variables = timm_vit.vit_from_timm(sd, num_heads=num_heads)
    assert shape == (img, img, chans) and classes == case[3] and options.depth == case[5]
    module, spec = models.build("vit", input_shape=shape, num_classes=classes, **dataclasses.asdict(options))
    spec.check_variables(variables)
    x = np.random.default_rng(1).standard_normal((4, img, img, chans)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    got = np.asarray(module.apply(variables, jnp.asarray(x)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    back = timm_vit.vit_to_timm(variables, options)
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)  # bit exact


@pytest.mark.parametrize("case", CASES)
def test_timm_layout_logits_equal_torch_and_round_trip_exactly(case):
    model = _torch_vit(case)
    _compare(model, model.state_dict(), case, num_heads=case[6])


def test_against_timm_itself_where_installed():
    try:
        import timm  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001 - on the project's machines torchvision's CUDA build fails to load
        pytest.skip(f"timm not importable here ({type(e).__name__}: {e}); compared with timm_mirror instead")
    case = CASES[1]
    img, patch, chans, classes, dim, depth, heads, ratio = case
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img, patch_size=patch,
                              in_chans=chans, num_classes=classes, embed_dim=dim, depth=depth, num_heads=heads,
                              mlp_ratio=ratio).eval()
    _compare(model, model.state_dict(), case, num_heads=heads)


def test_timm_checkpoints_load_as_parents(tmp_path):
    case = CASES[0]
    paths = []
    for seed in (0, 1):
        model = _torch_vit(case, seed)
        path = tmp_path / f"vit_{seed}.pt"
        torch.save({"state_dict": model.state_dict(), "num_heads": case[6]}, path)
        paths.append(str(path))
    loaded, spec, metas = parents.load_parents(paths)
    assert [m["model"]["name"] for m in metas] == ["vit", "vit"]
    assert spec.permutation_only == ("res",) and len(spec.heads) == 1
    x = np.random.default_rng(2).standard_normal((3, 8, 8, 1)).astype(np.float32)
    with torch.no_grad():
        want = _torch_vit(case, 1)(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(np.asarray(loaded[1].module.apply(loaded[1].variables, jnp.asarray(x))), want,
                               atol=1e-4, rtol=1e-4)


def test_bad_timm_state_dicts_name_the_key(tmp_path):
    model = _torch_vit(CASES[0])
    sd = model.state_dict()
    with pytest.raises(timm_vit.TimmLayoutError, match=r"embed_dim 8 is not one of timm's standard widths .*: give num_heads"):
        timm_vit.vit_from_timm(sd)
    with pytest.raises(timm_vit.TimmLayoutError, match="num_heads=3 does not divide embed_dim 8"):
        timm_vit.vit_from_timm(sd, num_heads=3)
    extra = dict(sd, **{"blocks.0.ls1.gamma": torch.ones(8)})
    with pytest.raises(timm_vit.TimmLayoutError, match=r"keys outside the plain timm ViT layout .*blocks.0.ls1.gamma"):
        timm_vit.vit_from_timm(extra, num_heads=2)
    wrong = dict(sd, **{"blocks.0.attn.qkv.weight": torch.ones(20, 8)})
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": wrong, "num_heads": 2}, path)
    with pytest.raises(TorchCheckpointError, match=r"bad.pt: key 'blocks.0.attn.qkv.weight' has shape \(20, 8\), expected \(24, 8\)"):
        load_torch_checkpoint(path)
