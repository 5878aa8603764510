"""Layers the Stable Diffusion UNet and VAE share, as diffusers builds them (NHWC inside)."""
from typing import Any

import flax.linen as nn
import jax


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
