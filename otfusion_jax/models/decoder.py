"""A decoder-only transformer (GPT-style language model) and its alignment spec.

Tokens ``(N, T)`` -> next-token logits ``(N, T, vocab)``: a token embedding
``embed/embedding`` ``(vocab, E)``, learned positions ``pos_embed`` ``(1, max_len, E)``
or rotary ones, pre-norm blocks (LayerNorm or RMSNorm) with causal multi-head
attention and a GELU MLP, a final norm and an untied ``head`` ``(E, vocab)``.

The spec is the ViT's (:mod:`otfusion_jax.models.vit`): one permutation-only
stream plan ``res`` (the embeddings, every attention / MLP output projection,
every norm), a head group per block, an MLP plan per block, and the vocabulary
as the output plan (kept in place). With rotary positions the Q/K plans are
rigid within heads (``HeadGroup.rigid``): rotary embeddings pair fixed
dimensions with fixed frequencies, so only whole heads may move.

It is not in the image-model registry (its inputs are tokens); build it with
:func:`build_decoder`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from otfusion_jax import spec as spec_lib
from otfusion_jax.models.common import sow_acts
from otfusion_jax.models.vit import STREAM, Block, check_sizes, make_norm, stream_sums, transformer_block_spec

__all__ = ["Decoder", "DecoderOptions", "decoder_spec", "build_decoder", "init_decoder"]


@dataclasses.dataclass(frozen=True)
class DecoderOptions:
    """Options of a decoder-only transformer.

    Attributes:
      vocab_size: tokens in the vocabulary.
      max_len: longest sequence (the learned position table's length).
      depth: number of blocks.
      embed_dim: residual stream width E.
      num_heads: attention heads (``embed_dim`` must be a multiple).
      mlp_dim: MLP hidden width.
      positions: "learned" (a position table added to the embeddings) or "rotary".
      norm: "layer" (LayerNorm) or "rms" (RMSNorm).
      bias: biases in the dense layers.
    """

    vocab_size: int = 64
    max_len: int = 32
    depth: int = 2
    embed_dim: int = 32
    num_heads: int = 4
    mlp_dim: int = 64
    positions: str = "learned"
    norm: str = "layer"
    bias: bool = True

    def __post_init__(self):
        check_sizes(self, "decoder", ("vocab_size", "max_len", "depth", "embed_dim", "num_heads", "mlp_dim"))
        if self.positions not in ("learned", "rotary"):
            raise ValueError(f"decoder positions must be 'learned' or 'rotary', got {self.positions!r}")
        if self.norm not in ("layer", "rms"):
            raise ValueError(f"decoder norm must be 'layer' or 'rms', got {self.norm!r}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


class Decoder(nn.Module):
    """Causal language model; sows the stream, every block's plans and the logits like the ViT."""

    options: DecoderOptions
    use_bias: bool = True

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Args: tokens: (N, T) ints. Returns: (N, T, vocab) logits."""
        del train
        o = self.options
        x = nn.Embed(o.vocab_size, o.embed_dim, name="embed")(tokens)
        if o.positions == "learned":
            pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, o.max_len, o.embed_dim))
            x = x + pos[:, : tokens.shape[1]]
        sow_acts(self, STREAM, x)
        for b in range(o.depth):
            x = Block(o.num_heads, o.mlp_dim, b, self.use_bias, causal=True, rope=o.positions == "rotary",
                      norm=o.norm, name=f"block{b}")(x)
        x = make_norm(o.norm, "norm")(x)
        x = nn.Dense(o.vocab_size, use_bias=self.use_bias, name="head")(x)
        sow_acts(self, "head", x)
        return x


def decoder_spec(o: DecoderOptions) -> spec_lib.AlignmentSpec:
    """Spec of a decoder: the ViT's structure; rotary positions make the Q/K plans rigid within heads."""
    norm_bias = o.norm == "layer"
    leaves = {
        **spec_lib.embedding("params/embed/embedding", STREAM, ndim=2),
        **spec_lib.layer_norm("norm", STREAM, bias=norm_bias),
        **spec_lib.dense("head", STREAM, "head", bias=o.bias),
    }
    if o.positions == "learned":
        leaves.update(spec_lib.embedding("params/pos_embed", STREAM, ndim=3))
    plans, heads, folds = [STREAM], [], {"norm": ("head",)}
    for b in range(o.depth):
        block, (qk, vo, mlp), block_folds = transformer_block_spec(b, o, bias=o.bias, norm_bias=norm_bias)
        leaves.update(block)
        folds.update(block_folds)
        plans += [qk, vo, mlp]
        heads.append(spec_lib.HeadGroup((qk, vo), o.num_heads, rigid=(qk,) if o.positions == "rotary" else ()))
    plans.append("head")
    return spec_lib.AlignmentSpec.build(
        leaves, plans, output_plan="head", heads=heads, permutation_only=[STREAM], folds=folds,
        streams=[stream_sums(leaves, ("embed", "pos_embed"), o.depth)],
    )


def build_decoder(**options) -> tuple[Decoder, spec_lib.AlignmentSpec]:
    """(module, spec) of a decoder with the given :class:`DecoderOptions` fields."""
    o = DecoderOptions(**options)
    return Decoder(o, use_bias=o.bias), decoder_spec(o)


def init_decoder(module: Decoder, rng: jax.Array, length: int = 8) -> dict:
    """Initial variables of a decoder (sequences of ``length`` tokens)."""
    variables = module.init(rng, jnp.zeros((1, length), jnp.int32))
    return {k: v for k, v in variables.items() if k == "params"}
