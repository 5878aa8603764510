"""The AutoencoderKL (VAE) of Stable Diffusion 1.x in flax.linen, numerically matching diffusers' `AutoencoderKL`.

Images and latents cross the boundary in the diffusers layout ([B, C, H, W]); inside everything is NHWC. The param
tree mirrors the diffusers state dict, so conversion is a renaming (Conv kernel = torch weight as HWIO, Dense
kernel = torch weight.T, GroupNorm weight = scale; `blocks.{i}` becomes `blocks_{i}`):

    encoder/{conv_in, conv_out}, encoder/conv_norm_out/{scale,bias}
    encoder/down_blocks_{i}/resnets_{j}/{norm1, conv1, norm2, conv2, conv_shortcut}   (shortcut iff C_in != C_out)
    encoder/down_blocks_{i}/downsamplers_0/conv                                       (all levels but the last)
    {encoder,decoder}/mid_block/{resnets_0, attentions_0/{group_norm, to_q, to_k, to_v, to_out_0}, resnets_1}
    decoder/{conv_in, conv_norm_out, conv_out}, decoder/up_blocks_{i}/{resnets_{j}, upsamplers_0/conv}
    quant_conv, post_quant_conv   (unless the config turns them off)

`encode` returns the mean and clipped log-variance of the latent Gaussian (unscaled: multiply by `scaling_factor`
for the diffusion model), `decode` takes unscaled latents. Deterministic: sampling is the caller's business.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffchat_jax.models import hf_io, sd_layers

_EPS = 1e-6  # every GroupNorm of the diffusers VAE
# Attention names of diffusers checkpoints saved before 0.14 (still on the hub), as diffusers renames them on load.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers AutoencoderKL field names and defaults (SD 1.x: block_out_channels (128, 256, 512, 512),
    layers_per_block 2, norm_num_groups 32).

    dtype: compute dtype (activations, convs); params keep their own. GroupNorm statistics and the attention
        softmax are float32; encode / decode return float32.
    """
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    dtype: Any = jnp.float32

    @classmethod
    def from_diffusers(cls, config: dict) -> "VAEConfig":
        """From a vae/config.json dict. Keys we do not use (sample_size, force_upcast, latents_mean, ...) are
        ignored; architectures other than SD's (other block types, activations) raise naming the key."""
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"_class_name {config['_class_name']!r} not supported (only AutoencoderKL)")
        if config.get("act_fn", "silu") not in ("silu", "swish"):  # the same function in diffusers
            raise ValueError(f"act_fn {config['act_fn']!r} not supported (only silu)")
        fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
        kwargs = {k: v for k, v in config.items() if k in fields}
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        out = cls(**kwargs)
        levels = len(out.block_out_channels)
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(config.get(key, (block,)))
            if types != (block,) * levels:
                raise ValueError(f"{key} {types} not supported: need {levels} x {block} (one per block_out_channels)")
        return out


def latent_downscale(config: VAEConfig) -> int:
    """Image pixels per latent pixel along each side (8 for SD)."""
    return 2 ** (len(config.block_out_channels) - 1)


def _group_norm(config: VAEConfig, name: str) -> nn.GroupNorm:
    return sd_layers.group_norm(config.norm_num_groups, _EPS, config.dtype, name)


def _resnet(config: VAEConfig, out_channels: int, name: str) -> sd_layers.ResnetBlock:
    return sd_layers.ResnetBlock(out_channels, config.norm_num_groups, _EPS, config.dtype, name=name)


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions with a GroupNorm in front and a residual:
    [B, H, W, C] -> [B, H, W, C]."""
    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        batch, height, width, channels = x.shape
        h = _group_norm(cfg, "group_norm")(x).reshape(batch, height * width, channels)
        q, k, v = (nn.Dense(channels, dtype=cfg.dtype, name=f"to_{p}")(h)[:, :, None] for p in "qkv")  # one head
        out = nn.Dense(channels, dtype=cfg.dtype, name="to_out_0")(sd_layers.attention(q, k, v)[:, :, 0])
        return x + out.reshape(x.shape)


class MidBlock(nn.Module):
    """diffusers UNetMidBlock2D as the VAE uses it: resnet, attention (unless turned off), resnet."""
    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        x = _resnet(self.config, channels, "resnets_0")(x)
        if self.config.mid_block_add_attention:
            x = Attention(self.config, name="attentions_0")(x)
        return _resnet(self.config, channels, "resnets_1")(x)


class Downsample(nn.Module):
    """[B, H, W, C] -> [B, ceil(H / 2), ceil(W / 2), C]."""
    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        # diffusers pads one row/column at the bottom/right only, then convolves with stride 2 and no padding.
        return sd_layers.conv(x.shape[-1], self.config.dtype, strides=2, padding=((0, 1), (0, 1)), name="conv")(x)


class Upsample(nn.Module):
    """Nearest x2 then a conv: [B, H, W, C] -> [B, 2H, 2W, C]."""
    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return sd_layers.conv(x.shape[-1], self.config.dtype, name="conv")(x)


_RESAMPLERS = {"down": (Downsample, "downsamplers_0"), "up": (Upsample, "upsamplers_0")}


class Block(nn.Module):
    """DownEncoderBlock2D (resample "down") or UpDecoderBlock2D ("up"): `num_layers` resnets to `out_channels`,
    then the resampler; resample None on the last level."""
    config: VAEConfig
    out_channels: int
    num_layers: int
    resample: str | None

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = _resnet(self.config, self.out_channels, f"resnets_{j}")(x)
        if self.resample is not None:
            resampler, name = _RESAMPLERS[self.resample]
            x = resampler(self.config, name=name)(x)
        return x


def _head(config: VAEConfig, x, out_channels: int):
    """conv_norm_out, SiLU, conv_out: the last layers of both the encoder and the decoder."""
    x = nn.silu(_group_norm(config, "conv_norm_out")(x))
    return sd_layers.conv(out_channels, config.dtype, name="conv_out")(x)


class Encoder(nn.Module):
    """[B, H, W, in_channels] -> moments [B, H / f, W / f, 2 * latent_channels] (f = latent_downscale)."""
    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        levels = cfg.block_out_channels
        x = sd_layers.conv(levels[0], cfg.dtype, name="conv_in")(x)
        for i, channels in enumerate(levels):
            resample = "down" if i < len(levels) - 1 else None
            x = Block(cfg, channels, cfg.layers_per_block, resample, name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg, name="mid_block")(x)
        return _head(cfg, x, 2 * cfg.latent_channels)


class Decoder(nn.Module):
    """[B, h, w, latent_channels] -> [B, h * f, w * f, out_channels]."""
    config: VAEConfig

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        levels = cfg.block_out_channels[::-1]
        x = sd_layers.conv(levels[0], cfg.dtype, name="conv_in")(z)
        x = MidBlock(cfg, name="mid_block")(x)
        for i, channels in enumerate(levels):
            resample = "up" if i < len(levels) - 1 else None
            x = Block(cfg, channels, cfg.layers_per_block + 1, resample, name=f"up_blocks_{i}")(x)
        return _head(cfg, x, cfg.out_channels)


def _check_channels(x, channels: int, what: str):
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{what} must be [B, {channels}, H, W] (channels first), got {x.shape}")


class AutoencoderKL(nn.Module):
    """encode / decode as diffusers' AutoencoderKL (`module.apply(variables, x, method=module.decode)`)."""
    config: VAEConfig

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        conv = lambda features, used: sd_layers.conv(features, cfg.dtype, kernel=1) if used else None
        self.quant_conv = conv(2 * cfg.latent_channels, cfg.use_quant_conv)
        self.post_quant_conv = conv(cfg.latent_channels, cfg.use_post_quant_conv)

    def encode(self, images):
        """images [B, in_channels, H, W] in [-1, 1] -> (mean, logvar), each [B, latent_channels, H / f, W / f]
        float32; logvar clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution."""
        _check_channels(images, self.config.in_channels, "images")
        moments = self.encoder(images.transpose(0, 2, 3, 1).astype(self.config.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32).transpose(0, 3, 1, 2), 2, axis=1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents):
        """Unscaled latents [B, latent_channels, h, w] -> images [B, out_channels, h * f, w * f] float32 (about
        [-1, 1], not clipped)."""
        _check_channels(latents, self.config.latent_channels, "latents")
        z = latents.transpose(0, 2, 3, 1).astype(self.config.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32).transpose(0, 3, 1, 2)

    def __call__(self, images):
        """Reconstruction from the mean latent: [B, in_channels, H, W] -> [B, out_channels, H, W] (used by init)."""
        return self.decode(self.encode(images)[0])


def init_params(config: VAEConfig, rng: jax.Array):
    """Random params (flax default initialisers), float32. Jitted: eager init takes half a minute on a CPU."""
    size = latent_downscale(config)
    images = jnp.zeros((1, config.in_channels, size, size))
    return jax.jit(lambda key: AutoencoderKL(config).init(key, images)["params"])(rng)


# ----------------------------------------------------------------------------------------------------------
# diffusers state dict <-> Flax params.
# ----------------------------------------------------------------------------------------------------------
_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out")


def _path_to_key(path: tuple[str, ...]) -> str:
    """('decoder', 'up_blocks_1', 'upsamplers_0', 'conv', 'kernel') ->
    'decoder.up_blocks.1.upsamplers.0.conv.weight'."""
    return hf_io.diffusers_path_to_key(path, _LISTS)


def diffusers_to_params(state: dict[str, np.ndarray]) -> dict:
    """diffusers AutoencoderKL state dict (legacy attention names too) -> nested Flax params (numpy)."""
    return hf_io.torch_to_flax_params(state, lambda key: hf_io.diffusers_key_to_path(
        key, _LISTS, "AutoencoderKL", renames=_LEGACY_ATTENTION))


def params_to_diffusers(params) -> dict[str, np.ndarray]:
    """Flax params -> the diffusers AutoencoderKL state dict (contiguous numpy, the params' dtype)."""
    return hf_io.flax_to_torch_state(params, _path_to_key)


def from_state(config_dict: dict, state: dict[str, np.ndarray], dtype=jnp.float32, compute_dtype=None):
    """A vae config.json dict and a diffusers-named state dict -> (AutoencoderKL, params).

    state None: abstract params (jax.ShapeDtypeStructs; shapes only, for the memory report).
    Params are cast to `dtype`, also the compute dtype unless `compute_dtype` is given. Raises naming the
    missing, unexpected or mis-shaped tensors.
    """
    config = dataclasses.replace(VAEConfig.from_diffusers(config_dict), dtype=compute_dtype or dtype)
    params = hf_io.checked_params(None if state is None else diffusers_to_params(state), lambda: init_params(config, jax.random.key(0)),
                                  _path_to_key, "AutoencoderKL", dtype)
    return AutoencoderKL(config), params


def load_pretrained(path_or_id: str, dtype=jnp.float32, compute_dtype=None):
    """A diffusers AutoencoderKL folder, or a pipeline folder with one in vae/ (local or hub id) ->
    (AutoencoderKL, params). Reads config.json and diffusion_pytorch_model.safetensors (or sharded)."""
    return from_state(*hf_io.read_diffusers_model(path_or_id, "vae"), dtype, compute_dtype)
