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
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from otfusion_jax.interop import timm_vit
from otfusion_jax.models.vit import ViTOptions

__all__ = ["is_hf_vit", "vit_from_hf", "vit_to_hf", "HF_LAYER_NORM_EPS", "HfLayoutError"]

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
    try:
        options, shape, classes, variables = timm_vit.vit_from_timm(timm, num_heads=num_heads, where=where)
    except timm_vit.TimmLayoutError as e:
        raise HfLayoutError(str(e).replace("timm ViT", "ViT")) from None
    if not layer_norm_eps > 0:
        raise HfLayoutError(f"{where}: layer_norm_eps must be > 0, got {layer_norm_eps}")
    return dataclasses.replace(options, layer_norm_eps=float(layer_norm_eps)), shape, classes, variables


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
