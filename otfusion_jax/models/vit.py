"""Vision Transformer (pre-LN, class token, learned position embedding), described once.

Layout of the variables (timm's names, Flax's attention layout):

* ``patch_embed`` (conv ``(p, p, C, E)``, stride p), ``cls_token`` ``(1, 1, E)``,
  ``pos_embed`` ``(1, 1 + T, E)``;
* ``block{b}``: ``norm1``, ``attn`` (``query``/``key``/``value`` kernels
  ``(E, heads, head_dim)``, ``out`` kernel ``(heads, head_dim, E)``: Flax's
  ``MultiHeadDotProductAttention`` layout), ``norm2``, ``mlp`` (``fc1``
  ``(E, M)``, ``fc2`` ``(M, E)``), GELU;
* ``norm`` (final LayerNorm), ``head`` (dense ``(E, classes)`` on the class token).

Plans (the spec): one residual-stream plan ``res`` shared by every tensor summed
into the stream (patch embedding, class token, position embedding, every block's
attention-output and MLP-output projection) and by every LayerNorm; it is
permutation-only (LayerNorm commutes with permutations only). Per block, a head
group ``(block{b}_qk, block{b}_vo)``: Q and K share the within-head plan
``qk``, V and the output projection ``vo``, and both move whole heads together;
``block{b}_mlp`` on the MLP's hidden units (any width: different MLP widths fuse
with OT plans). ``head`` is the output plan.

Activations (``capture_activations``): ``res`` is the stream after the
embeddings and after every residual addition (all of its producers' outputs);
``qk`` the queries and keys, ``vo`` the values (``pre``) or the heads' outputs
before the output projection (``post``), ``mlp`` the hidden units before /
after GELU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from otfusion_jax import spec as spec_lib
from otfusion_jax.models.common import sow_acts
from otfusion_jax.models.record import ModelRecord

__all__ = ["ViT", "ViTOptions", "vit_spec", "RECORD", "STREAM", "Attention", "Block", "rotary", "transformer_block_spec", "stream_sums"]

STREAM = "res"  # the residual stream's plan


@dataclasses.dataclass(frozen=True)
class ViTOptions:
    """Options of ``models.build("vit", ...)`` and ``config.model``.

    Attributes:
      depth: number of transformer blocks.
      embed_dim: embedding width E (the residual stream).
      num_heads: attention heads (``embed_dim`` must be a multiple).
      mlp_dim: the MLP's hidden width (timm: ``mlp_ratio * embed_dim``).
      patch_size: patch size (the image's height and width must be multiples).
      bias: biases in every dense layer (timm's ViTs have them).
      layer_norm_eps: every LayerNorm's epsilon (timm's 1e-6; Hugging Face's ``ViTConfig.layer_norm_eps``
        is 1e-12).

    The names are timm's (``VisionTransformer(embed_dim=..., depth=..., num_heads=...)``).
    """

    depth: int = 2
    embed_dim: int = 64
    num_heads: int = 4
    mlp_dim: int = 128
    patch_size: int = 4
    bias: bool = True
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        check_sizes(self, "vit", ("depth", "embed_dim", "num_heads", "mlp_dim", "patch_size"))
        if not self.layer_norm_eps > 0:
            raise ValueError(f"vit layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


def check_sizes(o, model: str, names: tuple[str, ...]) -> None:
    """Transformer options: every field in ``names`` >= 1, ``embed_dim`` a multiple of ``num_heads`` (ValueError)."""
    for name in names:
        if getattr(o, name) < 1:
            raise ValueError(f"{model} {name} must be >= 1, got {getattr(o, name)}")
    if o.embed_dim % o.num_heads:
        raise ValueError(f"{model} embed_dim {o.embed_dim} must be a multiple of num_heads {o.num_heads}")


def block_plans(b: int) -> tuple[str, str, str]:
    """Plan names of block ``b``: (qk, vo, mlp)."""
    return f"block{b}_qk", f"block{b}_vo", f"block{b}_mlp"


def rotary(x: jnp.ndarray, base: float = 10000.0) -> jnp.ndarray:
    """Rotary position embedding (RoFormer; GPT-NeoX's rotate-half pairing) of (N, T, H, d) queries or keys.

    Dimension i and i + d/2 of every head are rotated together by the angle
    ``t * base ** (-2i / d)`` at position t: fixed pairs with fixed
    frequencies, so a plan may move whole heads but not dimensions within a
    head (``HeadGroup.rigid``).
    """
    _, t, _, d = x.shape
    half = d // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / d)
    angle = jnp.arange(t, dtype=jnp.float32)[:, None] * freq[None, :]  # (T, d/2)
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half: 2 * half]
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)
    return jnp.concatenate([out, x[..., 2 * half:]], axis=-1) if d % 2 else out


class Attention(nn.Module):
    """Multi-head self-attention in Flax's DenseGeneral layout; sows q/k (``qk``) and v / head outputs (``vo``).

    ``causal`` masks future positions (a decoder); ``rope`` rotates queries and
    keys (:func:`rotary`) after they are sown.
    """

    heads: int
    qk_plan: str
    vo_plan: str
    use_bias: bool = True
    causal: bool = False
    rope: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Args: x: (N, T, E). Returns: (N, T, E)."""
        n, t, e = x.shape
        d = e // self.heads
        proj = lambda name: nn.DenseGeneral((self.heads, d), use_bias=self.use_bias, name=name)  # noqa: E731
        q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)  # (N, T, H, d)
        flat = lambda a: a.reshape(n, t, self.heads * d)  # noqa: E731
        sow_acts(self, self.qk_plan, flat(q))
        sow_acts(self, self.qk_plan, flat(k))
        if self.rope:
            q, k = rotary(q), rotary(k)
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / jnp.sqrt(d).astype(x.dtype)
        if self.causal:
            mask = jnp.tril(jnp.ones((t, t), bool))
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        ctx = jnp.einsum("nhqk,nkhd->nqhd", nn.softmax(logits, axis=-1), v)
        sow_acts(self, self.vo_plan, flat(v), flat(ctx))
        return nn.DenseGeneral(e, axis=(-2, -1), use_bias=self.use_bias, name="out")(ctx)


class Mlp(nn.Module):
    """fc1 - GELU - fc2; sows the hidden units."""

    hidden: int
    plan: str
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = nn.Dense(self.hidden, use_bias=self.use_bias, name="fc1")(x)
        g = nn.gelu(h, approximate=False)
        sow_acts(self, self.plan, h, g)
        return nn.Dense(x.shape[-1], use_bias=self.use_bias, name="fc2")(g)


def make_norm(kind: str, name: str, epsilon: float = 1e-6) -> nn.Module:
    """``"layer"``: LayerNorm (scale and bias); ``"rms"``: RMSNorm (scale only)."""
    if kind == "rms":
        return nn.RMSNorm(epsilon=epsilon, name=name)
    if kind == "layer":
        return nn.LayerNorm(epsilon=epsilon, name=name)
    raise ValueError(f"norm must be 'layer' or 'rms', got {kind!r}")


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); sows the stream after each sum."""

    heads: int
    mlp_dim: int
    index: int
    use_bias: bool = True
    causal: bool = False
    rope: bool = False
    norm: str = "layer"
    ln_epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        qk, vo, mlp = block_plans(self.index)
        y = make_norm(self.norm, "norm1", self.ln_epsilon)(x)
        x = x + Attention(self.heads, qk, vo, self.use_bias, self.causal, self.rope, name="attn")(y)
        sow_acts(self, STREAM, x)
        y = make_norm(self.norm, "norm2", self.ln_epsilon)(x)
        x = x + Mlp(self.mlp_dim, mlp, self.use_bias, name="mlp")(y)
        sow_acts(self, STREAM, x)
        return x


class ViT(nn.Module):
    """A small ViT classifier on (N, H, W, C) images; logits from the class token."""

    num_classes: int = 10
    depth: int = 2
    width: int = 64
    heads: int = 4
    mlp_dim: int = 128
    patch: int = 4
    use_bias: bool = True
    layer_norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Args: x: (N, H, W, C). Returns: (N, num_classes) logits."""
        del train  # no dropout
        p = self.patch
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=self.use_bias, name="patch_embed")(x)
        n = x.shape[0]
        x = x.reshape(n, -1, self.width)  # (N, T, E), patches in row-major order
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.width)).astype(x.dtype), x], axis=1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
        x = x + pos
        sow_acts(self, STREAM, x)
        for b in range(self.depth):
            x = Block(self.heads, self.mlp_dim, b, self.use_bias, ln_epsilon=self.layer_norm_eps, name=f"block{b}")(x)
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, name="norm")(x)
        x = nn.Dense(self.num_classes, use_bias=self.use_bias, name="head")(x[:, 0])
        sow_acts(self, "head", x)
        return x


def transformer_block_spec(
    b: int, o, *, bias: bool, norm_bias: bool = True
) -> tuple[dict[str, spec_lib.LeafSpec], tuple[str, ...], dict[str, tuple[str, ...]]]:
    """One pre-norm block ``block{b}`` on the stream plan (ViT and decoder alike): leaves, plans, norm folds.

    ``o`` has ``num_heads`` and ``head_dim``; ``norm_bias`` False for RMSNorm (a scale only).
    """
    qk, vo, mlp = block_plans(b)
    name = f"block{b}"
    folds = {
        f"{name}/norm1": tuple(f"{name}/attn/{p}" for p in ("query", "key", "value")),
        f"{name}/norm2": (f"{name}/mlp/fc1",),
    }
    return {
        **spec_lib.layer_norm(f"{name}/norm1", STREAM, bias=norm_bias),
        **spec_lib.attention(
            f"{name}/attn", STREAM, qk, vo, STREAM, heads=o.num_heads, head_dim=o.head_dim, bias=bias
        ),
        **spec_lib.layer_norm(f"{name}/norm2", STREAM, bias=norm_bias),
        **spec_lib.mlp_block(f"{name}/mlp", STREAM, mlp, STREAM, bias=bias),
    }, (qk, vo, mlp), folds


def stream_sums(leaves: Mapping[str, spec_lib.LeafSpec], start: Sequence[str], depth: int) -> spec_lib.StreamSums:
    """The residual stream's sums of a pre-norm transformer (ViT and decoder alike), in the order they happen.

    Sum 0 adds the layers in ``start`` (the embeddings), sum 2b + 1 block b's attention output, sum 2b + 2 its
    MLP output; each is read by the next norm and the layers after it (after the last: ``norm`` and ``head``).
    ``leaves`` are the spec's leaves (every leaf of these layers on the stream is named).
    """

    def on_stream(*layers: str) -> tuple[str, ...]:  # "params/block0/attn/out/kernel" is layer "block0/attn/out"
        return tuple(p for p, ls in leaves.items() if STREAM in ls.axes and p.split("/", 1)[1].rsplit("/", 1)[0] in layers)

    def readers(b: int, half: int) -> tuple[str, ...]:
        if b == depth:
            return on_stream("norm", "head")
        if half == 0:
            return on_stream(f"block{b}/norm1", *(f"block{b}/attn/{n}" for n in ("query", "key", "value")))
        return on_stream(f"block{b}/norm2", f"block{b}/mlp/fc1")

    sums = [(on_stream(*start), readers(0, 0))]
    for b in range(depth):
        sums.append((on_stream(f"block{b}/attn/out"), readers(b, 1)))
        sums.append((on_stream(f"block{b}/mlp/fc2"), readers(b + 1, 0)))
    return spec_lib.StreamSums(STREAM, sums)


def vit_spec(o: ViTOptions) -> spec_lib.AlignmentSpec:
    """Spec of a ViT: one permutation-only stream plan, a head group and an MLP plan per block."""
    leaves = {
        **spec_lib.conv("patch_embed", None, STREAM, bias=o.bias),
        **spec_lib.embedding("params/cls_token", STREAM, ndim=3),
        **spec_lib.embedding("params/pos_embed", STREAM, ndim=3),
        **spec_lib.layer_norm("norm", STREAM),
        **spec_lib.dense("head", STREAM, "head", bias=o.bias),
    }
    plans, heads, folds = [STREAM], [], {"norm": ("head",)}
    for b in range(o.depth):
        block, (qk, vo, mlp), block_folds = transformer_block_spec(b, o, bias=o.bias)
        leaves.update(block)
        folds.update(block_folds)
        plans += [qk, vo, mlp]
        heads.append(spec_lib.HeadGroup((qk, vo), o.num_heads))
    plans.append("head")
    return spec_lib.AlignmentSpec.build(
        leaves, plans, output_plan="head", heads=heads, permutation_only=[STREAM], folds=folds,
        streams=[stream_sums(leaves, ("patch_embed", "cls_token", "pos_embed"), o.depth)],
    )


def _module(o: ViTOptions, input_shape: tuple[int, int, int], num_classes: int) -> ViT:
    h, w, _ = input_shape
    if h % o.patch_size or w % o.patch_size:
        raise ValueError(f"vit patch_size {o.patch_size} must divide the image size {h}x{w}")
    return ViT(num_classes, o.depth, o.embed_dim, o.num_heads, o.mlp_dim, o.patch_size, o.bias, o.layer_norm_eps)


def _scale_width(o: ViTOptions, factor: float) -> ViTOptions:
    """Wider parents widen the MLP only: the stream is permutation-only and heads keep their size."""
    return dataclasses.replace(o, mlp_dim=max(1, int(round(o.mlp_dim * factor))))


RECORD = ModelRecord(
    name="vit",
    options=ViTOptions,
    module=_module,
    spec=lambda o, input_shape: vit_spec(o),
    has_bias=lambda o: o.bias,
    scale_width=_scale_width,
    example_input_shape=(8, 8, 1),
    examples=(
        ViTOptions(depth=1, embed_dim=8, num_heads=2, mlp_dim=6, patch_size=4),
        ViTOptions(depth=2, embed_dim=6, num_heads=3, mlp_dim=4, patch_size=2, bias=False),
    ),
)
