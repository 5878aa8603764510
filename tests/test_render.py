"""The SD 1.x pipeline loader and renderer against diffusers' StableDiffusionPipeline on a tiny random pipeline:
text encoder states, whole denoising trajectories per solver, decoded images; seeds; PNG files."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from diffchat_jax.diffusion import images as images_lib, pipeline, render, schedulers
from diffchat_jax.models import clip
from tests import helpers

PROMPTS = ["a red fox in the snow, highly detailed", "an old castle on a hill at sunset"]
NEGATIVE = "blurry, low quality"

@pytest.fixture(scope="module")
def sd(tiny_sd):
    return pipeline.load_pretrained(tiny_sd)


def torch_pipeline(folder, solver, kind=diffusers.StableDiffusionPipeline):
    """diffusers' pipeline of `kind` from `folder`, with `solver`'s scheduler."""
    pipe = kind.from_pretrained(folder)
    scheduler = getattr(diffusers, schedulers.DIFFUSERS_SCHEDULERS[solver])
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tokens(model, prompts):
    return clip.tokenize(model.tokenizer, prompts, 77)[0]


def test_text_encoder_states_match_transformers(tiny_sd, sd):
    model, params = sd
    ids = tokens(model, PROMPTS + [""])
    ours = render.encode_prompts(model, params["text_encoder"], jnp.asarray(ids))
    reference = transformers.CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids).long())[0].numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


# Tolerance 1e-4 on the latents: guidance 7.5 multiplies the UNet's ~1e-6 float32 differences from torch at every
# step (measured over 20 steps: 4.5e-5 for both solvers; decoded images 9e-7).
@pytest.mark.parametrize("solver, steps, atol", [("ddim", 10, 1e-4), ("dpmpp_2m", 10, 1e-4)])
def test_trajectory_and_image_match_the_diffusers_pipeline(tiny_sd, sd, solver, steps, atol):
    """Same initial noise, prompts and negative prompts, guidance 7.5: every step's latents and the decoded
    images of our loop equal those of StableDiffusionPipeline with the same scheduler config."""
    model, params = sd
    noise = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
    recorded = []

    def record(pipe, i, t, kwargs):
        recorded.append(kwargs["latents"].numpy().copy())
        return {}

    reference = torch_pipeline(tiny_sd, solver)(
        PROMPTS, negative_prompt=[NEGATIVE] * 2, latents=torch.from_numpy(noise), num_inference_steps=steps,
        guidance_scale=7.5, output_type="np", callback_on_step_end=record).images

    schedule = schedulers.make_solver(solver, model.scheduler_config, steps)
    ids = np.concatenate([tokens(model, [NEGATIVE] * 2), tokens(model, PROMPTS)])
    context = render.encode_prompts(model, params["text_encoder"], jnp.asarray(ids))
    final, trajectory = jax.jit(lambda x: render.denoise(model, params["unet"], schedule, x, context, 7.5,
                                                         trajectory=True))(jnp.asarray(noise))
    assert len(recorded) == steps
    for i, expected in enumerate(recorded):
        np.testing.assert_allclose(np.asarray(trajectory[i]), expected, atol=atol, err_msg=f"step {i}")
    images = np.asarray(render.decode(model, params["vae"], final)).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(images, reference, atol=atol)


def test_guidance_off_uses_the_prompts_alone(tiny_sd, sd):
    """guidance_scale 1: one UNet pass per step on the prompts, as diffusers does below guidance 1."""
    model, params = sd
    noise = np.random.default_rng(1).standard_normal((2, 4, 16, 16)).astype(np.float32)
    reference = torch_pipeline(tiny_sd, "ddim")(PROMPTS, latents=torch.from_numpy(noise), num_inference_steps=5,
                                                guidance_scale=1.0, output_type="latent").images.numpy()
    schedule = schedulers.make_solver("ddim", model.scheduler_config, 5)
    context = render.encode_prompts(model, params["text_encoder"], jnp.asarray(tokens(model, PROMPTS)))
    ours = render.denoise(model, params["unet"], schedule, jnp.asarray(noise), context, 1.0)
    np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-4)


@pytest.fixture(scope="module")
def renderer(sd):
    model, params = sd
    return render.Renderer(model, params, render.RenderSettings(solver="euler_ancestral", num_steps=3,
                                                                negative_prompt=NEGATIVE), batch_size=4)


def test_renderer_is_deterministic_per_prompt_and_seed(renderer):
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0]]
    seeds = [0, 0, 0, 1]
    images = renderer(prompts, seeds)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(renderer(prompts, seeds), images)  # same call, same images
    np.testing.assert_array_equal(images[2], images[0])  # same prompt and seed elsewhere in the batch
    assert np.abs(images[3].astype(int) - images[0]).mean() > 1  # another seed: another image
    assert np.abs(images[1].astype(int) - images[0]).mean() > 1  # another prompt: another image
    # A call of another length (5 prompts: one full chunk and one padded) renders the same images.
    again = renderer(prompts + [PROMPTS[1]], seeds + [7])
    np.testing.assert_array_equal(again[:4], images)


def test_renderer_rejects_bad_input(sd):
    model, params = sd
    with pytest.raises(ValueError, match="must be a multiple of 16"):
        render.Renderer(model, params, render.RenderSettings(height=40))
    with pytest.raises(ValueError, match="unknown"):
        render.Renderer(model, params, render.RenderSettings(solver="plms"))
    renderer = render.Renderer(model, params, render.RenderSettings(num_steps=2), batch_size=2)
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        renderer(PROMPTS, [0])
    assert renderer([], []).shape == (0, 32, 32, 3)


def test_png_keeps_the_prompt_and_pixels(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    path = images_lib.save_png(str(tmp_path / "a" / "x.png"), image, {"prompt": "un café, 東京", "seed": 3})
    with Image.open(path) as f:
        assert f.text == {"prompt": "un café, 東京", "seed": "3"}
        np.testing.assert_array_equal(np.asarray(f), image)


def test_grid_places_images_row_major():
    images = np.arange(5)[:, None, None, None] * np.ones((5, 2, 3, 3), np.uint8)
    g = images_lib.grid(images, columns=2)
    assert g.shape == (3 * 2, 2 * 3, 3)
    assert g[0, 0, 0] == 0 and g[0, 3, 0] == 1 and g[2, 0, 0] == 2 and g[4, 0, 0] == 4 and g[4, 3, 0] == 0


@pytest.mark.slow
def test_renderer_sharded_over_8_devices_matches_one_device(tiny_sd):
    """The same prompts and seeds rendered with the batch split over 8 CPU devices and on one device."""
    out = helpers.run_on_8_cpu_devices(f"""
import jax, numpy as np
from diffchat_jax.diffusion import pipeline, render
from diffchat_jax.utils.mesh import make_mesh
sd, params = pipeline.load_pretrained({tiny_sd!r})
settings = render.RenderSettings(solver="euler_ancestral", num_steps=3)
prompts, seeds = [f"a fox number {{k}}" for k in range(8)], list(range(8))
eight = render.Renderer(sd, params, settings, batch_size=8, mesh=make_mesh(jax.devices()))(prompts, seeds)
one = render.Renderer(sd, params, settings, batch_size=8, mesh=make_mesh(jax.devices()[:1]))(prompts, seeds)
print(len(jax.devices()), int(np.abs(eight.astype(int) - one).max()), len({{im.tobytes() for im in one}}))
""")
    devices, max_diff, distinct = map(int, out.split())
    assert devices == 8 and distinct == 8
    # Per-device batches of 1 instead of 8 reorder float32 sums in XLA's convolutions: a pixel may round to the
    # neighbouring uint8 level (measured: at most 1), never more.
    assert max_diff <= 1, max_diff


def test_bfloat16_renders_close_to_float32(tiny_sd, sd):
    """render.dtype bfloat16: params and compute in bf16 (norm statistics and softmax float32); the images stay
    close to the float32 ones (measured: mean abs diff 0.65 uint8 levels, max 4; allowed mean 8)."""
    model, params = sd
    settings = render.RenderSettings(solver="ddim", num_steps=4, negative_prompt=NEGATIVE)
    full = render.Renderer(model, params, settings, batch_size=2)(PROMPTS, [0, 1])
    model16, params16 = pipeline.load_pretrained(tiny_sd, dtype=jnp.bfloat16)
    assert jax.tree.leaves(params16["unet"])[0].dtype == jnp.bfloat16
    half = render.Renderer(model16, params16, settings, batch_size=2)(PROMPTS, [0, 1])
    diff = np.abs(half.astype(int) - full)
    assert 0 < diff.mean() < 8, diff.mean()


def test_txt2img_cli_writes_pngs_with_their_prompts(tiny_sd, sd, tmp_path):
    from diffchat_jax import txt2img
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n", encoding="utf-8")
    txt2img.main([f"--model={tiny_sd}", f"--prompts={prompts}", "--seeds=3,4", f"--out={tmp_path / 'out'}",
                  "--solver=ddim", "--steps=3", f"--negative={NEGATIVE}", "--batch_size=3"])
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["0000_3.png", "0000_4.png", "0001_3.png", "0001_4.png"]
    model, params = sd
    settings = render.RenderSettings(solver="ddim", num_steps=3, negative_prompt=NEGATIVE)
    expected = render.Renderer(model, params, settings, batch_size=3)([PROMPTS[1]], [4])[0]
    with Image.open(tmp_path / "out" / "0001_4.png") as f:
        assert f.text["prompt"] == PROMPTS[1] and f.text["seed"] == "4" and f.text["negative_prompt"] == NEGATIVE
        np.testing.assert_array_equal(np.asarray(f), expected)
