"""InstructPix2Pix (Brooks et al. 2023): (source image, instruction) -> edited image, with an SD 1.x pipeline whose
UNet also sees the source image. A competitor system of the evaluation (eval system ip2p:PATH).

`load_pretrained(path_or_id)` reads a diffusers StableDiffusionInstructPix2PixPipeline folder or hub id
(timbrooks/instruct-pix2pix) with `pipeline.load_pretrained`, checking that its UNet takes 2 x the VAE's latent
channels (8): the noisy latents concatenated with the source image's latents.

`edit(sd, params, solver, cond_ids, uncond_ids, source_images, seeds, guidance_scale, image_guidance_scale)` is the
pure function, as diffusers' pipeline computes it: the source images encoded by the VAE (the mode of the latent
Gaussian, NOT multiplied by scaling_factor), seeded noise (`render.initial_latents`), the solver's loop
(`render.sample`) with three-branch guidance over (instruction, source), (negative prompt, source) and
(negative prompt, no source: zero latents),

    eps = eps_uncond + g * (eps_text - eps_image) + ig * (eps_image - eps_uncond),

then VAE decoding (`render.decode`). `Editor` is the host side, as render.Renderer: it tokenizes, chunks the
images into fixed-size batches split over the `data` mesh, and returns numpy. Every image depends on (source
image, instruction, seed) only, not on its place in a batch.
"""
import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffchat_jax import errors
from diffchat_jax.diffusion import pipeline, render, schedulers
from diffchat_jax.diffusion.pipeline import StableDiffusion
from diffchat_jax.models import clip, hf_io
from diffchat_jax.utils.mesh import make_mesh, map_in_chunks, replicate


@dataclasses.dataclass(frozen=True)
class EditSettings:
    """How to edit; the image size is the source images'.

    Guidance is on when guidance_scale > 1 and image_guidance_scale >= 1 (diffusers' rule: three UNet passes per
    step); otherwise one pass on (instruction, source image), neither scale used.
    """
    solver: str = "euler_ancestral"  # timbrooks/instruct-pix2pix's scheduler
    num_steps: int = 20
    guidance_scale: float = 7.5  # text guidance
    image_guidance_scale: float = 1.5  # image guidance: higher stays closer to the source image
    negative_prompt: str = ""

    def __post_init__(self):
        if self.num_steps < 1:
            raise errors.ConfigError(f"num_steps must be at least 1, got {self.num_steps}")


def is_guided(guidance_scale: float, image_guidance_scale: float) -> bool:
    """Three-branch guidance on (diffusers' `do_classifier_free_guidance` of the InstructPix2Pix pipeline)."""
    return guidance_scale > 1.0 and image_guidance_scale >= 1.0


# ---------------------------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------------------------
def load_pretrained(path_or_id: str, dtype=jnp.float32, compute_dtype=None) -> tuple[StableDiffusion, dict]:
    """An InstructPix2Pix diffusers pipeline (folder or hub id) -> (StableDiffusion, params), as
    pipeline.load_pretrained. Raises hf_io.BadModelFile naming the path for a single-file checkpoint or a pipeline
    whose UNet does not take the source image's latents."""
    path = os.fspath(path_or_id)
    if path.endswith(pipeline.SINGLE_FILE_SUFFIXES):
        raise hf_io.BadModelFile("a single-file checkpoint; pass an InstructPix2Pix pipeline folder or hub id in the "
                                 "diffusers layout (timbrooks/instruct-pix2pix)", where=path)
    sd, params = pipeline.load_pretrained(path, dtype=dtype, compute_dtype=compute_dtype)
    check_editor(sd, path)
    return sd, params


def check_editor(sd: StableDiffusion, where: str | None = None) -> None:
    """Raises hf_io.BadModelFile unless the UNet takes the noisy latents and the source image's (2 x the VAE's
    latent channels)."""
    expected, got = 2 * sd.latent_channels, sd.unet.config.in_channels
    if got != expected:
        raise hf_io.BadModelFile(
            f"not an InstructPix2Pix pipeline: its UNet takes {got} input channels, not {expected} (the noisy "
            f"latents and the source image's latents, {sd.latent_channels} each)", where=where)


# ---------------------------------------------------------------------------------------------------------------
# The pure function.
# ---------------------------------------------------------------------------------------------------------------
def encode_images(sd: StableDiffusion, vae_params, images: jax.Array) -> jax.Array:
    """Source images [B, H, W, 3] uint8 -> their latents [B, C, H / f, W / f] float32: the mode (mean) of the VAE's
    latent Gaussian, unscaled (diffusers' InstructPix2Pix does not multiply them by scaling_factor)."""
    pixels = images.astype(jnp.float32).transpose(0, 3, 1, 2) / 255.0 * 2.0 - 1.0  # as VaeImageProcessor: [-1, 1]
    mean, _ = sd.vae.apply({"params": vae_params}, pixels, method=sd.vae.encode)
    return mean


def denoise(sd: StableDiffusion, unet_params, solver: schedulers.Solver, latents: jax.Array, context: jax.Array,
            image_latents: jax.Array, guidance_scale: float, image_guidance_scale: float,
            keys: jax.Array | None = None, trajectory: bool = False):
    """The editing loop (render.sample) from initial noise `latents` [B, C, h, w], conditioned on the source
    image's latents `image_latents` [B, C, h, w] (concatenated to the solver-scaled latents on the channels).

    Guided (`is_guided`): context [3B, T, D] = (instructions, negative prompts, negative prompts), the image
    conditioning (image_latents, image_latents, zeros), and eps = eps_uncond + g * (eps_text - eps_image) +
    ig * (eps_image - eps_uncond). Else context [B, T, D] (instructions) with the image latents. keys, trajectory
    and the result: as render.sample.
    """
    guided = is_guided(guidance_scale, image_guidance_scale)
    if guided:
        image_latents = jnp.concatenate([image_latents, image_latents, jnp.zeros_like(image_latents)])

    def model(x_in, t):
        x_in = jnp.concatenate([x_in] * 3) if guided else x_in
        out = sd.unet.apply({"params": unet_params}, jnp.concatenate([x_in, image_latents], axis=1), t, context)
        if guided:
            text, image, uncond = jnp.split(out, 3)
            out = uncond + guidance_scale * (text - image) + image_guidance_scale * (image - uncond)
        return out

    return render.sample(solver, latents, model, keys, trajectory)


def edit(sd: StableDiffusion, params: dict, solver: schedulers.Solver, cond_ids: jax.Array, uncond_ids: jax.Array,
         source_images: jax.Array, seeds: jax.Array, guidance_scale: float, image_guidance_scale: float,
         trajectory: bool = False):
    """Pure InstructPix2Pix editing: cond_ids, uncond_ids [B, 77] int32 (instruction and negative-prompt tokens),
    source_images [B, H, W, 3] uint8, seeds [B] uint32 -> edited images [B, H, W, 3] uint8, and with
    trajectory=True also every step's latents [S, B, C, H / f, W / f]. Image b starts from
    `normal(PRNGKey(seeds[b]))` latents; a stochastic solver draws step i's noise from
    `fold_in(PRNGKey(seeds[b]), i)` (as render.render)."""
    keys = jax.vmap(jax.random.PRNGKey)(seeds)
    guided = is_guided(guidance_scale, image_guidance_scale)
    context = render.encode_prompts(sd, params["text_encoder"],
                                    jnp.concatenate([cond_ids, uncond_ids, uncond_ids]) if guided else cond_ids)
    height, width = source_images.shape[1:3]
    out = denoise(sd, params["unet"], solver, render.initial_latents(sd, keys, height, width), context,
                  encode_images(sd, params["vae"], source_images), guidance_scale, image_guidance_scale, keys,
                  trajectory)
    final, xs = out if trajectory else (out, None)
    images = render.to_uint8(render.decode(sd, params["vae"], final))
    return (images, xs) if trajectory else images


# ---------------------------------------------------------------------------------------------------------------
# The host side.
# ---------------------------------------------------------------------------------------------------------------
class Editor:
    """(source images, instructions, seeds) -> [N, H, W, 3] uint8 edited images, in jitted chunks of `batch_size`
    over `mesh`.

    sd, params = ip2p.load_pretrained("timbrooks/instruct-pix2pix")
    editor = Editor(sd, params, EditSettings(num_steps=20), batch_size=8)
    edited = editor(images, ["make it snowy"] * len(images), seeds=range(len(images)))   # images [N, H, W, 3] uint8
    """

    def __init__(self, sd: StableDiffusion, params: dict, settings: EditSettings = EditSettings(),
                 batch_size: int = 8, mesh=None):
        check_editor(sd)
        self.sd, self.settings, self.batch_size = sd, settings, batch_size
        self.mesh = mesh or make_mesh(jax.local_devices())
        self.params = replicate(params, self.mesh)
        self.solver = schedulers.make_solver(settings.solver, sd.scheduler_config, settings.num_steps)
        self._edit = jax.jit(functools.partial(
            edit, sd, solver=self.solver, guidance_scale=settings.guidance_scale,
            image_guidance_scale=settings.image_guidance_scale))

    @property
    def text_length(self) -> int:
        return self.sd.text_encoder.config.text.max_position_embeddings

    def _tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return clip.tokenize(self.sd.tokenizer, texts, self.text_length)[0]

    def _check_images(self, images: np.ndarray) -> None:
        multiple = 8 * self.sd.vae_scale  # multiples of 8 latents always work (render.RenderSettings.image_size)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"source images must be [N, H, W, 3] uint8, got {images.shape} {images.dtype}")
        if images.shape[1] % multiple or images.shape[2] % multiple:
            raise ValueError(f"source image size {images.shape[1]}x{images.shape[2]} must be a multiple of "
                             f"{multiple} for this model")

    def __call__(self, images: np.ndarray, instructions: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        images = np.asarray(images)
        self._check_images(images)
        if not len(images) == len(instructions) == len(seeds):
            raise ValueError(f"{len(images)} images, {len(instructions)} instructions and {len(seeds)} seeds")
        if not len(images):
            return np.zeros(images.shape, np.uint8)
        cond = self._tokenize(instructions)
        uncond = np.repeat(self._tokenize([self.settings.negative_prompt]), len(images), axis=0)
        seeds = np.asarray(seeds, np.uint32)
        fn = lambda x, c, u, s: self._edit(self.params, cond_ids=c, uncond_ids=u, source_images=x, seeds=s)
        return map_in_chunks(fn, [images, cond, uncond, seeds], self.batch_size, self.mesh)
