"""timm's Vision Transformers (``timm.models.vision_transformer.VisionTransformer``) <-> our ``vit``.

timm's state-dict layout (class token, learned positions, pre-LN blocks, the
``token`` pool, an untied ``head``: every ``vit_*`` model built with its
defaults)::

    cls_token (1, 1, E)                      -> params/cls_token
    pos_embed (1, 1 + T, E)                  -> params/pos_embed
    patch_embed.proj.weight (E, C, p, p)     -> params/patch_embed/kernel (p, p, C, E)
    blocks.{b}.norm1.weight / .bias          -> params/block{b}/norm1/scale / bias
    blocks.{b}.attn.qkv.weight (3E, E)       -> params/block{b}/attn/{query,key,value}/kernel (E, H, d)
    blocks.{b}.attn.qkv.bias (3E,)           -> params/block{b}/attn/{query,key,value}/bias (H, d)
    blocks.{b}.attn.proj.weight (E, E)       -> params/block{b}/attn/out/kernel (H, d, E)
    blocks.{b}.mlp.fc1.weight (M, E), fc2    -> params/block{b}/mlp/fc1/kernel (E, M), fc2
    norm.weight / .bias                      -> params/norm/scale / bias
    head.weight (classes, E) / .bias         -> params/head/kernel (E, classes) / bias

The ``qkv`` rows are ``[q; k; v]``, each ``(heads, head_dim)`` in row-major
order, as timm's ``qkv(x).reshape(B, N, 3, H, d)`` reads them. Every
conversion is a reshape or a transpose (bit exact both ways). The number of
heads is not in the shapes: for timm's standard widths it is read from
:data:`TIMM_HEADS` (tiny 192 -> 3 ... huge 1280 -> 16, giant 1408 -> 16);
give ``num_heads`` for any other width.
LayerNorm epsilon: timm's 1e-6, our ``vit``'s default too (``ViTOptions.layer_norm_eps``; a ViT imported
from Hugging Face has 1e-12: exported to timm, build timm's model with
``norm_layer=functools.partial(nn.LayerNorm, eps=1e-12)`` to keep its logits).

NumPy only (a state dict of torch tensors is converted with ``.numpy()``);
``timm`` itself is never imported.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from otfusion_jax import spec as spec_lib
from otfusion_jax.models.vit import ViTOptions

__all__ = ["is_timm_vit", "vit_from_timm", "vit_to_timm", "TimmLayoutError", "TIMM_HEADS", "np_array"]

# timm's vit_* widths -> heads (tiny, small, base, large, huge, giant, gigantic): heads of 64 up to large, not after.
TIMM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
_BLOCK = re.compile(r"blocks\.(\d+)\.")


class TimmLayoutError(ValueError):
    """A state dict is not a timm ViT we can read; the message names the key and shape."""


def is_timm_vit(keys) -> bool:
    """Whether state-dict keys look like timm's VisionTransformer."""
    keys = set(keys)
    return {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= keys and "blocks.0.attn.qkv.weight" in keys


def np_array(value: Any) -> np.ndarray:
    """An array from a torch tensor (detached, on the CPU) or anything array-like."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _get(sd: Mapping[str, np.ndarray], key: str, ndim: int, where: str) -> np.ndarray:
    if key not in sd:
        raise TimmLayoutError(f"{where}: missing key {key!r}")
    arr = sd[key]
    if arr.ndim != ndim:
        raise TimmLayoutError(f"{where}: key {key!r} has shape {tuple(arr.shape)}, expected {ndim} axes")
    return arr


def vit_from_timm(
    state_dict: Mapping[str, Any], *, num_heads: int | None = None, where: str = "state dict"
) -> tuple[ViTOptions, tuple[int, int, int], int, dict[str, Any]]:
    """Reads a timm ViT state dict.

    Args:
      state_dict: key -> torch tensor or array (timm's ``model.state_dict()``).
      num_heads: attention heads; None: :data:`TIMM_HEADS` of the width (timm's standard models).
      where: how to name the source in errors (a file name).

    Returns:
      ``(options, input_shape, num_classes, variables)`` for
      ``models.build("vit", input_shape=..., num_classes=..., **dataclasses.asdict(options))``
      (a square image whose side is the patch grid times the patch size).

    Raises:
      TimmLayoutError: unexpected or missing keys, inconsistent shapes, a
        global pool other than the class token, or heads that do not divide
        the width; the message names the key.
    """
    sd = {k: np_array(v) for k, v in state_dict.items()}
    if not is_timm_vit(sd):
        raise TimmLayoutError(f"{where}: not a timm ViT state dict (no cls_token / patch_embed.proj / blocks.0.attn.qkv)")
    proj = _get(sd, "patch_embed.proj.weight", 4, where)
    e, c, p, p2 = proj.shape
    if p != p2:
        raise TimmLayoutError(f"{where}: patch_embed.proj.weight {proj.shape}: non-square patches are not supported")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK.match(k)))
    if num_heads is None:
        if e not in TIMM_HEADS:
            raise TimmLayoutError(
                f"{where}: embed_dim {e} is not one of timm's standard widths {sorted(TIMM_HEADS)}: give num_heads"
            )
        num_heads = TIMM_HEADS[e]
    if num_heads < 1 or e % num_heads:
        raise TimmLayoutError(f"{where}: num_heads={num_heads} does not divide embed_dim {e}")
    d = e // num_heads
    mlp_dim = _get(sd, "blocks.0.mlp.fc1.weight", 2, where).shape[0]
    has_bias = "blocks.0.attn.qkv.bias" in sd
    head = _get(sd, "head.weight", 2, where)
    num_classes = head.shape[0]
    tokens = _get(sd, "pos_embed", 3, where).shape[1] - 1
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise TimmLayoutError(f"{where}: pos_embed has {tokens} patch positions, not a square grid")
    options = ViTOptions(depth=depth, embed_dim=e, num_heads=num_heads, mlp_dim=mlp_dim, patch_size=p, bias=has_bias)
    flat: dict[str, np.ndarray] = {
        "params/cls_token": _get(sd, "cls_token", 3, where),
        "params/pos_embed": sd["pos_embed"],
        "params/patch_embed/kernel": proj.transpose(2, 3, 1, 0),
        "params/norm/scale": _get(sd, "norm.weight", 1, where),
        "params/norm/bias": _get(sd, "norm.bias", 1, where),
        "params/head/kernel": head.T,
    }
    if has_bias:
        flat["params/patch_embed/bias"] = _get(sd, "patch_embed.proj.bias", 1, where)
        flat["params/head/bias"] = _get(sd, "head.bias", 1, where)
    used = {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "norm.bias", "head.weight"}
    if has_bias:
        used |= {"patch_embed.proj.bias", "head.bias"}
    for b in range(depth):
        t, f = f"blocks.{b}.", f"params/block{b}/"
        for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2")):
            flat[f"{f}{ours}/scale"] = _get(sd, f"{t}{theirs}.weight", 1, where)
            flat[f"{f}{ours}/bias"] = _get(sd, f"{t}{theirs}.bias", 1, where)
            used |= {f"{t}{theirs}.weight", f"{t}{theirs}.bias"}
        qkv = _get(sd, f"{t}attn.qkv.weight", 2, where)
        if qkv.shape != (3 * e, e):
            raise TimmLayoutError(f"{where}: key '{t}attn.qkv.weight' has shape {qkv.shape}, expected {(3 * e, e)}")
        for i, name in enumerate(("query", "key", "value")):
            flat[f"{f}attn/{name}/kernel"] = qkv[i * e:(i + 1) * e].reshape(num_heads, d, e).transpose(2, 0, 1)
        out = _get(sd, f"{t}attn.proj.weight", 2, where)  # (E_out, H*d)
        flat[f"{f}attn/out/kernel"] = out.T.reshape(num_heads, d, e)
        flat[f"{f}mlp/fc1/kernel"] = _get(sd, f"{t}mlp.fc1.weight", 2, where).T
        flat[f"{f}mlp/fc2/kernel"] = _get(sd, f"{t}mlp.fc2.weight", 2, where).T
        used |= {f"{t}attn.qkv.weight", f"{t}attn.proj.weight", f"{t}mlp.fc1.weight", f"{t}mlp.fc2.weight"}
        if has_bias:
            qkv_b = _get(sd, f"{t}attn.qkv.bias", 1, where)
            for i, name in enumerate(("query", "key", "value")):
                flat[f"{f}attn/{name}/bias"] = qkv_b[i * e:(i + 1) * e].reshape(num_heads, d)
            flat[f"{f}attn/out/bias"] = _get(sd, f"{t}attn.proj.bias", 1, where)
            flat[f"{f}mlp/fc1/bias"] = _get(sd, f"{t}mlp.fc1.bias", 1, where)
            flat[f"{f}mlp/fc2/bias"] = _get(sd, f"{t}mlp.fc2.bias", 1, where)
            used |= {f"{t}attn.qkv.bias", f"{t}attn.proj.bias", f"{t}mlp.fc1.bias", f"{t}mlp.fc2.bias"}
    unknown = sorted(set(sd) - used)
    if unknown:
        raise TimmLayoutError(
            f"{where}: keys outside the plain timm ViT layout (layer scale, register tokens, fc_norm, ...): "
            f"{unknown[:5]}"
        )
    for path, arr in flat.items():
        if not np.issubdtype(arr.dtype, np.floating):
            raise TimmLayoutError(f"{where}: leaf {path} has non-float dtype {arr.dtype}")
    return options, (side * p, side * p, c), int(num_classes), spec_lib.unflatten_paths(
        {k: np.ascontiguousarray(v) for k, v in flat.items()}
    )


def vit_to_timm(variables: Mapping[str, Any], options: ViTOptions) -> dict[str, np.ndarray]:
    """Our ``vit`` variables as a timm state dict (the exact inverse of :func:`vit_from_timm`).

    ``timm.create_model(..., embed_dim=E, depth=..., num_heads=..., mlp_ratio=M / E, patch_size=p,
    img_size=..., in_chans=C, num_classes=...)`` loads it with ``load_state_dict``.
    """
    flat = {k: np.asarray(v) for k, v in spec_lib.flatten_paths(variables).items()}
    e = options.embed_dim
    sd = {
        "cls_token": flat["params/cls_token"],
        "pos_embed": flat["params/pos_embed"],
        "patch_embed.proj.weight": flat["params/patch_embed/kernel"].transpose(3, 2, 0, 1),
        "norm.weight": flat["params/norm/scale"],
        "norm.bias": flat["params/norm/bias"],
        "head.weight": flat["params/head/kernel"].T,
    }
    if options.bias:
        sd["patch_embed.proj.bias"] = flat["params/patch_embed/bias"]
        sd["head.bias"] = flat["params/head/bias"]
    for b in range(options.depth):
        t, f = f"blocks.{b}.", f"params/block{b}/"
        for n in ("norm1", "norm2"):
            sd[f"{t}{n}.weight"], sd[f"{t}{n}.bias"] = flat[f"{f}{n}/scale"], flat[f"{f}{n}/bias"]
        sd[f"{t}attn.qkv.weight"] = np.concatenate(
            [flat[f"{f}attn/{n}/kernel"].transpose(1, 2, 0).reshape(e, e) for n in ("query", "key", "value")]
        )
        sd[f"{t}attn.proj.weight"] = flat[f"{f}attn/out/kernel"].reshape(e, e).T
        sd[f"{t}mlp.fc1.weight"] = flat[f"{f}mlp/fc1/kernel"].T
        sd[f"{t}mlp.fc2.weight"] = flat[f"{f}mlp/fc2/kernel"].T
        if options.bias:
            sd[f"{t}attn.qkv.bias"] = np.concatenate(
                [flat[f"{f}attn/{n}/bias"].reshape(e) for n in ("query", "key", "value")]
            )
            sd[f"{t}attn.proj.bias"] = flat[f"{f}attn/out/bias"]
            sd[f"{t}mlp.fc1.bias"] = flat[f"{f}mlp/fc1/bias"]
            sd[f"{t}mlp.fc2.bias"] = flat[f"{f}mlp/fc2/bias"]
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}
