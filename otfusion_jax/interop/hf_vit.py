"""Hugging Face ``ViTForImageClassification`` state dicts <-> our ``vit``.

Both of transformers' layouts are read: the one every Hub checkpoint has
(transformers 4.x, ``vit.encoder.layer.{b}.attention.attention.query``, ...)
and transformers 5's (``vit.layers.{b}.attention.q_proj``, ...); :func:`vit_to_hf`
writes transformers 5's, which transformers 4 does not read.

The architecture is timm's ViT under other names (class token, learned
positions, pre-LN blocks, exact GELU, the class token into ``classifier``), so
a state dict is renamed to timm's layout, Q/K/V concatenated into timm's
``qkv``, and read by :func:`otfusion_jax.interop.timm_vit.vit_from_timm`
(every conversion a reshape or a transpose: bit exact both ways)::

    vit.embeddings.cls_token / position_embeddings     -> cls_token / pos_embed
    vit.embeddings.patch_embeddings.projection          -> patch_embed.proj
    vit.layers.{b}.layernorm_before / layernorm_after   -> blocks.{b}.norm1 / norm2
    vit.layers.{b}.attention.{q,k,v}_proj               -> blocks.{b}.attn.qkv  (rows [q; k; v])
    vit.layers.{b}.attention.o_proj                     -> blocks.{b}.attn.proj
    vit.layers.{b}.mlp.fc1 / fc2                        -> blocks.{b}.mlp.fc1 / fc2
    vit.layernorm / classifier                          -> norm / head

What the state dict does not say, ``ViTConfig`` does: ``num_attention_heads``
(default: timm's width table, which matches Hugging Face's ViT-B/L/H) and
``layer_norm_eps`` (Hugging Face's default 1e-12; it becomes our
``ViTOptions.layer_norm_eps``, so the logits agree). Only ``hidden_act="gelu"``
(exact) is supported. NumPy only: ``transformers`` is never imported.

Files: a ``torch.save``d state dict (``interop.torch_checkpoints``) or the
``model.safetensors`` that ``save_pretrained`` writes (:func:`load_safetensors`,
with the ``safetensors`` package), each with the ``config.json`` beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from otfusion_jax.interop import timm_vit
from otfusion_jax.models.vit import ViTOptions

__all__ = [
    "is_hf_vit", "vit_from_hf", "vit_to_hf", "read_config", "load_safetensors", "HF_LAYER_NORM_EPS", "HfLayoutError",
]

HF_LAYER_NORM_EPS = 1e-12  # ViTConfig's default

# transformers 4.x names -> transformers 5 names (the renames transformers 5 applies when it loads old checkpoints).
_LEGACY = (
    (re.compile(r"^vit\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\."), None),
    (re.compile(r"^vit\.encoder\.layer\.(\d+)\.attention\.output\.dense\."), r"vit.layers.\1.attention.o_proj."),
    (re.compile(r"^vit\.encoder\.layer\.(\d+)\.intermediate\.dense\."), r"vit.layers.\1.mlp.fc1."),
    (re.compile(r"^vit\.encoder\.layer\.(\d+)\.output\.dense\."), r"vit.layers.\1.mlp.fc2."),
    (re.compile(r"^vit\.encoder\.layer\.(\d+)\."), r"vit.layers.\1."),
)
_QKV = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
# transformers 5 names -> timm names (blocks after the top-level ones).
_TO_TIMM = {
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "pos_embed",
    "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "vit.layernorm.weight": "norm.weight",
    "vit.layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
_BLOCK_TO_TIMM = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_LAYER = re.compile(r"^vit\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class HfLayoutError(ValueError):
    """A state dict is not a Hugging Face ViT classifier we can read; the message names the key or option."""


def is_hf_vit(keys) -> bool:
    """Whether state-dict keys look like Hugging Face's ``ViTForImageClassification`` (either layout)."""
    keys = set(keys)
    return "vit.embeddings.cls_token" in keys and "classifier.weight" in keys


def _modern(key: str) -> str:
    for pattern, repl in _LEGACY:
        m = pattern.match(key)
        if m is None:
            continue
        if repl is None:  # attention.attention.query -> attention.q_proj
            return f"vit.layers.{m.group(1)}.attention.{_QKV[m.group(2)]}." + key[m.end():]
        return pattern.sub(repl, key, count=1)
    return key


def vit_from_hf(
    state_dict: Mapping[str, Any],
    *,
    num_heads: int | None = None,
    layer_norm_eps: float = HF_LAYER_NORM_EPS,
    hidden_act: str = "gelu",
    where: str = "state dict",
) -> tuple[ViTOptions, tuple[int, int, int], int, dict[str, Any]]:
    """Reads a Hugging Face ViT classifier's state dict.

    Args:
      state_dict: key -> torch tensor or array (``ViTForImageClassification.state_dict()``, either layout).
      num_heads: ``ViTConfig.num_attention_heads``; None: timm's table of standard widths.
      layer_norm_eps: ``ViTConfig.layer_norm_eps`` (default Hugging Face's 1e-12).
      hidden_act: ``ViTConfig.hidden_act``; only "gelu" (exact) is supported.
      where: how to name the source in errors (a file name).

    Returns:
      ``(options, input_shape, num_classes, variables)`` as :func:`timm_vit.vit_from_timm`.

    Raises:
      HfLayoutError: not a ViT classifier, keys outside the layout (a pooler,
        layer scale, ...), inconsistent shapes, an unsupported activation; the
        message names the key or option.
    """
    if hidden_act != "gelu":
        raise HfLayoutError(f"{where}: hidden_act={hidden_act!r}; only 'gelu' (exact, our vit's) is supported")
    sd = {_modern(k): timm_vit.np_array(v) for k, v in state_dict.items()}
    if not is_hf_vit(sd):
        raise HfLayoutError(f"{where}: not a Hugging Face ViTForImageClassification state dict "
                            "(no vit.embeddings.cls_token / classifier.weight)")
    timm: dict[str, np.ndarray] = {}
    qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        if key in _TO_TIMM:
            timm[_TO_TIMM[key]] = value
            continue
        m = _LAYER.match(key)
        if m is None:
            raise HfLayoutError(f"{where}: key {key!r} is outside the plain ViT classifier layout (a pooler, ...)")
        b, module, kind = int(m.group(1)), m.group(2), m.group(3)
        proj = module.removeprefix("attention.")
        if proj in ("q_proj", "k_proj", "v_proj"):
            qkv.setdefault((b, kind), {})[proj] = value
        elif module in _BLOCK_TO_TIMM:
            timm[f"blocks.{b}.{_BLOCK_TO_TIMM[module]}.{kind}"] = value
        else:
            raise HfLayoutError(f"{where}: key {key!r} is outside the plain ViT classifier layout")
    for (b, kind), parts in sorted(qkv.items()):
        missing = [p for p in ("q_proj", "k_proj", "v_proj") if p not in parts]
        if missing:
            raise HfLayoutError(f"{where}: block {b} has no attention.{missing[0]}.{kind}")
        shapes = {p: a.shape for p, a in parts.items()}
        if len(set(shapes.values())) != 1:
            raise HfLayoutError(f"{where}: block {b}'s q/k/v {kind}s differ in shape: {shapes}")
        timm[f"blocks.{b}.attn.qkv.{kind}"] = np.concatenate([parts[p] for p in ("q_proj", "k_proj", "v_proj")])
    if "blocks.0.attn.qkv.bias" not in timm and "blocks.0.attn.proj.bias" in timm:
        raise HfLayoutError(f"{where}: no q/k/v biases but other biases (ViTConfig(qkv_bias=False)): not supported; "
                            "our vit has biases everywhere or nowhere")
    try:
        options, shape, classes, variables = timm_vit.vit_from_timm(timm, num_heads=num_heads, where=where)
    except timm_vit.TimmLayoutError as e:  # name the keys as this file names them
        message = re.sub(r"'([\w.]+)'", lambda m: repr(_hf_key(m.group(1))), str(e).replace("timm ViT", "ViT"))
        raise HfLayoutError(message) from None
    if not layer_norm_eps > 0:
        raise HfLayoutError(f"{where}: layer_norm_eps must be > 0, got {layer_norm_eps}")
    return dataclasses.replace(options, layer_norm_eps=float(layer_norm_eps)), shape, classes, variables


def _hf_key(timm_key: str) -> str:
    """A timm key's transformers-5 name (for error messages); other text as it is."""
    back = {v: k for k, v in _TO_TIMM.items()}
    if timm_key in back:
        return back[timm_key]
    m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", timm_key)
    if m is None:
        return timm_key
    module = {v: k for k, v in _BLOCK_TO_TIMM.items()}.get(m.group(2), "attention.{q,k,v}_proj" if m.group(2) == "attn.qkv" else m.group(2))
    return f"vit.layers.{m.group(1)}.{module}.{m.group(3)}"


def read_config(where: str) -> dict[str, Any]:
    """``num_heads``, ``layer_norm_eps``, ``hidden_act`` from the ``config.json`` beside file ``where`` (as
    ``save_pretrained`` writes it) if it describes a ViT; {} without one.

    Raises:
      HfLayoutError: an unreadable config.json (named).
    """
    path = os.path.join(os.path.dirname(os.path.abspath(where)), "config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise HfLayoutError(f"{path}: unreadable Hugging Face config: {e}") from None
    if not isinstance(cfg, Mapping) or cfg.get("model_type") != "vit":
        return {}
    names = {"num_attention_heads": "num_heads", "layer_norm_eps": "layer_norm_eps", "hidden_act": "hidden_act"}
    return {ours: cfg[theirs] for theirs, ours in names.items() if theirs in cfg}


def from_config(state_dict: Mapping[str, Any], cfg: Mapping[str, Any], where: str):
    """:func:`vit_from_hf` with the ``num_heads`` / ``layer_norm_eps`` / ``hidden_act`` of ``cfg`` (defaults: Hugging Face's)."""
    heads = cfg.get("num_heads")
    return vit_from_hf(
        state_dict,
        num_heads=None if heads is None else int(heads),
        layer_norm_eps=float(cfg.get("layer_norm_eps", HF_LAYER_NORM_EPS)),
        hidden_act=str(cfg.get("hidden_act", "gelu")),
        where=where,
    )


def load_safetensors(path: str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Reads a Hugging Face ViT's ``model.safetensors`` (heads and epsilon from the ``config.json`` beside it).

    Returns:
      ``(model_name, model_options, variables, metadata)`` as ``interop.load_torch_checkpoint``.

    Raises:
      HfLayoutError: not a ViT classifier, or an unreadable file (the message names it).
      ImportError: the ``safetensors`` package is missing (it comes with ``pip install -e '.[hf]'``).
    """
    where = os.path.abspath(os.fspath(path))
    try:
        from safetensors.numpy import load_file  # noqa: PLC0415 - optional
    except ImportError as e:
        raise ImportError(f"{where}: reading .safetensors needs the safetensors package: pip install -e '.[hf]'") from e
    try:
        sd = load_file(where)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ...
        raise HfLayoutError(f"{where}: unreadable safetensors file: {type(e).__name__}: {e}") from None
    options, shape, classes, variables = from_config(sd, read_config(where), where)
    info = {"name": "vit", "options": dataclasses.asdict(options), "input_shape": list(shape), "num_classes": classes}
    return "vit", dict(info["options"]), variables, {"kind": "safetensors_import", "source": where, "model": info}


def vit_to_hf(variables: Mapping[str, Any], options: ViTOptions) -> dict[str, np.ndarray]:
    """Our ``vit`` variables as a transformers-5 ``ViTForImageClassification`` state dict (inverse of :func:`vit_from_hf`).

    Load it into ``ViTForImageClassification(ViTConfig(hidden_size=E, num_hidden_layers=depth,
    num_attention_heads=H, intermediate_size=M, patch_size=p, image_size=..., num_channels=C,
    num_labels=..., layer_norm_eps=options.layer_norm_eps))``. Needs biases (Hugging Face's ViT has them).
    """
    if not options.bias:
        raise HfLayoutError("vit_to_hf: Hugging Face's ViT has biases everywhere; this vit has bias=False")
    timm = timm_vit.vit_to_timm(variables, options)
    back = {v: k for k, v in _TO_TIMM.items()}
    block_back = {v: k for k, v in _BLOCK_TO_TIMM.items()}
    e = options.embed_dim
    out: dict[str, np.ndarray] = {}
    for key, value in timm.items():
        if key in back:
            out[back[key]] = value
            continue
        _, b, rest = key.split(".", 2)
        module, kind = rest.rsplit(".", 1)
        if module == "attn.qkv":
            for i, p in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"vit.layers.{b}.attention.{p}.{kind}"] = np.ascontiguousarray(value[i * e:(i + 1) * e])
        else:
            out[f"vit.layers.{b}.{block_back[module]}.{kind}"] = value
    return out
