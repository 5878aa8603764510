"""The UNet of Stable Diffusion 1.x in flax.linen, numerically matching diffusers' `UNet2DConditionModel`.

SD 1.5, Deliberate, Dreamlike-photoreal 2.0 and Realistic Vision share this architecture; SD 2.x's (per-block
head counts, linear transformer projections) is supported too. The sample and the noise prediction cross the
boundary in the diffusers layout ([B, C, H, W]); inside everything is NHWC. The param tree mirrors the diffusers
state dict, so conversion is a renaming (Conv kernel = torch weight as HWIO, Dense kernel = torch weight.T, norm
weight = scale; `blocks.{i}` becomes `blocks_{i}`):

    conv_in, time_embedding/{linear_1, linear_2}, conv_norm_out/{scale,bias}, conv_out
    {down_blocks_{i}, up_blocks_{i}, mid_block}/resnets_{j}/{norm1, conv1, time_emb_proj, norm2, conv2,
        conv_shortcut}                                   (shortcut iff C_in != C_out)
    .../attentions_{j}/{norm, proj_in, proj_out}         (CrossAttn blocks and the mid block)
    .../attentions_{j}/transformer_blocks_0/{norm1, attn1, norm2, attn2, norm3}, attn{1,2}/{to_q, to_k, to_v,
        to_out_0}, ff/{net_0/proj, net_2}
    down_blocks_{i}/downsamplers_0/conv, up_blocks_{i}/upsamplers_0/conv   (all levels but the last)

Deterministic (no dropout). `UNet.__call__` is jittable: only shapes steer Python control flow.
"""
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffchat_jax.models import hf_io, sd_layers

_CROSS_DOWN, _DOWN, _CROSS_UP, _UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
# diffusers' Transformer2DModel: its GroupNorm has a fixed eps, its LayerNorms their own default (not norm_eps).
_TRANSFORMER_GROUP_NORM_EPS = 1e-6
_TRANSFORMER_LAYER_NORM_EPS = 1e-5
# Config keys whose other values change the architecture beyond SD 1.x / 2.x -> the values we support (the first
# is diffusers' default). A list passes when all its entries do (per-block settings).
_SUPPORTED = {
    "center_input_sample": (False,), "mid_block_type": ("UNetMidBlock2DCrossAttn",), "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False), "downsample_padding": (1,), "mid_block_scale_factor": (1,),
    "act_fn": ("silu", "swish"), "transformer_layers_per_block": (1,), "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "num_attention_heads": (None,),
    "dual_cross_attention": (False,), "class_embed_type": (None,), "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,), "num_class_embeds": (None,), "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1,), "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "cross_attention_norm": (None,),
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """diffusers UNet2DConditionModel field names and defaults: SD 1.x's layout, but cross_attention_dim 1280 as
    diffusers (SD 1.x configs say 768) and sample_size SD 1.5's 64 (diffusers: None).

    attention_head_dim: despite its name, the NUMBER OF HEADS of each down block's transformers (an int for all,
        or one per block); diffusers reads it so when `num_attention_heads` is null, which every SD config is.
        Up blocks use the list reversed, the mid block the last entry; head width = channels // heads.
    dtype: compute dtype (activations, convs, matmuls); params keep their own. GroupNorm/LayerNorm statistics,
        the attention softmax and the timestep embedding are float32; the output is float32.
    """
    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (_CROSS_DOWN,) * 3 + (_DOWN,)
    up_block_types: tuple[str, ...] = (_UP,) + (_CROSS_UP,) * 3
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8
    cross_attention_dim: int = 1280
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    use_linear_projection: bool = False
    dtype: Any = jnp.float32

    @property
    def num_heads(self) -> tuple[int, ...]:
        """Attention heads per down block (see attention_head_dim)."""
        heads = self.attention_head_dim
        return (heads,) * len(self.block_out_channels) if isinstance(heads, int) else heads

    @classmethod
    def from_diffusers(cls, config: dict) -> "UNetConfig":
        """From a unet/config.json dict. Keys we do not use (dropout, upcast_attention, versions, ...) are
        ignored; anything that changes the architecture beyond SD 1.x / 2.x (class or addition embeddings, SDXL's
        transformer depths, other block types, ...) raises naming the key."""
        if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
            raise ValueError(f"_class_name {config['_class_name']!r} not supported (only UNet2DConditionModel)")
        for key, supported in _SUPPORTED.items():
            value = config.get(key, supported[0])
            values = value if isinstance(value, (list, tuple)) else [value]
            if not values or any(v not in supported for v in values):
                allowed = " or ".join(map(repr, supported))
                raise ValueError(f"UNet config {key}={value!r} not supported (only {allowed})")
        fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
        if kwargs.get("sample_size") is None:
            kwargs.pop("sample_size", None)
        out = cls(**kwargs)
        levels = len(out.block_out_channels)
        for key, allowed in (("down_block_types", (_CROSS_DOWN, _DOWN)), ("up_block_types", (_CROSS_UP, _UP))):
            types = getattr(out, key)
            if len(types) != levels or any(t not in allowed for t in types):
                raise ValueError(f"UNet config {key}={list(types)} not supported: need {levels} blocks (one per "
                                 f"block_out_channels) of {' / '.join(allowed)}")
        for key in ("layers_per_block", "cross_attention_dim", "norm_num_groups"):
            if not isinstance(getattr(out, key), int):
                raise ValueError(f"UNet config {key}={getattr(out, key)!r} not supported (only one int)")
        heads = out.attention_head_dim
        if not (isinstance(heads, int) or isinstance(heads, tuple) and len(heads) == levels
                and all(isinstance(h, int) for h in heads)):
            raise ValueError(f"UNet config attention_head_dim={out.attention_head_dim!r} not supported: need an "
                             f"int or {levels} ints")
        return out


def _group_norm(config: UNetConfig, name: str, epsilon: float | None = None) -> nn.GroupNorm:
    return sd_layers.group_norm(config.norm_num_groups, config.norm_eps if epsilon is None else epsilon,
                                config.dtype, name)


def _resnet(config: UNetConfig, out_channels: int, name: str) -> sd_layers.ResnetBlock:
    return sd_layers.ResnetBlock(out_channels, config.norm_num_groups, config.norm_eps, config.dtype, name=name)


def _layer_norm(config: UNetConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=_TRANSFORMER_LAYER_NORM_EPS, use_fast_variance=False, dtype=config.dtype, name=name)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """diffusers' get_timestep_embedding: [B] float -> [B, dim] float32 sinusoids at frequencies
    10000^(-k / (dim / 2 - freq_shift)), k < dim / 2; [cos, sin] if flip_sin_to_cos else [sin, cos]."""
    half = dim // 2
    # The same float32 operations in the same order as diffusers: large timesteps magnify any rounding difference.
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    """The MLP on the sinusoids: [B, C0] -> [B, 4 * C0]."""
    config: UNetConfig

    @nn.compact
    def __call__(self, x):
        width = 4 * self.config.block_out_channels[0]
        x = nn.silu(nn.Dense(width, dtype=self.config.dtype, name="linear_1")(x))
        return nn.Dense(width, dtype=self.config.dtype, name="linear_2")(x)


class Attention(nn.Module):
    """Multi-head attention of x [B, T, C] over context [B, S, D] (x itself when None) -> [B, T, C]."""
    config: UNetConfig
    num_heads: int

    @nn.compact
    def __call__(self, x, context=None):
        dtype = self.config.dtype
        batch, length, channels = x.shape
        head_dim = channels // self.num_heads
        context = x if context is None else context
        q, k, v = (nn.Dense(self.num_heads * head_dim, use_bias=False, dtype=dtype, name=f"to_{p}")(inp)
                   .reshape(inp.shape[0], inp.shape[1], self.num_heads, head_dim)
                   for p, inp in (("q", x), ("k", context), ("v", context)))
        # Scores and softmax in float32 whatever the dtype (what diffusers' upcast_attention asks for).
        out = sd_layers.attention(q, k, v).reshape(batch, length, self.num_heads * head_dim)
        return nn.Dense(channels, dtype=dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    """[B, T, C] -> [B, T, 4C]: one half of a projection gated by the exact GELU of the other."""
    config: UNetConfig

    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(nn.Dense(8 * x.shape[-1], dtype=self.config.dtype, name="proj")(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers FeedForward with GEGLU: [B, T, C] -> [B, T, C] (net_1 is a dropout)."""
    config: UNetConfig

    @nn.compact
    def __call__(self, x):
        h = GEGLU(self.config, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.config.dtype, name="net_2")(h)


class TransformerBlock(nn.Module):
    """diffusers BasicTransformerBlock: pre-LN self-attention, cross-attention, feed-forward, each residual."""
    config: UNetConfig
    num_heads: int

    @nn.compact
    def __call__(self, x, context):
        """x [B, T, C], context [B, S, D] -> [B, T, C]."""
        cfg = self.config
        x = x + Attention(cfg, self.num_heads, name="attn1")(_layer_norm(cfg, "norm1")(x))
        x = x + Attention(cfg, self.num_heads, name="attn2")(_layer_norm(cfg, "norm2")(x), context)
        return x + FeedForward(cfg, name="ff")(_layer_norm(cfg, "norm3")(x))


class Transformer2D(nn.Module):
    """diffusers Transformer2DModel (continuous input, one block): GroupNorm, proj_in, a transformer block over
    the H*W positions, proj_out, residual. [B, H, W, C], context [B, S, D] -> [B, H, W, C]."""
    config: UNetConfig
    num_heads: int

    @nn.compact
    def __call__(self, x, context):
        cfg = self.config
        batch, height, width, channels = x.shape
        inner = self.num_heads * (channels // self.num_heads)

        def proj(features, name):
            # A 1x1 conv and a linear layer are the same map on NHWC; they differ in the checkpoint's shapes.
            if cfg.use_linear_projection:
                return nn.Dense(features, dtype=cfg.dtype, name=name)
            return sd_layers.conv(features, cfg.dtype, kernel=1, name=name)

        h = _group_norm(cfg, "norm", epsilon=_TRANSFORMER_GROUP_NORM_EPS)(x)
        h = proj(inner, "proj_in")(h).reshape(batch, height * width, inner)
        h = TransformerBlock(cfg, self.num_heads, name="transformer_blocks_0")(h, context)
        return x + proj(channels, "proj_out")(h.reshape(batch, height, width, inner))


class Downsample(nn.Module):
    """Stride-2 conv with padding 1: [B, H, W, C] -> [B, ceil(H / 2), ceil(W / 2), C]."""
    config: UNetConfig

    @nn.compact
    def __call__(self, x):
        return sd_layers.conv(x.shape[-1], self.config.dtype, strides=2, name="conv")(x)


def _nearest_resize(x, size: tuple[int, int]):
    """torch's F.interpolate(mode="nearest") of [B, H, W, C] to [B, *size, C]: output row i reads input row
    floor(i * H / size[0]) (float32 arithmetic, as torch), likewise columns."""
    for axis, out in zip((1, 2), size):
        n = x.shape[axis]
        if out == 2 * n:  # the usual case: a repeat, whose gradient is cheaper than a gather's
            x = jnp.repeat(x, 2, axis=axis)
        else:  # diffusers' upsample_size, for samples whose sides are not multiples of the total downscale
            rows = np.floor(np.arange(out, dtype=np.float32) * (np.float32(n) / np.float32(out))).astype(np.int32)
            x = jnp.take(x, np.minimum(rows, n - 1), axis=axis)
    return x


class Upsample(nn.Module):
    """Nearest resize (x2, or to the size of the skip connection it meets) then a conv."""
    config: UNetConfig

    @nn.compact
    def __call__(self, x, size: tuple[int, int]):
        """x [B, h, w, C], size (H, W) -> [B, H, W, C]."""
        return sd_layers.conv(x.shape[-1], self.config.dtype, name="conv")(_nearest_resize(x, size))


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (num_heads set) or DownBlock2D (num_heads None), downsampling unless the last level."""
    config: UNetConfig
    out_channels: int
    num_heads: int | None
    add_downsample: bool

    @nn.compact
    def __call__(self, x, temb, context):
        """x [B, H, W, C_in] -> (x [B, H', W', out_channels], skips: the output of every layer and the
        downsampler, for the up blocks)."""
        skips = []
        for j in range(self.config.layers_per_block):
            x = _resnet(self.config, self.out_channels, f"resnets_{j}")(x, temb)
            if self.num_heads is not None:
                x = Transformer2D(self.config, self.num_heads, name=f"attentions_{j}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample(self.config, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (num_heads set) or UpBlock2D: each layer takes the last skip connection (concatenated
    on channels), then an upsampler to `upsample_size` unless it is None (the last level)."""
    config: UNetConfig
    out_channels: int
    num_heads: int | None

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size):
        """x [B, h, w, C], skips: layers_per_block + 1 arrays [B, h, w, C_j], consumed last first."""
        for j, skip in enumerate(reversed(skips)):
            x = _resnet(self.config, self.out_channels, f"resnets_{j}")(
                jnp.concatenate([x, skip], axis=-1), temb)
            if self.num_heads is not None:
                x = Transformer2D(self.config, self.num_heads, name=f"attentions_{j}")(x, context)
        if upsample_size is not None:
            x = Upsample(self.config, name="upsamplers_0")(x, upsample_size)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""
    config: UNetConfig

    @nn.compact
    def __call__(self, x, temb, context):
        cfg, channels = self.config, x.shape[-1]
        x = _resnet(cfg, channels, "resnets_0")(x, temb)
        x = Transformer2D(cfg, cfg.num_heads[-1], name="attentions_0")(x, context)
        return _resnet(cfg, channels, "resnets_1")(x, temb)


class UNet(nn.Module):
    """The noise-prediction UNet: `module.apply({"params": params}, sample, timestep, encoder_hidden_states)`."""
    config: UNetConfig

    @nn.compact
    def __call__(self, sample, timestep, encoder_hidden_states):
        """sample [B, in_channels, H, W]; timestep: a scalar or [B], int or float; encoder_hidden_states
        [B, T, cross_attention_dim] -> noise prediction [B, out_channels, H, W] float32.

        H, W need not be multiples of the total downscale: upsamplers then resize to the skip connections' sizes,
        as diffusers does.
        """
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample must be [B, {cfg.in_channels}, H, W] (channels first), got {sample.shape}")
        batch = sample.shape[0]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[::2] != (batch, cfg.cross_attention_dim):
            raise ValueError(f"encoder_hidden_states must be [{batch}, T, {cfg.cross_attention_dim}], "
                             f"got {encoder_hidden_states.shape}")
        timesteps = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (batch,))
        temb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(cfg, name="time_embedding")(temb.astype(cfg.dtype))
        context = encoder_hidden_states.astype(cfg.dtype)

        x = sample.transpose(0, 2, 3, 1).astype(cfg.dtype)
        x = sd_layers.conv(cfg.block_out_channels[0], cfg.dtype, name="conv_in")(x)
        skips = [x]
        levels = len(cfg.block_out_channels)
        for i, (kind, channels) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels)):
            heads = cfg.num_heads[i] if kind == _CROSS_DOWN else None
            x, block_skips = DownBlock(cfg, channels, heads, i < levels - 1, name=f"down_blocks_{i}")(x, temb, context)
            skips += block_skips
        x = MidBlock(cfg, name="mid_block")(x, temb, context)
        for i, (kind, channels) in enumerate(zip(cfg.up_block_types, cfg.block_out_channels[::-1])):
            block_skips, skips = skips[-(cfg.layers_per_block + 1):], skips[:-(cfg.layers_per_block + 1)]
            heads = cfg.num_heads[::-1][i] if kind == _CROSS_UP else None
            upsample_size = skips[-1].shape[1:3] if i < levels - 1 else None
            x = UpBlock(cfg, channels, heads, name=f"up_blocks_{i}")(x, block_skips, temb, context, upsample_size)
        x = nn.silu(_group_norm(cfg, "conv_norm_out")(x))
        x = sd_layers.conv(cfg.out_channels, cfg.dtype, name="conv_out")(x)
        return x.astype(jnp.float32).transpose(0, 3, 1, 2)


def init_params(config: UNetConfig, rng: jax.Array):
    """Random params (flax default initialisers), float32."""
    size = 2 ** (len(config.block_out_channels) - 1)
    sample = jnp.zeros((1, config.in_channels, size, size))
    return UNet(config).init(rng, sample, 0, jnp.zeros((1, 1, config.cross_attention_dim)))["params"]


# ----------------------------------------------------------------------------------------------------------
# diffusers state dict <-> Flax params.
# ----------------------------------------------------------------------------------------------------------
# The module lists of the diffusers UNet: `resnets.0` <-> `resnets_0`. Not every `_{digit}` is an index
# (time_embedding.linear_1).
_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers", "upsamplers",
          "to_out", "net")


def _path_to_key(path: tuple[str, ...]) -> str:
    """('down_blocks_0', 'downsamplers_0', 'conv', 'kernel') -> 'down_blocks.0.downsamplers.0.conv.weight'."""
    return hf_io.diffusers_path_to_key(path, _LISTS)


def diffusers_to_params(state: dict[str, np.ndarray]) -> dict:
    """diffusers UNet2DConditionModel state dict -> nested Flax params (numpy, the state's dtypes)."""
    return hf_io.torch_to_flax_params(state, lambda key: hf_io.diffusers_key_to_path(key, _LISTS,
                                                                                     "UNet2DConditionModel"))


def params_to_diffusers(params) -> dict[str, np.ndarray]:
    """Flax params -> the diffusers UNet2DConditionModel state dict (contiguous numpy, the params' dtypes)."""
    return hf_io.flax_to_torch_state(params, _path_to_key)


def from_state(config_dict: dict, state: dict[str, np.ndarray], dtype=jnp.float32, compute_dtype=None):
    """A unet config.json dict and a diffusers-named state dict -> (UNet, params).

    state None: abstract params (jax.ShapeDtypeStructs; shapes only, for the memory report).
    Params are cast to `dtype`, also the compute dtype unless `compute_dtype` is given. Raises naming the
    missing, unexpected or mis-shaped tensors by their checkpoint names.
    """
    config = dataclasses.replace(UNetConfig.from_diffusers(config_dict), dtype=compute_dtype or dtype)
    params = hf_io.checked_params(None if state is None else diffusers_to_params(state), lambda: init_params(config, jax.random.key(0)),
                                  _path_to_key, "UNet2DConditionModel", dtype)
    return UNet(config), params


def load_pretrained(path_or_id: str, dtype=jnp.float32, compute_dtype=None):
    """A diffusers UNet2DConditionModel folder, or a pipeline folder with one in unet/ (local or hub id) ->
    (UNet, params). Reads config.json and diffusion_pytorch_model.safetensors (or sharded)."""
    return from_state(*hf_io.read_diffusers_model(path_or_id, "unet"), dtype, compute_dtype)
