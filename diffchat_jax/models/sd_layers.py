"""Layers the Stable Diffusion UNet and VAE share, as diffusers builds them (NHWC inside), and their attention."""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def conv(features: int, dtype, kernel: int = 3, **kwargs) -> nn.Conv:
    """A diffusers Conv2d: `same` padding (kernel // 2 on every side) unless given; stride 2 halves, rounding up."""
    kwargs.setdefault("padding", kernel // 2)
    return nn.Conv(features, (kernel, kernel), dtype=dtype, **kwargs)


# Normalisation in bf16: flax computes the statistics and the normalisation itself in float32
# (force_float32_reductions, the default) and only casts the result to `dtype`; mean and variance over 64x64x10
# values in bf16 would lose most of their digits. use_fast_variance=False: the two-pass variance, as torch does
# (E[x^2] - E[x]^2 cancels badly for the large activations of the up blocks).
def group_norm(groups: int, epsilon: float, dtype, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(groups, epsilon=epsilon, use_fast_variance=False, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D: [B, H, W, C_in] (+ a time embedding [B, E] in the UNet; none in the VAE) ->
    [B, H, W, out_channels]."""
    out_channels: int
    groups: int
    epsilon: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        norm = lambda name: group_norm(self.groups, self.epsilon, self.dtype, name)
        h = conv(self.out_channels, self.dtype, name="conv1")(nn.silu(norm("norm1")(x)))
        if temb is not None:
            h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None]
        h = conv(self.out_channels, self.dtype, name="conv2")(nn.silu(norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, self.dtype, kernel=1, name="conv_shortcut")(x)
        return x + h


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention with float32 scores: q [B, T, N, D], k and v [B, S, N, D] -> [B, T, N, D] (v's dtype).

    On CPU the scores are computed a head and a block of queries at a time (at most 2^22 entries per block, the
    batch inside), so they stay in cache: XLA:CPU otherwise writes the whole [B, N, T, S] matrix to memory and
    reads it back for the softmax, 8-12x slower at Stable Diffusion's sizes. Elsewhere jax.nn.dot_product_attention
    (fused kernels on GPUs).
    """
    return jax.lax.platform_dependent(q, k, v, cpu=_blocked_attention, default=jax.nn.dot_product_attention)


def _blocked_attention(q, k, v, max_scores: int = 1 << 22):
    batch, length, heads, dim = q.shape
    block = length
    while batch * block * k.shape[1] > max_scores and block % 2 == 0:
        block //= 2
    queries = q.reshape(batch, length // block, block, heads, dim).transpose(3, 1, 0, 2, 4)  # [N, T/c, B, c, D]
    keys, values = (a.transpose(2, 0, 1, 3) for a in (k, v))  # [N, B, S, D]

    def head(args):
        qs, k, v = args

        def query_block(q):
            scores = jnp.einsum("bcd,bsd->bcs", q, k, preferred_element_type=jnp.float32) / math.sqrt(dim)
            return jnp.einsum("bcs,bsd->bcd", jax.nn.softmax(scores, -1).astype(v.dtype), v)

        return jax.lax.map(query_block, qs)

    out = jax.lax.map(head, (queries, keys, values))  # [N, T/c, B, c, D]
    return out.transpose(2, 1, 3, 0, 4).reshape(batch, length, heads, dim)
