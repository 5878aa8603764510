"""Prompts -> images with a Stable Diffusion 1.x pipeline, as one jitted function (paper sections 3.3, 4.1).

`render(sd, params, solver, cond_ids, uncond_ids, seeds, guidance_scale, height, width)` is the pure function:
text encoding (`encode_prompts`), seeded noise (`initial_latents`), a `lax.scan` over the solver's steps (`sample`,
shared with diffusion/ip2p.py) with classifier-free guidance and a negative prompt (`denoise`), VAE decoding
(`decode`) and uint8 conversion. Every image's initial latents and per-step noise come from its own seed only, so
an image depends on (prompt, seed), not on its place in a batch (bit for bit on one device; split over several
devices a pixel may round to the neighbouring uint8 level). `Renderer` is the host side: it tokenizes, chunks
a list of prompts into fixed-size batches split over the `data` mesh (one compiled shape), and returns numpy.
"""
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffchat_jax import errors
from diffchat_jax.diffusion import schedulers
from diffchat_jax.diffusion.pipeline import StableDiffusion
from diffchat_jax.models import clip, hf_io
from diffchat_jax.utils import aot
from diffchat_jax.utils.mesh import chunk_size, make_mesh, map_in_chunks, replicate, shard_batch
from diffchat_jax.utils.validate import DTYPES, one_of, require


@dataclasses.dataclass(frozen=True)
class RenderSettings:
    """How to render. height/width 0 = the UNet's native size (sample_size * vae_scale, 512 for SD 1.5)."""
    solver: str = "dpmpp_2m"
    num_steps: int = 20
    guidance_scale: float = 7.5  # <= 1 turns classifier-free guidance off (one UNet pass per step)
    negative_prompt: str = ""
    height: int = 0
    width: int = 0

    def __post_init__(self):
        if self.num_steps < 1:
            raise errors.ConfigError(f"num_steps must be at least 1, got {self.num_steps}")
        if self.height < 0 or self.width < 0:
            raise errors.ConfigError(f"height and width must be >= 0 (0 = native), got {self.height}x{self.width}")

    @classmethod
    def from_config(cls, c) -> "RenderSettings":
        return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls)})

    def image_size(self, sd: StableDiffusion) -> tuple[int, int]:
        native = sd.sample_size * sd.vae_scale
        height, width = self.height or native, self.width or native
        multiple = 8 * sd.vae_scale
        if height % multiple or width % multiple:
            # The UNet halves the latents len(block_out_channels) - 1 times; multiples of 8 latents always work.
            raise errors.ConfigError(f"image size {height}x{width} must be a multiple of {multiple} for this model; "
                                     f"set height and width to multiples of {multiple}, or 0 for its native {native}")
        return height, width


def encode_prompts(sd: StableDiffusion, text_params, ids: jax.Array) -> jax.Array:
    """ids [B, 77] -> the UNet's conditioning [B, 77, D]: the text encoder's last hidden state, without an
    attention mask (as SD 1.x was trained: padding tokens are attended to)."""
    return sd.text_encoder.apply({"params": text_params}, ids, method=sd.text_encoder.encode_text)[0]


def initial_latents(sd: StableDiffusion, keys: jax.Array, height: int, width: int) -> jax.Array:
    """One standard-normal latent per key: [B] keys -> [B, C, height / f, width / f] float32."""
    shape = (sd.latent_channels, height // sd.vae_scale, width // sd.vae_scale)
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def sample(solver: schedulers.Solver, latents: jax.Array, model, keys: jax.Array | None = None,
           trajectory: bool = False):
    """The sampling loop from initial noise `latents` [B, C, h, w] (scaled by the solver's init_noise_sigma here).

    model(x_in, t) -> the (guided) noise prediction [B, C, h, w] for the solver-scaled latents x_in [B, C, h, w] at
    timestep t (a traced scalar). keys [B]: per-image PRNG keys for a stochastic solver (step i draws from
    fold_in(key, i)). Returns the final latents [B, C, h, w], and with trajectory=True also every step's latents
    [S, B, C, h, w].
    """
    timesteps = jnp.asarray(solver.timesteps)
    x = latents * solver.init_noise_sigma

    def step(carry, i):
        x, state = carry
        out = model(solver.scale_input(x, i), timesteps[i])
        noise = jnp.zeros_like(x)
        if solver.stochastic:
            noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], jnp.float32))(keys)
        x, state = solver.step(state, i, x, out, noise)
        return (x, state), (x if trajectory else None)

    (x, _), xs = jax.lax.scan(step, (x, solver.init_state(x)), jnp.arange(solver.num_steps))
    return (x, xs) if trajectory else x


def denoise(sd: StableDiffusion, unet_params, solver: schedulers.Solver, latents: jax.Array, context: jax.Array,
            guidance_scale: float, keys: jax.Array | None = None, trajectory: bool = False):
    """Text-to-image sampling (`sample`) from initial noise `latents` [B, C, h, w].

    context: [2B, T, D] = (negative prompts, prompts) when guidance_scale > 1 (classifier-free guidance:
    eps = eps_neg + g * (eps_prompt - eps_neg)), else [B, T, D]. keys, trajectory and the result: as `sample`.
    """
    guided = guidance_scale > 1.0

    def model(x_in, t):
        out = sd.unet.apply({"params": unet_params}, jnp.concatenate([x_in, x_in]) if guided else x_in, t, context)
        if guided:
            negative, positive = jnp.split(out, 2)
            out = negative + guidance_scale * (positive - negative)
        return out

    return sample(solver, latents, model, keys, trajectory)


def decode(sd: StableDiffusion, vae_params, latents: jax.Array) -> jax.Array:
    """Final latents [B, C, h, w] -> images [B, 3, H, W] float32 in [0, 1] (as diffusers' output_type="np")."""
    config = sd.vae.config
    latents = latents / config.scaling_factor + (config.shift_factor or 0.0)
    images = sd.vae.apply({"params": vae_params}, latents, method=sd.vae.decode)
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def to_uint8(images: jax.Array) -> jax.Array:
    """[B, 3, H, W] in [0, 1] -> [B, H, W, 3] uint8, rounded as diffusers' numpy_to_pil."""
    return jnp.round(images * 255).astype(jnp.uint8).transpose(0, 2, 3, 1)


def render(sd: StableDiffusion, params: dict, solver: schedulers.Solver, cond_ids: jax.Array,
           uncond_ids: jax.Array, seeds: jax.Array, guidance_scale: float, height: int, width: int) -> jax.Array:
    """Pure SD 1.x text-to-image: cond_ids, uncond_ids [B, 77] int32 (prompt and negative-prompt tokens), seeds
    [B] uint32 -> [B, height, width, 3] uint8. Image b starts from `normal(PRNGKey(seeds[b]))` latents; a
    stochastic solver draws step i's noise from `fold_in(PRNGKey(seeds[b]), i)`."""
    keys = jax.vmap(jax.random.PRNGKey)(seeds)
    guided = guidance_scale > 1.0
    context = encode_prompts(sd, params["text_encoder"],
                             jnp.concatenate([uncond_ids, cond_ids]) if guided else cond_ids)
    latents = denoise(sd, params["unet"], solver, initial_latents(sd, keys, height, width), context,
                      guidance_scale, keys)
    return to_uint8(decode(sd, params["vae"], latents))


def validate_settings(r) -> None:
    """Raises ConfigError naming the first `config.render` setting that cannot work (the model is checked by its
    loader)."""
    one_of(r.solver, schedulers.SOLVERS, "render.solver")
    one_of(r.seed_policy, ("fixed", "per_iteration"), "render.seed_policy")
    one_of(r.dtype, DTYPES, "render.dtype")
    for field in ("num_steps", "images_per_prompt", "batch_size"):
        require(r[field] >= 1, f"render.{field}", f"must be >= 1, got {r[field]}")
    require(r.height >= 0 and r.width >= 0, "render.height/width", "must be >= 0 (0 = the model's size)")


class Renderer:
    """prompts + seeds -> [N, H, W, 3] uint8 images, in jitted chunks of `batch_size` prompts over `mesh`.

    renderer = Renderer(sd, params, RenderSettings(num_steps=25), batch_size=8)
    images = renderer(["a red fox in the snow, highly detailed"], seeds=[0])

    With abstract params (pipeline.load_pretrained(..., abstract=True)) it renders nothing, but `device_steps`
    gives the memory report its jitted call.
    """

    def __init__(self, sd: StableDiffusion, params: dict, settings: RenderSettings = RenderSettings(),
                 batch_size: int = 8, mesh=None):
        if sd.unet.config.in_channels != sd.latent_channels:
            raise hf_io.BadModelFile(
                f"not a text-to-image pipeline: its UNet takes {sd.unet.config.in_channels} input channels, not the "
                f"VAE's {sd.latent_channels} latent channels (an InstructPix2Pix pipeline is an image editor: "
                "diffusion/ip2p.py, eval system ip2p:PATH)")
        self.sd, self.settings, self.batch_size = sd, settings, batch_size
        self.mesh = mesh or make_mesh(jax.local_devices())
        self.height, self.width = settings.image_size(sd)
        self.params = replicate(params, self.mesh)
        self.solver = schedulers.make_solver(settings.solver, sd.scheduler_config, settings.num_steps)
        self._render = jax.jit(functools.partial(
            render, sd, solver=self.solver, guidance_scale=settings.guidance_scale, height=self.height,
            width=self.width))

    @property
    def text_length(self) -> int:
        return self.sd.text_encoder.config.text.max_position_embeddings

    def _tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        return clip.tokenize(self.sd.tokenizer, prompts, self.text_length)[0]

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if not len(prompts):
            return np.zeros((0, self.height, self.width, 3), np.uint8)
        cond = self._tokenize(prompts)
        uncond = np.repeat(self._tokenize([self.settings.negative_prompt]), len(prompts), axis=0)
        seeds = np.asarray(seeds, np.uint32)
        fn = lambda c, u, s: self._render(self.params, cond_ids=c, uncond_ids=u, seeds=s)
        return map_in_chunks(fn, [cond, uncond, seeds], self.batch_size, self.mesh)

    def device_steps(self, n_images: int) -> list[aot.Step]:
        """The jitted call that rendering `n_images` images makes, on abstract arguments (diffchat_jax.memory)."""
        chunk = chunk_size(self.batch_size, self.mesh)
        ids = jax.ShapeDtypeStruct((chunk, self.text_length), jnp.int32)
        inputs = shard_batch({"cond_ids": ids, "uncond_ids": ids,
                              "seeds": jax.ShapeDtypeStruct((chunk,), jnp.uint32)}, self.mesh)
        return [aot.Step("render", self._render, (aot.abstract(self.params),), inputs, resident=(0,))]
