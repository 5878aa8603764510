"""Stable Diffusion 1.x checkpoints -> the Flax text encoder, UNet and VAE, the tokenizer and the scheduler config.

`load_pretrained(path_or_id)` reads
  * a diffusers pipeline folder or hub id (model_index.json; text_encoder/, unet/, vae/, tokenizer/, scheduler/
    with safetensors), as `StableDiffusionPipeline.save_pretrained` writes it (SD 1.5, Dreamlike-photoreal 2.0,
    Realistic Vision and most hub models), or
  * a single-file checkpoint in the original LDM key layout (`.safetensors`, or `.ckpt`), as Civitai ships
    Deliberate and Realistic Vision. Such a file has no configs: they come from `config_from` (a diffusers
    pipeline folder or hub id of the same architecture, which also gives the tokenizer and scheduler) or else
    are SD 1.5's (`ldm.SD15_*`; the tokenizer is then openai/clip-vit-large-patch14's, from the hub).
"""
import dataclasses
import os
from typing import Any

import jax.numpy as jnp
import transformers

from diffchat_jax.models import clip, hf_io, known, ldm, unet as unet_lib, vae as vae_lib

SD15_TOKENIZER = "openai/clip-vit-large-patch14"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
# What a pipeline folder needs from the hub (not the safety checker, nor .bin/.ckpt duplicates).
_PIPELINE_FILES = ["model_index.json", "*/config.json", "*/*.safetensors", "*/*.safetensors.index.json",
                   "tokenizer/*", "scheduler/*"]


@dataclasses.dataclass(frozen=True)
class StableDiffusion:
    """The modules of an SD 1.x pipeline (params travel separately, as {"text_encoder", "unet", "vae"}).

    latent_channels, vae_scale: latents are [B, latent_channels, H / vae_scale, W / vae_scale] (the VAE's latent
    channels: the UNet of a text-to-image pipeline takes as many, InstructPix2Pix's twice as many, diffusion/ip2p.py);
    sample_size: the UNet's native latent size (images of sample_size * vae_scale pixels).
    """
    text_encoder: clip.CLIP
    unet: unet_lib.UNet
    vae: vae_lib.AutoencoderKL
    tokenizer: Any  # a transformers CLIPTokenizer(Fast)
    scheduler_config: dict

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def sample_size(self) -> int:
        return self.unet.config.sample_size


# What a model path may be, for the errors that say what was expected instead.
_PIPELINE_FOLDER = ("a diffusers SD 1.x pipeline folder or hub id (model_index.json with unet/, vae/, text_encoder/, "
                    "tokenizer/ and scheduler/)")
_MODEL = f"{_PIPELINE_FOLDER}, or a single-file checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})"


def _pipeline_folder(path_or_id: str, expected: str) -> str:
    """The local folder of a diffusers pipeline (a hub id is downloaded), checked to be one; `expected` says what
    the path may be instead."""
    if os.path.isfile(path_or_id):
        raise hf_io.BadModelFile(f"not a Stable Diffusion checkpoint file; pass {expected}", where=path_or_id)
    folder = hf_io.resolve_folder(path_or_id, _PIPELINE_FILES)
    _check_pipeline_folder(folder, path_or_id, expected)
    return folder


def _check_pipeline_folder(folder: str, name: str, expected: str) -> None:
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise hf_io.BadModelFile(f"not a diffusers pipeline folder (no model_index.json); pass {expected}",
                                 where=name)


def _folder_parts(folder: str) -> dict:
    """Configs, tokenizer and scheduler config of a diffusers pipeline folder."""
    tokenizer = os.path.join(folder, "tokenizer")
    if not os.path.isdir(tokenizer):
        raise hf_io.MissingModelFile(f"{tokenizer} is missing; a diffusers pipeline folder has its tokenizer there")
    return {
        "unet": hf_io.read_json(os.path.join(folder, "unet", "config.json")),
        "vae": hf_io.read_json(os.path.join(folder, "vae", "config.json")),
        "text_encoder": clip.read_config_json(os.path.join(folder, "text_encoder", "config.json")),
        "scheduler": hf_io.read_json(os.path.join(folder, "scheduler", "scheduler_config.json")),
        "tokenizer": transformers.AutoTokenizer.from_pretrained(tokenizer),
    }


def _sd15_parts(checkpoint: str) -> dict:
    """SD 1.5's configs (built in) and tokenizer (from the hub cache), for a single file without config_from."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(SD15_TOKENIZER)
    except OSError as e:  # what transformers raises when the files are neither cached nor downloadable
        raise hf_io.MissingModelFile(
            f"{checkpoint}: a single-file checkpoint needs the pipeline configs and tokenizer of SD 1.5; the configs "
            f"are built in, but the tokenizer ({SD15_TOKENIZER}) is not in the local hub cache while "
            f"{hf_io.hub_unavailable()}; pass config_from=<a local diffusers SD 1.x pipeline folder> "
            "(config.render.config_from; txt2img --config_from)") from e
    return {"unet": ldm.SD15_UNET_CONFIG, "vae": ldm.SD15_VAE_CONFIG, "text_encoder": ldm.SD15_TEXT_CONFIG,
            "scheduler": ldm.SD15_SCHEDULER, "tokenizer": tokenizer}


def _config_parts(path: str, config_from: str | None) -> dict:
    """The configs of a pipeline without its weights or tokenizer: from a local folder's files, else (hub ids,
    single files without `config_from`) the built-in table (models/known.py)."""
    single_file = path.endswith(SINGLE_FILE_SUFFIXES)
    source = (config_from or "stable-diffusion-v1-5/stable-diffusion-v1-5") if single_file else path
    if not os.path.isdir(source):
        return dict(known.config_json(source, known.SD, filename="model_index.json"))
    _check_pipeline_folder(source, source, f"config_from={_PIPELINE_FOLDER}" if single_file else _MODEL)
    read = lambda *parts: hf_io.read_json(os.path.join(source, *parts))
    return {"unet": read("unet", "config.json"), "vae": read("vae", "config.json"),
            "text_encoder": read("text_encoder", "config.json"),
            "scheduler": read("scheduler", "scheduler_config.json")}


def load_pretrained(path_or_id: str, dtype=jnp.float32, compute_dtype=None,
                    config_from: str | None = None, abstract: bool = False) -> tuple[StableDiffusion, dict]:
    """A diffusers pipeline (folder or hub id) or a single-file LDM checkpoint -> (StableDiffusion, params).

    Params are cast to `dtype`; the compute dtype is `compute_dtype` or `dtype`. `config_from` only matters for a
    single file (see the module docstring). abstract=True: shapes only (jax.ShapeDtypeStructs, for the memory
    report) from the configs alone (`_config_parts`), no tokenizer (None); nothing is read or downloaded.
    """
    path = os.fspath(path_or_id)
    kw = dict(dtype=dtype, compute_dtype=compute_dtype)
    if abstract:
        parts = _config_parts(path, config_from)
        text_encoder, text_params = clip.from_state(parts["text_encoder"], None, **kw)
        unet, unet_params = unet_lib.from_state(parts["unet"], None, **kw)
        vae, vae_params = vae_lib.from_state(parts["vae"], None, **kw)
        parts["tokenizer"] = None
    elif path.endswith(SINGLE_FILE_SUFFIXES):
        file = hf_io.resolve_file(path)
        parts = _sd15_parts(file) if config_from is None else _folder_parts(
            _pipeline_folder(config_from, f"config_from={_PIPELINE_FOLDER}"))
        state = ldm.read_checkpoint(file)
        with hf_io.naming(file):  # the converters see only arrays and config dicts
            states = ldm.split_checkpoint(state, parts["unet"], parts["vae"])
            text_encoder, text_params = clip.from_state(parts["text_encoder"], states["text_encoder"], **kw)
            unet, unet_params = unet_lib.from_state(parts["unet"], states["unet"], **kw)
            vae, vae_params = vae_lib.from_state(parts["vae"], states["vae"], **kw)
    else:
        folder = _pipeline_folder(path, _MODEL)
        parts = _folder_parts(folder)
        text_encoder, text_params = clip.load_pretrained(os.path.join(folder, "text_encoder"), **kw)
        with hf_io.naming(os.path.join(folder, "unet")):
            unet, unet_params = unet_lib.load_pretrained(os.path.join(folder, "unet"), **kw)
        with hf_io.naming(os.path.join(folder, "vae")):
            vae, vae_params = vae_lib.load_pretrained(os.path.join(folder, "vae"), **kw)
    if text_encoder.config.text.hidden_size != unet.config.cross_attention_dim:
        raise hf_io.BadModelFile(f"the text encoder's width {text_encoder.config.text.hidden_size} is not the "
                                 f"UNet's cross_attention_dim {unet.config.cross_attention_dim}; its text_encoder "
                                 "and unet come from different models", where=path)
    sd = StableDiffusion(text_encoder, unet, vae, parts["tokenizer"], dict(parts["scheduler"]))
    return sd, {"text_encoder": text_params, "unet": unet_params, "vae": vae_params}
