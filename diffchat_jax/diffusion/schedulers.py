"""Diffusion samplers in JAX (DDIM, DPM-Solver++ 2M, Euler-ancestral), matching diffusers' schedulers step for step.

`make_solver(name, scheduler_config, num_steps)` reads a diffusers scheduler_config.json dict the way
`XScheduler.from_config(pipe.scheduler.config)` does (keys a solver does not read are ignored; missing keys take
that scheduler's diffusers default; settings not supported here raise a ValueError naming the key and value) and
precomputes every per-step quantity in numpy, so that a step is a few array ops indexed by the step number. The
sampling loop, jitted, with i traced (0..S-1):

    x = noise * solver.init_noise_sigma                                    # [B, C, H, W]
    state = solver.init_state(x)
    def body(i, carry):
        x, state = carry
        out = unet(solver.scale_input(x, i), jnp.asarray(solver.timesteps)[i], ...)  # guided output [B, C, H, W]
        return solver.step(state, i, x, out, noise_i)                      # noise_i ~ N(0, I), if solver.stochastic
    x, _ = jax.lax.fori_loop(0, solver.num_steps, body, (x, state))

Notation. The forward process is x_t = alpha_t x_0 + sigma_t eps with alpha_t^2 = alphabar_t (the cumulative
product of 1 - beta) and sigma_t^2 = 1 - alphabar_t. The model predicts eps ("epsilon") or
v = alpha_t eps - sigma_t x_0 ("v_prediction"). Euler-ancestral works in the variance-exploding (Karras) variables
x^ = x_t / alpha_t and s_t = sigma_t / alpha_t (diffusers' `sigmas`), so that x^ = x_0 + s_t eps.

Timesteps: diffusers builds them per scheduler from `timestep_spacing` (`spaced_timesteps`); DPM-Solver++ spaces
num_steps + 1 points for "leading" and "linspace" and drops the final one (diffusers' behaviour, reproduced).
Schedule quantities are float32 as in diffusers (alphabar accumulated in float64, as torch's cumprod does).
"""
import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

SPACINGS = ("leading", "trailing", "linspace")

# The settings every solver reads: key -> (diffusers' default, the values supported here or None for any value).
_SCHEDULE_KEYS = dict(
    num_train_timesteps=(1000, None), beta_start=(0.0001, None), beta_end=(0.02, None),
    beta_schedule=("linear", ("linear", "scaled_linear")), trained_betas=(None, None),
    prediction_type=("epsilon", ("epsilon", "v_prediction")), steps_offset=(0, None),
    rescale_betas_zero_snr=(False, (False,)))


def read_config(keys: dict, config: dict) -> dict:
    """The value of every key in `keys` ({key: (default, supported values or None)}), from `config` or the default;
    raises ValueError for a value that is not supported."""
    values = {}
    for key, (default, supported) in keys.items():
        value = config.get(key, default)
        if supported is not None and value not in supported:
            raise ValueError(f"scheduler config {key}={value!r} is not supported (supported: {list(supported)})")
        values[key] = value
    return values


def alphas_cumprod(cfg: dict) -> np.ndarray:
    """alphabar [T] float32 from the betas of `trained_betas` or `beta_schedule` ("linear": betas evenly spaced
    from beta_start to beta_end; "scaled_linear": their square roots evenly spaced)."""
    count = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], np.float32)
    elif cfg["beta_schedule"] == "linear":
        betas = _torch_linspace_f32(cfg["beta_start"], cfg["beta_end"], count)
    else:
        betas = np.square(_torch_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, count))
    # Accumulated in float64 as torch.cumprod does on CPU: bit-identical to diffusers' alphas_cumprod.
    return np.cumprod((1 - betas).astype(np.float64)).astype(np.float32)


def _torch_linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    """torch.linspace(start, stop, num, dtype=torch.float32) as computed on CPU: a float32 step, each point
    fused-multiply-added from the nearer end (np.linspace differs by an ulp in a third of the betas)."""
    start, stop = np.float32(start), np.float32(stop)
    step = np.float64((stop - start) / np.float32(num - 1))
    k = np.arange(num)
    # float64 products of a float32 and an int are exact, so one rounding to float32, as a fused multiply-add.
    return np.where(k < num // 2, start + step * k, stop - step * (num - 1 - k)).astype(np.float32)


def spaced_timesteps(spacing: str, num_train_timesteps: int, num_steps: int, steps_offset: int) -> np.ndarray:
    """num_steps training timesteps, descending, float64 ("linspace" ones not rounded), as diffusers spaces them:
    leading  k * (T // n) + steps_offset, k = n-1..0
    trailing round(T - k * T / n) - 1, k = 0..n-1
    linspace n points evenly spaced from T-1 down to 0."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps {num_steps} must be in [1, num_train_timesteps={num_train_timesteps}]")
    if spacing == "leading":
        timesteps = np.arange(num_steps)[::-1] * (num_train_timesteps // num_steps) + steps_offset
    elif spacing == "trailing":
        timesteps = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1
    else:
        timesteps = np.linspace(0, num_train_timesteps - 1, num_steps)[::-1]
    if len(timesteps) != num_steps:  # float arange overshoot: diffusers would add a timestep -1
        raise ValueError(f"timestep_spacing {spacing!r} with num_steps={num_steps} gives {len(timesteps)} timesteps "
                         "in diffusers (a rounding bug); use another num_steps")
    return timesteps.astype(np.float64)


def x0_and_eps(prediction_type: str, x, model_output, alpha, sigma):
    """(x_0, eps) predicted from x = alpha x_0 + sigma eps (alpha^2 + sigma^2 = 1) and the model output:
    epsilon: eps = out, x_0 = (x - sigma eps) / alpha; v_prediction: x_0 = alpha x - sigma v, eps = alpha v + sigma x.
    """
    if prediction_type == "epsilon":
        return (x - sigma * model_output) / alpha, model_output
    return alpha * x - sigma * model_output, alpha * model_output + sigma * x


def _at(table: np.ndarray, i):
    """table[i] for a Python or traced step index."""
    return jnp.asarray(table)[i]


def _f32(*arrays):
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashable by identity, so usable as a static jit argument
class Solver:
    """A sampler with its per-step tables precomputed for num_steps steps.

    timesteps: [S] the UNet's timestep at each step (diffusers' `scheduler.timesteps`); init_noise_sigma: the
    initial latents are standard normal noise times it; prediction_type: what the model predicts.
    """
    timesteps: np.ndarray
    init_noise_sigma: float
    prediction_type: str
    stochastic: ClassVar[bool] = False  # whether `step` uses its `noise`
    CONFIG_KEYS: ClassVar[dict]  # the config keys `from_config(cfg, num_steps)` reads, for `read_config`

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def scale_input(self, x: jax.Array, i) -> jax.Array:
        """The UNet input at step i (diffusers' `scale_model_input`): x itself unless overridden."""
        return x

    def init_state(self, x: jax.Array) -> Any:
        """The carry `step` threads through the loop (a pytree); none unless overridden."""
        return ()

    def step(self, state, i, x: jax.Array, model_output: jax.Array, noise: jax.Array) -> tuple[jax.Array, Any]:
        """(x at step i+1, the new state), computed in float32 and returned in x's dtype. i: the step index (an int or
        a traced int32 scalar); x, model_output, noise: [B, C, H, W]."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, eq=False)
class DDIM(Solver):
    """Deterministic DDIM (eta = 0), diffusers' `DDIMScheduler`:

        x_0 = (x_t - sigma_t eps) / alpha_t,    x_prev = alpha_prev x_0 + sigma_prev eps,

    where prev = t - T // num_steps whatever the spacing (diffusers' choice), and alphabar_prev = 1
    (`set_alpha_to_one`) or alphabar_0 when prev < 0. Tables [S]: alpha, sigma at t and at prev.
    """
    alpha: np.ndarray
    sigma: np.ndarray
    alpha_prev: np.ndarray
    sigma_prev: np.ndarray
    CONFIG_KEYS: ClassVar[dict] = dict(
        _SCHEDULE_KEYS, timestep_spacing=("leading", SPACINGS), set_alpha_to_one=(True, None),
        clip_sample=(True, (False,)), thresholding=(False, (False,)))

    @classmethod
    def from_config(cls, cfg: dict, num_steps: int) -> "DDIM":
        abar = alphas_cumprod(cfg)
        count = cfg["num_train_timesteps"]
        timesteps = np.round(spaced_timesteps(cfg["timestep_spacing"], count, num_steps, cfg["steps_offset"]))
        timesteps = timesteps.astype(np.int64)
        prev = timesteps - count // num_steps
        final = np.float32(1.0) if cfg["set_alpha_to_one"] else abar[0]
        abar_t, abar_prev = abar[timesteps], np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
        return cls(timesteps=timesteps, init_noise_sigma=1.0, prediction_type=cfg["prediction_type"],
                   alpha=np.sqrt(abar_t), sigma=np.sqrt(1 - abar_t),
                   alpha_prev=np.sqrt(abar_prev), sigma_prev=np.sqrt(1 - abar_prev))

    def step(self, state, i, x, model_output, noise):
        x32, out = _f32(x, model_output)
        x0, eps = x0_and_eps(self.prediction_type, x32, out, _at(self.alpha, i), _at(self.sigma, i))
        x_prev = _at(self.alpha_prev, i) * x0 + _at(self.sigma_prev, i) * eps
        return x_prev.astype(x.dtype), state


@dataclasses.dataclass(frozen=True, eq=False)
class DPMSolverPP2M(Solver):
    """DPM-Solver++ 2M, diffusers' `DPMSolverMultistepScheduler` with its defaults (algorithm_type "dpmsolver++",
    solver_order 2, solver_type "midpoint", final sigma 0). With alpha, sigma at step i's timestep (sigma 0 after the
    last), lambda = log(alpha / sigma), h_i = lambda_{i+1} - lambda_i and D_i the x_0 predicted at step i, step i is

        x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} (1 - e^{-h_i}) (D_i + (D_i - D_{i-1}) h_i / (2 h_{i-1}))

    with the D_{i-1} term dropped (first order) at the first and the last step. e^{-h_i} = s_{i+1} / s_i (s = sigma
    / alpha), 0 at the last step, whose result is D_{S-1}. `lower_order_final` and `euler_at_final` are not read:
    with a final sigma of 0 the last step is first order anyway, and at order 2 they change nothing else.
    Tables [S]: alpha, sigma at step i (for D_i); ratio sigma_{i+1} / sigma_i; c0 = alpha_{i+1} (1 - e^{-h_i});
    c1 = c0 h_i / (2 h_{i-1}) on second-order steps, else 0. State: D_{i-1}.
    """
    alpha: np.ndarray
    sigma: np.ndarray
    ratio: np.ndarray
    c0: np.ndarray
    c1: np.ndarray
    CONFIG_KEYS: ClassVar[dict] = dict(
        _SCHEDULE_KEYS, timestep_spacing=("linspace", SPACINGS), solver_order=(2, (2,)),
        algorithm_type=("dpmsolver++", ("dpmsolver++",)), solver_type=("midpoint", ("midpoint",)),
        thresholding=(False, (False,)), use_karras_sigmas=(False, (False,)), use_exponential_sigmas=(False, (False,)),
        use_beta_sigmas=(False, (False,)), use_lu_lambdas=(False, (False,)), use_flow_sigmas=(False, (False,)),
        final_sigmas_type=("zero", ("zero",)), lambda_min_clipped=(-float("inf"), (-float("inf"),)),
        variance_type=(None, (None,)))

    @classmethod
    def from_config(cls, cfg: dict, num_steps: int) -> "DPMSolverPP2M":
        abar = alphas_cumprod(cfg)
        spacing, count = cfg["timestep_spacing"], cfg["num_train_timesteps"]
        if spacing == "trailing":
            timesteps = spaced_timesteps(spacing, count, num_steps, cfg["steps_offset"])
        else:  # diffusers spaces num_steps + 1 points and drops the last
            timesteps = spaced_timesteps(spacing, count, num_steps + 1, cfg["steps_offset"])[:-1]
        timesteps = np.round(timesteps).astype(np.int64)
        s = np.append(np.sqrt((1 - abar) / abar)[timesteps], 0.0).astype(np.float64)  # [S + 1]
        alpha = 1 / np.sqrt(s ** 2 + 1)
        sigma = s * alpha
        exp_neg_h = s[1:] / s[:-1]
        c0 = alpha[1:] * (1 - exp_neg_h)
        # h_i / h_{i-1} on the second-order steps 1..S-2 (h_i is infinite at the last step).
        c1 = np.zeros(num_steps)
        c1[1:-1] = 0.5 * c0[1:-1] * np.log(s[1:-2] / s[2:-1]) / np.log(s[:-3] / s[1:-2])
        tables = dict(alpha=alpha[:-1], sigma=sigma[:-1], ratio=sigma[1:] / sigma[:-1], c0=c0, c1=c1)
        return cls(timesteps=timesteps, init_noise_sigma=1.0, prediction_type=cfg["prediction_type"],
                   **{k: v.astype(np.float32) for k, v in tables.items()})

    def init_state(self, x):
        return jnp.zeros(x.shape, jnp.float32)

    def step(self, state, i, x, model_output, noise):
        x32, out = _f32(x, model_output)
        x0, _ = x0_and_eps(self.prediction_type, x32, out, _at(self.alpha, i), _at(self.sigma, i))
        x_next = _at(self.ratio, i) * x32 + _at(self.c0, i) * x0 + _at(self.c1, i) * (x0 - state)
        return x_next.astype(x.dtype), x0


@dataclasses.dataclass(frozen=True, eq=False)
class EulerAncestral(Solver):
    """Euler-ancestral, diffusers' `EulerAncestralDiscreteScheduler`, on x^ = x_t / alpha_t. Step i goes from
    s = s_i to s' = s_{i+1} (s_S = 0) by splitting s'^2 = sigma_down^2 + sigma_up^2 into a deterministic part and
    fresh noise,

        sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2),    sigma_down = sqrt(s'^2 - sigma_up^2),
        x^_{i+1} = x^_i + eps_i (sigma_down - s) + sigma_up z,    z ~ N(0, I),

    an Euler step of dx^/ds = eps down to sigma_down, then noise back up to s' (eps_i = (x^_i - D_i) / s, the
    model's noise prediction). The UNet sees x^ / sqrt(s^2 + 1) = x_t. Timesteps are float32 (fractional for
    "linspace"), s interpolated linearly at them; init_noise_sigma is max s ("linspace", "trailing") or
    sqrt(max s^2 + 1) ("leading"), as diffusers. Tables [S]: alpha = 1 / sqrt(s^2 + 1), s, sigma_up, sigma_down.
    """
    alpha: np.ndarray
    s: np.ndarray
    sigma_up: np.ndarray
    sigma_down: np.ndarray
    stochastic: ClassVar[bool] = True
    CONFIG_KEYS: ClassVar[dict] = dict(_SCHEDULE_KEYS, timestep_spacing=("linspace", SPACINGS))

    @classmethod
    def from_config(cls, cfg: dict, num_steps: int) -> "EulerAncestral":
        abar = alphas_cumprod(cfg)
        spacing, count = cfg["timestep_spacing"], cfg["num_train_timesteps"]
        timesteps = spaced_timesteps(spacing, count, num_steps, cfg["steps_offset"]).astype(np.float32)
        s = np.interp(timesteps, np.arange(count), np.sqrt((1 - abar) / abar)).astype(np.float32)
        s_max = s.max()
        init_noise_sigma = s_max if spacing in ("linspace", "trailing") else np.sqrt(s_max ** 2 + 1)
        s, s_next = s.astype(np.float64), np.append(s[1:], 0.0).astype(np.float64)
        sigma_up = np.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
        sigma_down = np.sqrt(s_next ** 2 - sigma_up ** 2)
        tables = dict(alpha=1 / np.sqrt(s ** 2 + 1), s=s, sigma_up=sigma_up, sigma_down=sigma_down)
        return cls(timesteps=timesteps, init_noise_sigma=float(init_noise_sigma),
                   prediction_type=cfg["prediction_type"], **{k: v.astype(np.float32) for k, v in tables.items()})

    def scale_input(self, x, i):
        return (x.astype(jnp.float32) * _at(self.alpha, i)).astype(x.dtype)

    def step(self, state, i, x, model_output, noise):
        x32, out, z = _f32(x, model_output, noise)
        alpha, s = _at(self.alpha, i), _at(self.s, i)
        _, eps = x0_and_eps(self.prediction_type, alpha * x32, out, alpha, s * alpha)  # in x_t = alpha x^
        x_next = x32 + eps * (_at(self.sigma_down, i) - s) + _at(self.sigma_up, i) * z
        return x_next.astype(x.dtype), state


SOLVERS = {"ddim": DDIM, "dpmpp_2m": DPMSolverPP2M, "euler_ancestral": EulerAncestral}
# The diffusers scheduler class each solver reproduces (for comparisons; `getattr(diffusers, name)`).
DIFFUSERS_SCHEDULERS = {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
                        "euler_ancestral": "EulerAncestralDiscreteScheduler"}


def make_solver(name: str, scheduler_config: dict, num_steps: int) -> Solver:
    """The solver `name` (a key of SOLVERS) for num_steps steps, configured from a diffusers scheduler config dict
    as `XScheduler.from_config(scheduler_config)` + `set_timesteps(num_steps)` would be."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; known: {sorted(SOLVERS)}")
    cls = SOLVERS[name]
    return cls.from_config(read_config(cls.CONFIG_KEYS, scheduler_config), num_steps)
