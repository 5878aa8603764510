"""Single-file Stable Diffusion 1.x checkpoints (the CompVis LDM layout Civitai ships) -> diffusers / HF names.

One flat state dict holds the three models under LDM prefixes; `split_checkpoint` renames them for the UNet,
VAE and CLIP text encoder converters (unet.py, vae.py, clip.py), which take diffusers / transformers names:

    model.diffusion_model.         UNet   input_blocks.{k}.{0: resnet | 1: transformer}, input_blocks.{k}.0.op
                                          (downsample), middle_block.{0,1,2}, output_blocks.{k}.{0: resnet |
                                          1: transformer | 1 or 2: upsample .conv}, time_embed, out; resnets
                                          in_layers / emb_layers / out_layers / skip_connection
    first_stage_model.             VAE    {en,de}coder.{down,up}.{i}.block.{j} (nin_shortcut), .down.{i}.downsample,
                                          .up.{i}.upsample (up levels numbered from the bottom), .mid.{block_1,
                                          attn_1 (1x1 convs q, k, v, proj_out), block_2}, norm_out; quant_conv,
                                          post_quant_conv
    cond_stage_model.transformer.  CLIP   transformers names, with `text_model.` or (older files) without

The block structure comes from the diffusers configs (unet/config.json, vae/config.json): the LDM names are
generated for that structure, so a tensor the config does not expect, or one it expects and the file lacks,
raises naming it. EMA copies and the diffusion schedule buffers some files carry are ignored.
`SD15_*` are SD 1.5's configs, for single files that come without a config folder.
"""
import re

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safetensors' numpy loader asks for)
import numpy as np
from safetensors import safe_open

from diffchat_jax.models import hf_io

# SD 1.5's unet/config.json, vae/config.json and text_encoder/config.json (openai/clip-vit-large-patch14's text
# tower; eos_token_id 2 is the legacy value, see clip.TextConfig). Copy before changing.
SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "attention_dropout": 0.0,
    "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-5,
    "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "projection_dim": 768, "vocab_size": 49408,
}

# SD 1.5's scheduler/scheduler_config.json (PNDM); solvers are built from it like `DDIMScheduler.from_config`.
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
                      prediction_type="epsilon", timestep_spacing="leading", trained_betas=None)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
# EMA weights (model_ema.*, flattened names), the LatentDiffusion schedule buffers, the text encoder's position ids.
_IGNORED = re.compile(r"model_ema\..*|betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|"
                      r"posterior_\w+|logvar|lvlb_weights|" + re.escape(TEXT_PREFIX) + r"text_model\.embeddings\."
                      r"position_ids")
# (LDM, diffusers) submodules of a resnet; both VAE halves have no time embedding.
_UNET_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                ("out_layers.0", "norm2"), ("out_layers.3", "conv2"))
_VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"))
# The VAE's mid attention: 1x1 convs in LDM, linears in diffusers.
_VAE_ATTENTION = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
_VAE_LINEAR = re.compile(r"attentions\.0\.(to_[qkv]|to_out\.0)\.weight")
_SHOWN = 10  # names listed in an error


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """A single-file checkpoint (.safetensors, or a PyTorch .ckpt/.pt/.pth) -> {name: array}, every floating
    tensor (float16, bfloat16, ...) as float32, other tensors as stored.

    Raises hf_io.BadModelFile naming the file when it is unreadable; hf_io.RefusedPickle when it pickles more than
    tensors (e.g. PyTorch Lightning training state), which we do not unpickle.
    """
    path = str(path)
    if path.endswith(".safetensors"):
        # One tensor at a time: peak memory ~ the float32 result.
        with hf_io.safetensors_errors(path), safe_open(path, framework="np") as f:
            return {k: _as_float32(f.get_tensor(k)) for k in f.keys()}
    return hf_io.read_torch_state_dict(path)


def _as_float32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32, copy=False) if jnp.issubdtype(x.dtype, jnp.floating) else x


def split_checkpoint(state: dict[str, np.ndarray], unet_config: dict,
                     vae_config: dict) -> dict[str, dict[str, np.ndarray]]:
    """LDM-named flat state dict -> {"unet": diffusers UNet2DConditionModel names, "vae": diffusers AutoencoderKL
    names, "text_encoder": transformers CLIPTextModel names (`text_model.` prefix)}.

    The configs are diffusers config dicts; they fix the block structure. Arrays are shared with `state`, except
    the VAE's mid-attention weights: [C, C, 1, 1] -> [C, C] (views). Raises hf_io.BadModelFile (a ValueError)
    listing the tensors that are neither expected nor ignored, and the expected ones that are missing.
    """
    state = _with_text_model_prefix(state)
    tables = {
        "unet": (UNET_PREFIX, _unet_names(unet_config)),
        "vae": (VAE_PREFIX, _vae_names(vae_config)),
        "text_encoder": (TEXT_PREFIX, _text_names(state)),
    }
    wanted = {prefix + ldm: (model, name) for model, (prefix, names) in tables.items() for ldm, name in names.items()}
    out = {model: {} for model in tables}
    unknown = []
    for key, x in state.items():
        if key in wanted:
            model, name = wanted[key]
            if model == "vae" and _VAE_LINEAR.search(name) and x.ndim == 4:
                x = x[:, :, 0, 0]
            out[model][name] = x
        elif not _IGNORED.fullmatch(key):
            unknown.append(key)
    missing = [key for key in wanted if key not in state]
    problems = [f"{len(names)} {what} tensors: {', '.join(names[:_SHOWN])}{', ...' if len(names) > _SHOWN else ''}"
                for what, names in (("unknown", unknown), ("missing", missing)) if names]
    if problems:
        raise hf_io.BadModelFile("the checkpoint does not match an SD 1.x LDM checkpoint with these UNet / VAE "
                                 f"configs: {'; '.join(problems)}; pass config_from=<a diffusers pipeline of its "
                                 "architecture>")
    return out


def _with_text_model_prefix(state: dict) -> dict:
    """Older files name the text tower without `text_model.` (transformers < 4.22); give every key the prefix."""
    out = {}
    full = TEXT_PREFIX + "text_model."
    for key, x in state.items():
        if key.startswith(TEXT_PREFIX) and not key.startswith(full):
            key = full + key[len(TEXT_PREFIX):]
            if key in state:
                raise hf_io.BadModelFile(f"the checkpoint holds {key} both with and without `text_model.`")
        out[key] = x
    return out


def _params(ldm: str, diffusers: str, leaves=("weight", "bias")) -> dict[str, str]:
    return {f"{ldm}.{leaf}": f"{diffusers}.{leaf}" for leaf in leaves}


def _resnet(ldm: str, diffusers: str, parts, shortcut: str | None) -> dict[str, str]:
    """parts: (LDM, diffusers) submodules; shortcut: the LDM name of the 1x1 conv shortcut, None without one
    (it exists iff input and output channels differ)."""
    names = {}
    for ldm_part, diffusers_part in parts + (((shortcut, "conv_shortcut"),) if shortcut else ()):
        names |= _params(f"{ldm}.{ldm_part}", f"{diffusers}.{diffusers_part}")
    return names


def _transformer(ldm: str, diffusers: str, depth: int) -> dict[str, str]:
    """A spatial transformer (diffusers Transformer2DModel): the same names on both sides."""
    parts = ["norm", "proj_in", "proj_out"]
    for j in range(depth):
        block = f"transformer_blocks.{j}"
        parts += [f"{block}.norm{n}" for n in (1, 2, 3)] + [f"{block}.ff.net.0.proj", f"{block}.ff.net.2"]
        parts += [f"{block}.attn{n}.to_out.0" for n in (1, 2)]
    names = {}
    for part in parts:
        names |= _params(f"{ldm}.{part}", f"{diffusers}.{part}")
    for j in range(depth):
        for n in (1, 2):
            for proj in ("to_q", "to_k", "to_v"):  # no biases
                names |= _params(f"{ldm}.transformer_blocks.{j}.attn{n}.{proj}",
                                 f"{diffusers}.transformer_blocks.{j}.attn{n}.{proj}", ("weight",))
    return names


def _require(config: dict, key: str, allowed, default) -> None:
    if config.get(key, default) not in allowed:
        raise hf_io.BadModelFile(f"unsupported {key}={config.get(key, default)!r} for an LDM single file "
                                 f"(supported: {', '.join(map(repr, allowed))})")


def _unet_names(config: dict) -> dict[str, str]:
    """LDM UNet name (no prefix) -> diffusers name, every tensor of a UNet2DConditionModel with this config."""
    for key in ("class_embed_type", "addition_embed_type", "num_class_embeds", "encoder_hid_dim",
                "time_cond_proj_dim"):
        _require(config, key, (None,), None)
    _require(config, "mid_block_type", ("UNetMidBlock2DCrossAttn",), "UNetMidBlock2DCrossAttn")
    _require(config, "dual_cross_attention", (False,), False)
    _require(config, "attention_type", ("default",), "default")
    channels, layers = config["block_out_channels"], config["layers_per_block"]
    depth = config.get("transformer_layers_per_block", 1)
    if not isinstance(layers, int) or not isinstance(depth, int):
        raise hf_io.BadModelFile(f"layers_per_block {layers!r} and transformer_layers_per_block {depth!r} must be "
                                 "ints (one value for every level) for an LDM single file")
    down, up = config["down_block_types"], config["up_block_types"]
    for types, kinds in ((down, ("CrossAttnDownBlock2D", "DownBlock2D")), (up, ("UpBlock2D", "CrossAttnUpBlock2D"))):
        if len(types) != len(channels) or not set(types) <= set(kinds):
            raise hf_io.BadModelFile(f"unsupported UNet blocks {types} for block_out_channels {channels} "
                                     f"(supported: {', '.join(kinds)}, one per level)")
    last = len(channels) - 1
    names = {**_params("time_embed.0", "time_embedding.linear_1"), **_params("time_embed.2", "time_embedding.linear_2"),
             **_params("input_blocks.0.0", "conv_in"), **_params("out.0", "conv_norm_out"),
             **_params("out.2", "conv_out")}
    k = 1  # input_blocks.0 is conv_in
    for i, width in enumerate(channels):
        for j in range(layers):
            widens = j == 0 and channels[max(i - 1, 0)] != width
            names |= _resnet(f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}", _UNET_RESNET,
                             "skip_connection" if widens else None)
            if down[i] == "CrossAttnDownBlock2D":
                names |= _transformer(f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}", depth)
            k += 1
        if i < last:
            names |= _params(f"input_blocks.{k}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
            k += 1
    names |= _resnet("middle_block.0", "mid_block.resnets.0", _UNET_RESNET, None)
    names |= _transformer("middle_block.1", "mid_block.attentions.0", depth)
    names |= _resnet("middle_block.2", "mid_block.resnets.1", _UNET_RESNET, None)
    k = 0
    for i in range(len(channels)):
        attention = up[i] == "CrossAttnUpBlock2D"
        for j in range(layers + 1):
            # The concatenated skip always makes the input wider than the output: every up resnet has a shortcut.
            names |= _resnet(f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", _UNET_RESNET, "skip_connection")
            if attention:
                names |= _transformer(f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", depth)
            k += 1
        if i < last:
            names |= _params(f"output_blocks.{k - 1}.{2 if attention else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv")
    return names


def _vae_names(config: dict) -> dict[str, str]:
    """LDM VAE name (no prefix) -> diffusers name, every tensor of an AutoencoderKL with this config."""
    channels, layers = config["block_out_channels"], config.get("layers_per_block", 1)
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(config[key]) != [kind] * len(channels):
            raise hf_io.BadModelFile(f"unsupported VAE {key} {config[key]} (only {kind}, one per level of "
                                     f"{channels})")
    last = len(channels) - 1
    names = {}
    for part in ("encoder", "decoder"):
        names |= _params(f"{part}.conv_in", f"{part}.conv_in") | _params(f"{part}.conv_out", f"{part}.conv_out")
        names |= _params(f"{part}.norm_out", f"{part}.conv_norm_out")
        for n in (0, 1):
            names |= _resnet(f"{part}.mid.block_{n + 1}", f"{part}.mid_block.resnets.{n}", _VAE_RESNET, None)
        if config.get("mid_block_add_attention", True):
            for ldm, diffusers in _VAE_ATTENTION:
                names |= _params(f"{part}.mid.attn_1.{ldm}", f"{part}.mid_block.attentions.0.{diffusers}")
    for i, width in enumerate(channels):
        for j in range(layers):
            widens = j == 0 and channels[max(i - 1, 0)] != width
            names |= _resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET,
                             "nin_shortcut" if widens else None)
        if i < last:
            names |= _params(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    widths = channels[::-1]
    for i, width in enumerate(widths):
        level = last - i  # LDM numbers the decoder's levels from the bottom (widest first in diffusers)
        for j in range(layers + 1):
            widens = j == 0 and widths[max(i - 1, 0)] != width
            names |= _resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", _VAE_RESNET,
                             "nin_shortcut" if widens else None)
        if i < last:
            names |= _params(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    for conv, flag in (("quant_conv", "use_quant_conv"), ("post_quant_conv", "use_post_quant_conv")):
        if config.get(flag, True):
            names |= _params(conv, conv)
    return names


def _text_names(state: dict) -> dict[str, str]:
    """LDM text-encoder name (no prefix, `text_model.` form) -> the same transformers name, for as many layers
    as the checkpoint has (the split gets no text config; clip.from_state checks the count)."""
    layer = re.compile(re.escape(TEXT_PREFIX) + r"text_model\.encoder\.layers\.(\d+)\.")
    count = 1 + max((int(m.group(1)) for m in map(layer.match, state) if m), default=-1)
    parts = ["final_layer_norm"] + [f"encoder.layers.{i}.{part}" for i in range(count) for part in (
        "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2", "self_attn.q_proj", "self_attn.k_proj",
        "self_attn.v_proj", "self_attn.out_proj")]
    names = {f"text_model.embeddings.{e}.weight": f"text_model.embeddings.{e}.weight"
             for e in ("token_embedding", "position_embedding")}
    for part in parts:
        names |= _params(f"text_model.{part}", f"text_model.{part}")
    return names
