"""JAX solvers vs diffusers' schedulers built with `from_config` from SD 1.5's (PNDM) scheduler config and variants:
schedules and timesteps, whole sampling trajectories with a toy model (every intermediate latent compared), the
same loop jitted under `lax.fori_loop`, and the errors for unknown solvers and unsupported settings."""
import re

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal

from diffchat_jax.diffusion import schedulers
from diffchat_jax.models.ldm import SD15_SCHEDULER

REFERENCE = {"ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
             "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler}
VARIANTS = {
    "sd15": SD15_SCHEDULER,
    "v_prediction": dict(SD15_SCHEDULER, prediction_type="v_prediction"),
    "trailing": dict(SD15_SCHEDULER, timestep_spacing="trailing"),
    "linspace": dict(SD15_SCHEDULER, timestep_spacing="linspace", steps_offset=0),
    # DDIM's other defaults (linear betas, final alphabar 1), no steps_offset.
    "linear": dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False),
}
SHAPE = (2, 4, 8, 8)
# Max abs diff of every intermediate latent vs diffusers (fp32; latents are O(1); Euler's, up to init_noise_sigma, are
# compared after dividing by sqrt(s^2 + 1), i.e. in the UNet's input scale). Measured: <= 3e-6.
TOLERANCE = 1e-5


def reference(name, config, num_steps):
    scheduler = REFERENCE[name].from_config(config)
    scheduler.set_timesteps(num_steps)
    return scheduler


ALPHABAR = reference("ddim", SD15_SCHEDULER, 10).alphas_cumprod.numpy()


def toy_model(x, t, xp=np):
    """A smooth deterministic stand-in for the UNet: the eps of standard Gaussian data under SD 1.5's schedule
    (sqrt(1 - alphabar_t) x, which keeps the latents O(1)) plus nonlinear and t-dependent terms. Fractional t
    (Euler "linspace") interpolates alphabar."""
    alphabar = xp.interp(t, xp.arange(1000), xp.asarray(ALPHABAR))
    return xp.sqrt(1 - alphabar) * x + 0.1 * xp.tanh(2 * x) + 1e-4 * t


def test_alphas_cumprod_bit_identical():
    for variant in ("sd15", "linear"):
        cfg = schedulers.read_config(schedulers.DDIM.CONFIG_KEYS, VARIANTS[variant])
        assert_array_equal(schedulers.alphas_cumprod(cfg), reference("ddim", VARIANTS[variant], 10).alphas_cumprod)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_timesteps_and_init_noise_sigma(name):
    for variant, config in VARIANTS.items():
        for num_steps in (1, 2, 7, 10, 25, 50, 333):
            ref, solver = reference(name, config, num_steps), schedulers.make_solver(name, config, num_steps)
            where = f"{name} {variant} {num_steps} steps"
            assert solver.timesteps.dtype == ref.timesteps.numpy().dtype, where
            assert_array_equal(solver.timesteps, ref.timesteps.numpy(), err_msg=where)
            assert solver.num_steps == len(ref.timesteps), where
            assert_allclose(solver.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6, err_msg=where)


def run_reference(name, config, num_steps, x):
    """Intermediate latents [S, ...] of diffusers' loop (scale_model_input, toy model, step) from x."""
    ref = reference(name, config, num_steps)
    # Euler-ancestral draws randn_tensor(shape, generator) each step: initial_latents_and_noise replicates it.
    generator = torch.Generator().manual_seed(1)
    x, xs = torch.from_numpy(x), []
    for t in ref.timesteps:
        out = torch.from_numpy(toy_model(ref.scale_model_input(x, t).numpy(), float(t)).astype(np.float32))
        x = ref.step(out, t, x, generator=generator).prev_sample
        xs.append(x.numpy())
    return np.stack(xs)


def run_python_loop(solver, x, noise):
    """Intermediate latents [S, ...] of the JAX solver stepped from Python with the numpy toy model."""
    x, state, xs = jnp.asarray(x), solver.init_state(jnp.asarray(x)), []
    for i in range(solver.num_steps):
        out = toy_model(np.asarray(solver.scale_input(x, i)), float(solver.timesteps[i])).astype(np.float32)
        x, state = solver.step(state, i, x, jnp.asarray(out), jnp.asarray(noise[i]))
        xs.append(np.asarray(x))
    return np.stack(xs)


def initial_latents_and_noise(solver):
    """(x_0 [B, C, H, W], per-step noise [S, B, C, H, W]) the way diffusers' pipelines and Euler-ancestral draw."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).numpy() * solver.init_noise_sigma
    generator = torch.Generator().manual_seed(1)
    noise = np.stack([torch.randn(SHAPE, generator=generator).numpy() for _ in range(solver.num_steps)])
    return x.astype(np.float32), noise


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", sorted(REFERENCE))
@pytest.mark.parametrize("num_steps", [10, 25])
def test_trajectory_matches_diffusers(name, variant, num_steps):
    config = VARIANTS[variant]
    solver = schedulers.make_solver(name, config, num_steps)
    x, noise = initial_latents_and_noise(solver)
    ref, ours = run_reference(name, config, num_steps, x), run_python_loop(solver, x, noise)
    scale = np.sqrt(np.append(solver.s[1:], 0) ** 2 + 1) if name == "euler_ancestral" else 1  # [S] or 1
    diff = np.abs(ref - ours).reshape(num_steps, -1).max(-1) / scale
    assert diff.max() < TOLERANCE, f"max abs diff {diff.max():.2e} at step {diff.argmax()}"
    assert np.abs(ref[-1]).max() > 0.5  # a real trajectory, not collapsed to 0


@jax.jit
def _jax_toy_model(x, t):
    return toy_model(x, t, xp=jnp)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_fori_loop_matches_python_loop(name):
    """The whole trajectory under jit with a traced step index, vs stepping from Python."""
    solver = schedulers.make_solver(name, VARIANTS["v_prediction" if name == "ddim" else "sd15"], 12)
    x, noise = initial_latents_and_noise(solver)

    @jax.jit
    def sample(x, noise):
        def body(i, carry):
            x, state = carry
            out = _jax_toy_model(solver.scale_input(x, i), jnp.asarray(solver.timesteps, jnp.float32)[i])
            return solver.step(state, i, x, out, noise[i])
        return jax.lax.fori_loop(0, solver.num_steps, body, (x, solver.init_state(x)))[0]

    looped = np.asarray(sample(jnp.asarray(x), jnp.asarray(noise)))
    xj, state = jnp.asarray(x), solver.init_state(jnp.asarray(x))
    for i in range(solver.num_steps):
        out = _jax_toy_model(solver.scale_input(xj, i), float(solver.timesteps[i]))
        xj, state = solver.step(state, i, xj, out, jnp.asarray(noise[i]))
    assert_allclose(looped, np.asarray(xj), atol=5e-6)  # measured <= 1e-6
    assert not np.allclose(looped, x, atol=0.1)


def test_unknown_solver_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown solver 'plms'.*ddim.*dpmpp_2m.*euler_ancestral"):
        schedulers.make_solver("plms", SD15_SCHEDULER, 10)


@pytest.mark.parametrize("name, key, value", [
    ("ddim", "clip_sample", True),
    ("ddim", "thresholding", True),
    ("dpmpp_2m", "use_karras_sigmas", True),
    ("dpmpp_2m", "solver_order", 3),
    ("dpmpp_2m", "algorithm_type", "sde-dpmsolver++"),
    ("euler_ancestral", "beta_schedule", "squaredcos_cap_v2"),
    ("euler_ancestral", "prediction_type", "sample"),
    ("euler_ancestral", "rescale_betas_zero_snr", True),
])
def test_unsupported_setting_names_key_and_value(name, key, value):
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r}")):
        schedulers.make_solver(name, dict(SD15_SCHEDULER, **{key: value}), 10)


def test_unsupported_default_and_bad_step_counts():
    # DDIMScheduler clips x_0 unless the config says clip_sample=False.
    config = {k: v for k, v in SD15_SCHEDULER.items() if k != "clip_sample"}
    with pytest.raises(ValueError, match="clip_sample=True"):
        schedulers.make_solver("ddim", config, 10)
    # diffusers' "trailing" spacing gives 62 timesteps (the last -1) for 61 steps.
    with pytest.raises(ValueError, match="61"):
        schedulers.make_solver("ddim", VARIANTS["trailing"], 61)
    with pytest.raises(ValueError, match="num_steps 0"):
        schedulers.make_solver("euler_ancestral", SD15_SCHEDULER, 0)
