"""Hugging Face ViTForImageClassification state dicts -> our vit and back (issue 12): logits equal, exact round trips."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from otfusion_jax import models, parents  # noqa: E402
from otfusion_jax.interop import TorchCheckpointError, hf_vit, load_torch_checkpoint  # noqa: E402

CASES = [  # img, patch, chans, classes, dim, depth, heads, mlp, layer_norm_eps
    (8, 4, 1, 3, 8, 1, 2, 12, 1e-12),
    (12, 3, 3, 5, 12, 2, 3, 18, 1e-6),
]


def _hf_vit(case, seed=0):
    img, patch, chans, classes, dim, depth, heads, mlp, eps = case
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp,
        image_size=img, patch_size=patch, num_channels=chans, num_labels=classes, layer_norm_eps=eps,
    )
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():  # nonzero biases, LayerNorm affines, class token and positions everywhere
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _quiet_hf_vit(case, seed):
    """A ViT whose embeddings are tiny, so that the first LayerNorm's epsilon changes its logits."""
    model = _hf_vit(case, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".embeddings." in f".{name}":
                p.mul_(1e-4)
    return model


def _legacy(sd):
    """The transformers 4.x names of a transformers 5 state dict (what Hub checkpoints hold)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("vit.layers.", "vit.encoder.layer.")
        for new, old in (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
                         ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
                         ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
            k = k.replace(new, old)
        out[k] = v
    return out


def _logits(model, x):
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).logits.numpy()


@pytest.mark.parametrize("case", CASES)
def test_hf_layouts_give_torch_logits_and_round_trip_exactly(case):
    img, chans, heads, eps = case[0], case[2], case[6], case[8]
    model = _hf_vit(case)
    sd = model.state_dict()
    x = np.random.default_rng(1).standard_normal((4, img, img, chans)).astype(np.float32)
    want = _logits(model, x)
    legacy = any(k.startswith("vit.encoder.layer.") for k in sd)
    for layout in (sd, sd if legacy else _legacy(sd)):  # whichever transformers wrote, and the Hub's names
        options, shape, classes, variables = hf_vit.vit_from_hf(layout, num_heads=heads, layer_norm_eps=eps)
        assert shape == (img, img, chans) and classes == case[3] and options.layer_norm_eps == eps
        assert (options.depth, options.embed_dim, options.mlp_dim, options.patch_size) == (case[5], case[4], case[7], case[1])
        module, spec = models.build("vit", input_shape=shape, num_classes=classes, **dataclasses.asdict(options))
        spec.check_variables(variables)
        np.testing.assert_allclose(np.asarray(module.apply(variables, jnp.asarray(x))), want, atol=1e-4, rtol=1e-4)
    back = hf_vit.vit_to_hf(variables, options)
    if not legacy:  # transformers 5 writes the names vit_to_hf writes
        assert back.keys() == sd.keys()
        for k, v in sd.items():
            np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)  # bit exact
    fresh = _hf_vit(case, seed=5)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in (back if not legacy else _legacy(back)).items()})
    np.testing.assert_allclose(_logits(fresh, x), want, atol=1e-5, rtol=1e-5)


def test_the_epsilon_matters_and_is_read_from_config_json(tmp_path):
    """A state dict beside save_pretrained's config.json: the heads and epsilon come from the config."""
    case = CASES[0]
    img, chans = case[0], case[2]
    paths = []
    for seed in (0, 1):
        model = _quiet_hf_vit(case, seed)
        folder = tmp_path / f"vit{seed}"
        folder.mkdir()
        model.config.to_json_file(str(folder / "config.json"))
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        paths.append(str(folder / "pytorch_model.bin"))
    name, options, variables, meta = load_torch_checkpoint(paths[0])
    assert name == "vit" and options["num_heads"] == case[6] and options["layer_norm_eps"] == 1e-12
    assert meta["torch"]["layout"] == "hf"
    module, _ = models.build("vit", input_shape=(img, img, chans), num_classes=case[3], **options)
    x = np.random.default_rng(2).standard_normal((3, img, img, chans)).astype(np.float32) * 1e-4  # small: eps shows
    model = _quiet_hf_vit(case, 0)
    want = _logits(model, x)
    np.testing.assert_allclose(np.asarray(module.apply(variables, jnp.asarray(x))), want, atol=1e-4, rtol=1e-4)
    timm_eps, _ = models.build("vit", input_shape=(img, img, chans), num_classes=case[3], **{**options, "layer_norm_eps": 1e-6})
    assert np.abs(np.asarray(timm_eps.apply(variables, jnp.asarray(x))) - want).max() > 1e-3  # so the option is needed
    loaded, spec, metas = parents.load_parents(paths)  # fuse.py --parents=a/pytorch_model.bin,b/pytorch_model.bin
    assert len(loaded) == 2 and all(m["model"]["options"]["layer_norm_eps"] == 1e-12 for m in metas)


def test_save_pretrained_folders_load_as_parents(tmp_path):
    pytest.importorskip("safetensors")
    case = CASES[1]
    img, chans = case[0], case[2]
    paths = []
    for seed in (0, 1):
        model = _hf_vit(case, seed)
        model.save_pretrained(str(tmp_path / f"vit{seed}"))
        paths.append(str(tmp_path / f"vit{seed}" / "model.safetensors"))
    loaded, spec, metas = parents.load_parents(paths)  # fuse.py --parents=vit0/model.safetensors,vit1/...
    assert metas[0]["model"]["options"]["num_heads"] == case[6] and metas[0]["model"]["options"]["layer_norm_eps"] == 1e-6
    x = np.random.default_rng(3).standard_normal((2, img, img, chans)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(loaded[1].module.apply(loaded[1].variables, jnp.asarray(x))),
                               _logits(_hf_vit(case, 1), x), atol=1e-4, rtol=1e-4)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(hf_vit.HfLayoutError, match="bad.safetensors: unreadable safetensors file"):
        parents.load_parents([str(tmp_path / "bad.safetensors"), paths[0]])


def test_bad_hf_state_dicts_name_the_key_or_option():
    sd = {k: v.numpy() for k, v in _hf_vit(CASES[0]).state_dict().items()}
    with pytest.raises(hf_vit.HfLayoutError, match="hidden_act='gelu_new'"):
        hf_vit.vit_from_hf(sd, num_heads=2, hidden_act="gelu_new")
    with pytest.raises(hf_vit.HfLayoutError, match="vit.pooler.dense.weight"):
        hf_vit.vit_from_hf({**sd, "vit.pooler.dense.weight": np.zeros((8, 8), np.float32)}, num_heads=2)
    k_proj = next(k for k in sd if k.endswith("k_proj.weight") or k.endswith("attention.key.weight"))
    with pytest.raises(hf_vit.HfLayoutError, match="k_proj"):
        hf_vit.vit_from_hf({k: v for k, v in sd.items() if k != k_proj}, num_heads=2)
    with pytest.raises(hf_vit.HfLayoutError, match="num_heads=3 does not divide embed_dim 8"):
        hf_vit.vit_from_hf(sd, num_heads=3)
    with pytest.raises(hf_vit.HfLayoutError, match="embed_dim 8 is not one of timm's standard widths"):
        hf_vit.vit_from_hf(sd)
    norm_bias = next(k for k in sd if k == "vit.layernorm.bias")
    with pytest.raises(hf_vit.HfLayoutError, match="missing key 'vit.layernorm.bias'"):  # the file's name, not timm's
        hf_vit.vit_from_hf({k: v for k, v in sd.items() if k != norm_bias}, num_heads=2)
    no_qkv_bias = {k: v for k, v in sd.items() if not k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias",
                                                                    "query.bias", "key.bias", "value.bias"))}
    with pytest.raises(hf_vit.HfLayoutError, match="qkv_bias=False"):
        hf_vit.vit_from_hf(no_qkv_bias, num_heads=2)


def test_bad_config_json_names_the_file(tmp_path):
    model = _hf_vit(CASES[0])
    (tmp_path / "config.json").write_text("{not json")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(TorchCheckpointError, match="config.json: unreadable Hugging Face config"):
        load_torch_checkpoint(tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "num_attention_heads": 3}))
    with pytest.raises(TorchCheckpointError, match="num_heads=3 does not divide"):
        load_torch_checkpoint(tmp_path / "pytorch_model.bin")
