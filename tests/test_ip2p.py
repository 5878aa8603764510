"""The InstructPix2Pix editor against diffusers' StableDiffusionInstructPix2PixPipeline on a tiny random pipeline:
source-image latents, whole denoising trajectories per solver, decoded and uint8 images; the loaders' refusals;
the Editor's determinism per (image, instruction, seed)."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from diffchat_jax.diffusion import ip2p, render, schedulers
from diffchat_jax.models import hf_io
from tests.test_render import tokens, torch_pipeline

INSTRUCTIONS = ["make it snowy", "turn the sky into a sunset"]
NEGATIVE = "blurry, low quality"
SIZE = 32  # the tiny pipeline's images: 16x16 latents


@pytest.fixture(scope="module")
def editor_model(tiny_ip2p):
    return ip2p.load_pretrained(tiny_ip2p)


def source_images(n: int, seed: int = 0) -> np.ndarray:
    """[n, SIZE, SIZE, 3] uint8: smooth colour gradients plus noise (what a VAE sees more than pure noise)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, SIZE)[None, :, None, None] * rng.uniform(0, 255, (n, 1, 1, 3))
    return np.clip(ramp + rng.normal(0, 30, (n, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def diffusers_edit(folder, solver, images, noise, **kwargs):
    """StableDiffusionInstructPix2PixPipeline on INSTRUCTIONS with `solver`'s scheduler from the initial `noise`:
    (its output, every step's latents, every step's image latents)."""
    latents, image_latents = [], []

    def record(pipe, i, t, tensors):
        latents.append(tensors["latents"].numpy().copy())
        image_latents.append(tensors["image_latents"].numpy().copy())
        return {}

    out = torch_pipeline(folder, solver, diffusers.StableDiffusionInstructPix2PixPipeline)(
        INSTRUCTIONS, image=[Image.fromarray(im) for im in images], latents=torch.from_numpy(np.array(noise)),
        callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "image_latents"], **kwargs)
    return out.images, latents, image_latents


def our_edit(model, params, solver, steps, images, seeds, guidance_scale, image_guidance_scale):
    """ip2p.edit on INSTRUCTIONS with NEGATIVE: (images uint8, trajectory, decoded final latents in [0, 1], source
    image latents)."""
    schedule = schedulers.make_solver(solver, model.scheduler_config, steps)

    def run(params, cond, uncond, x, s):
        edited, xs = ip2p.edit(model, params, schedule, cond, uncond, x, s, guidance_scale, image_guidance_scale,
                               trajectory=True)
        decoded = render.decode(model, params["vae"], xs[-1]).transpose(0, 2, 3, 1)
        return edited, xs, decoded, ip2p.encode_images(model, params["vae"], x)

    return jax.jit(run)(params, tokens(model, INSTRUCTIONS), tokens(model, [NEGATIVE] * 2), images, seeds)


# Tolerance 1e-4 on the latents, as test_render.py's: the guidance (7.5 and 1.5 over three branches) multiplies the
# UNet's ~1e-6 float32 differences from torch at every step (measured: 4.9e-5 on latents up to 27 in magnitude, the
# same over 20 steps and with ddim; decoded images 1.8e-6; source latents 2.9e-6). One solver per test (each
# compiles the whole edit, ~10 s on 2 CPU cores): dpmpp_2m (render's default, with a multistep state) here, ddim
# unguided below; the solvers themselves are checked against diffusers in test_schedulers.py and test_render.py.
@pytest.mark.slow
def test_trajectory_and_image_match_the_diffusers_pipeline(tiny_ip2p, editor_model):
    """Same source images, instructions, negative prompts and initial noise (our seeds' latents, passed through
    `latents=`), guidance 7.5 / image guidance 1.5: the source latents, every step's latents, the decoded images and
    the uint8 images of `edit` equal those of StableDiffusionInstructPix2PixPipeline with the same scheduler
    (DPM-Solver++ 2M)."""
    model, params = editor_model
    solver, steps, seeds, images = "dpmpp_2m", 6, np.asarray([3, 4], np.uint32), source_images(2)
    noise = render.initial_latents(model, jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds)), SIZE, SIZE)
    reference, latents, image_latents = diffusers_edit(
        tiny_ip2p, solver, images, noise, negative_prompt=[NEGATIVE] * 2, num_inference_steps=steps,
        guidance_scale=7.5, image_guidance_scale=1.5, output_type="np")
    edited, trajectory, decoded, source = our_edit(model, params, solver, steps, images, seeds, 7.5, 1.5)
    np.testing.assert_allclose(np.asarray(source), image_latents[0][:2], atol=1e-5)
    assert not image_latents[0][4:].any()  # diffusers' third branch: no source image
    assert len(latents) == steps
    for i, expected in enumerate(latents):
        np.testing.assert_allclose(np.asarray(trajectory[i]), expected, atol=1e-4, err_msg=f"step {i}")
    np.testing.assert_allclose(np.asarray(decoded), reference, atol=1e-4)
    assert edited.dtype == jnp.uint8 and edited.shape == (2, SIZE, SIZE, 3)
    # diffusers rounds its float images the same way (numpy_to_pil); a 1e-6 difference may cross a rounding edge.
    assert np.abs(np.asarray(edited).astype(int) - np.round(reference * 255)).max() <= 1


def test_guidance_off_is_one_pass_with_the_source_image(tiny_ip2p, editor_model):
    """guidance_scale 1: one UNet pass per step on (instruction, source image), as diffusers does."""
    model, params = editor_model
    seeds, images = np.asarray([5, 6], np.uint32), source_images(2, seed=1)
    noise = render.initial_latents(model, jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds)), SIZE, SIZE)
    _, latents, image_latents = diffusers_edit(tiny_ip2p, "ddim", images, noise, num_inference_steps=3,
                                               guidance_scale=1.0, output_type="latent")
    assert len(image_latents[0]) == 2  # one branch
    _, trajectory, _, _ = our_edit(model, params, "ddim", 3, images, seeds, 1.0, 1.5)
    np.testing.assert_allclose(np.asarray(trajectory), np.stack(latents), atol=1e-4)


def test_loaders_refuse_the_other_kind_of_pipeline(tiny_sd, editor_model, tmp_path):
    with pytest.raises(hf_io.BadModelFile, match="not an InstructPix2Pix pipeline: its UNet takes 4 input channels, "
                                                 "not 8") as e:
        ip2p.load_pretrained(tiny_sd)
    assert str(e.value).startswith(f"{tiny_sd}: ")
    single = tmp_path / "ip2p.safetensors"
    single.write_bytes(b"")
    with pytest.raises(hf_io.BadModelFile, match="single-file checkpoint; pass an InstructPix2Pix pipeline folder"):
        ip2p.load_pretrained(str(single))
    model, params = editor_model
    with pytest.raises(hf_io.BadModelFile, match="not a text-to-image pipeline: its UNet takes 8 input channels"):
        render.Renderer(model, params)


@pytest.fixture(scope="module")
def editor(editor_model):
    model, params = editor_model
    settings = ip2p.EditSettings(solver="euler_ancestral", num_steps=3, negative_prompt=NEGATIVE)
    return ip2p.Editor(model, params, settings, batch_size=4)


def test_editor_is_deterministic_per_image_instruction_and_seed(editor):
    a, b = source_images(2, seed=2)
    images = np.stack([a, a, a, a, b])
    instructions = [INSTRUCTIONS[0], INSTRUCTIONS[1], INSTRUCTIONS[0], INSTRUCTIONS[0], INSTRUCTIONS[0]]
    seeds = [0, 0, 1, 0, 0]
    edited = editor(images, instructions, seeds)  # 5 edits: one full chunk of 4 and one padded
    assert edited.shape == (5, SIZE, SIZE, 3) and edited.dtype == np.uint8
    np.testing.assert_array_equal(editor(images, instructions, seeds), edited)  # same call, same images
    np.testing.assert_array_equal(edited[3], edited[0])  # same (image, instruction, seed) elsewhere
    differs = lambda k: np.abs(edited[k].astype(int) - edited[0]).mean() > 1
    assert differs(1) and differs(2) and differs(4)  # another instruction, seed, source image
    # Another call with the same chunk shape (a chunk of 4 edits) gives the same images in other places.
    again = editor(images[[4, 2, 1, 0]], [instructions[k] for k in (4, 2, 1, 0)], [seeds[k] for k in (4, 2, 1, 0)])
    np.testing.assert_array_equal(again, edited[[4, 2, 1, 0]])


def test_editor_rejects_bad_input(editor):
    images = source_images(2)
    with pytest.raises(ValueError, match="2 images, 1 instructions and 2 seeds"):
        editor(images, INSTRUCTIONS[:1], [0, 1])
    with pytest.raises(ValueError, match="source image size 24x24 must be a multiple of 16"):
        editor(images[:, :24, :24], INSTRUCTIONS, [0, 1])
    with pytest.raises(ValueError, match=r"must be \[N, H, W, 3\] uint8"):
        editor(images.astype(np.float32), INSTRUCTIONS, [0, 1])
    assert editor(images[:0], [], []).shape == (0, SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="num_steps must be at least 1"):
        ip2p.EditSettings(num_steps=0)
