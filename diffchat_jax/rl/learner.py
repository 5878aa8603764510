"""The PPO learner (paper section 3.3): built once from the config, one method per stage of an iteration.

    learner = Learner(config, mesh, prompt_length=P, tokenizer=tokenizer, total_iterations=I)
    tokens, mask = learner.rollout(prompt_ids, prompt_mask, plans, key, positions)  # sampler, ADM pi+ / pi-
    images, seeds = learner.render(responses, iteration)                   # SD 1.x, when an image reward is on
    scored = learner.score(reward_batch, all_responses)                    # components -> one scalar per sample
    exp, stats = learner.experience(batch)                                 # jitted: log-probs, V, KL, GAE + VCI
    stats = learner.update(exp, key)                                       # jitted: PPO epochs; then adapt_kl

State: `learner.state` (on the devices: the trainable params and their optimizer state, a ppo.TrainState) and
`learner.host` (HostState: the KL coefficient and the running reward moments, plain floats on the host). Both go
into every checkpoint (orbax: the device tree as arrays, the host state as JSON).

Everything placed on devices uses the one `mesh` passed in: the policy and reference on all of it, the renderer and
the scorers on its devices of this process (`mesh.process_local`; the same mesh with one process). With several
processes each stage takes this process's rows of the global batch; `score` gathers the rewards of all rows.
`Learner(..., abstract=True)` builds the same learner from the checkpoints' configs alone (no weights are read):
its `memory_report()` compiles every jitted step on abstract arguments and reads what XLA says they need.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffchat_jax.diffusion import pipeline as sd_pipeline, render as render_lib
from diffchat_jax.models import bloom
from diffchat_jax.rewards import base as reward_base, combine
from diffchat_jax.rewards import ci as _ci, image as _image  # noqa: F401  (register "ci", "aesthetic", "pickscore")
from diffchat_jax.rl import kl as kl_lib, ppo
from diffchat_jax.sampling import rollout
from diffchat_jax.utils import aot, distributed, mesh as mesh_lib, optim
from diffchat_jax.utils.validate import DTYPES, ConfigError


def active_components(config) -> dict[str, float]:
    """`reward.components` without the weight-0 ones: a weight of 0 turns a component off (not loaded, not scored;
    e.g. --config.reward.components.pickscore=0)."""
    return {name: float(w) for name, w in config.reward.components.items() if w != 0}


def renders_images(config) -> bool:
    return any(reward_base.needs_images(name) for name in active_components(config))


def build_renderer(config, mesh, abstract: bool = False) -> render_lib.Renderer:
    r = config.render
    sd, params = sd_pipeline.load_pretrained(r.model, dtype=DTYPES[r.dtype], config_from=r.config_from or None,
                                             abstract=abstract)
    try:
        settings = render_lib.RenderSettings.from_config(r)
        return render_lib.Renderer(sd, params, settings, batch_size=r.batch_size, mesh=mesh)
    except ValueError as e:  # e.g. an image size the UNet cannot take
        raise ConfigError(f"config.render: {e}") from e


def render_seeds(r, iteration: int, batch_size: int) -> np.ndarray:
    """[B, N] seeds of the N images of each of B responses under `render.seed_policy`."""
    first = r.seed + (iteration * r.images_per_prompt if r.seed_policy == "per_iteration" else 0)
    return np.broadcast_to(first + np.arange(r.images_per_prompt), (batch_size, r.images_per_prompt))


@dataclasses.dataclass(frozen=True)
class HostState:
    """The learner's host-side state: the KL coefficient beta and the running moments of the combined reward."""
    beta: float
    moments: combine.Moments = combine.Moments()

    def to_json(self) -> dict:
        return {"beta": self.beta, "moments": dataclasses.asdict(self.moments)}

    @classmethod
    def from_json(cls, state: dict) -> "HostState":
        return cls(beta=float(state["beta"]), moments=combine.Moments(**state["moments"]))


@dataclasses.dataclass(frozen=True)
class Scored:
    """The rewards of one batch: every component's scores, their weighted sum (raw), the normalised and clipped
    reward the update uses, and which samples have finite scores (the others are left out of the update)."""
    scores: dict[str, np.ndarray]  # name -> [B] float64
    raw: np.ndarray  # [B] float64
    reward: np.ndarray  # [B] float64, 0 where not valid
    valid: np.ndarray  # [B] bool


class Learner:
    """See the module docstring. `prompt_length`: the width P of the left-padded prompts; `tokenizer`: the policy's
    (its EOS, pad and special ids shape the sampler; None only when abstract); `total_iterations`: the length of
    the job, for the learning-rate schedule."""

    def __init__(self, config, mesh, *, prompt_length: int, tokenizer=None, total_iterations: int = 1,
                 abstract: bool = False):
        self.config, self.mesh = config, mesh
        m, p = config.model, config.ppo
        module, params = bloom.load_pretrained(bloom.resolve_model_dir(m.name_or_path), dtype=DTYPES[m.param_dtype],
                                               value_head=True, compute_dtype=DTYPES[m.compute_dtype],
                                               abstract=abstract)
        self.module = bloom.Bloom(dataclasses.replace(module.config, remat=m.remat))
        self.hp = ppo.Hyper.from_config(config, module.config.n_layer, prompt_length)

        # The reference (frozen SFT) policy differs from the policy only in the trainable part; `frozen` is shared.
        trainable, frozen = ppo.partition(params, module.config.n_layer, p.trainable_blocks)
        self.frozen = mesh_lib.shard_params(frozen, mesh)
        self.ref_trainable = mesh_lib.shard_params(trainable, mesh)
        # The policy's own buffers: the update donates them.
        trainable = self.ref_trainable if abstract else jax.tree.map(jnp.copy, self.ref_trainable)
        updates_per_iteration = p.ppo_epochs * (p.batch_size // p.minibatch_size)
        self.tx = optim.make_optimizer(p, optim.make_schedule(p, total_iterations * updates_per_iteration))
        opt_shardings = mesh_lib.param_shardings(jax.eval_shape(self.tx.init, trainable), mesh)
        opt_state = (mesh_lib.place(jax.eval_shape(self.tx.init, trainable), opt_shardings) if abstract
                     else jax.jit(self.tx.init, out_shardings=opt_shardings)(trainable))
        self.state = ppo.TrainState(trainable, opt_state)
        self.steps = ppo.make_steps(self.module, self.tx, self.hp, mesh, self.state, self.frozen)
        self.host = HostState(beta=float(config.kl.init))

        special = () if tokenizer is None else rollout.banned_special_ids(tokenizer)
        eos, pad = (0, 0) if tokenizer is None else (tokenizer.eos_token_id, tokenizer.pad_token_id)
        self.sampling = dataclasses.replace(
            rollout.SamplingConfig.from_config(config.sampling, eos, pad),
            typical_mass=config.sampling.typical_mass if config.adm.positive else 1.0, banned_ids=special)

        # The reward models run on each process's own devices, on its own rows.
        local = mesh_lib.process_local(mesh)
        self.renderer = build_renderer(config, local, abstract) if renders_images(config) else None
        self.weights = active_components(config)
        self.components = {name: reward_base.make_component(name, config, local, abstract) for name in self.weights}

    # ----- placement -------------------------------------------------------------------------------------------
    def _replicated(self, x):
        return mesh_lib.replicate(x, self.mesh)

    @property
    def policy_params(self):
        """The policy's whole param tree (trainable and frozen parts; no copy)."""
        return ppo.merge(self.state.trainable, self.frozen)

    # ----- the stages ------------------------------------------------------------------------------------------
    def rollout(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, plans, key,
                positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This process's left-padded prompts [B_local, P], their ADM pi- plans (adm.AdmPlan or None) and their
        positions in the global batch [B_local] -> (response ids, mask) [B_local, N].

        In calls of `ppo.rollout_batch_size` global rows (0 = the whole batch at once); every process calls
        together with its share. A row's draws depend on `key` and its position only (rollout.generate)."""
        p = self.config.ppo
        size = (p.rollout_batch_size or p.batch_size) // jax.process_count()  # this process's rows per call
        plan = None if plans is None else rollout.Plan.from_adm(plans)
        tokens, masks = [], []
        for start in range(0, len(prompt_ids), size):
            rows = slice(start, start + size)
            ids, mask, rows_positions = mesh_lib.shard_batch(
                (prompt_ids[rows], prompt_mask[rows], positions[rows].astype(np.int32)), self.mesh)
            rows_plan = None if plan is None else mesh_lib.shard_batch(jax.tree.map(lambda x: x[rows], plan),
                                                                       self.mesh)
            out = rollout.generate(self.module, self.policy_params, ids, mask, self._replicated(key),
                                   self.sampling, rows_plan, rows_positions)
            tokens.append(mesh_lib.local_rows(out.tokens))
            masks.append(mesh_lib.local_rows(out.mask))
        return np.concatenate(tokens), np.concatenate(masks)

    def render(self, responses: list[str], iteration: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(images [B, n, H, W, 3] uint8, seeds [B, n]) of the responses, n = render.images_per_prompt; (None, None)
        when no reward component needs images."""
        if self.renderer is None:
            return None, None
        seeds = render_seeds(self.config.render, iteration, len(responses))
        images = self.renderer(np.repeat(responses, seeds.shape[1]).tolist(), seeds.reshape(-1))
        return images.reshape(*seeds.shape, *images.shape[1:]), seeds

    def score(self, batch: reward_base.RewardBatch, responses: list[str]) -> Scored:
        """Every component on this process's rows, gathered over the processes into the whole batch, combined and
        normalised with the running moments (which it updates, the same on every process). `responses`: those
        of the whole batch (distributed.gather_objects), named in errors. Returns the whole batch's Scored."""
        r = self.config.reward
        scores = {k: distributed.gather_rows(v) for k, v in combine.score_components(self.components, batch).items()}
        raw, valid = combine.combine(scores, self.weights, responses, r.on_nonfinite)
        reward, moments = combine.normalize(raw, valid, self.host.moments, r.normalize, r.clip)
        self.host = dataclasses.replace(self.host, moments=moments)
        return Scored(scores, raw, reward, valid)

    def experience(self, batch: ppo.Batch) -> tuple[ppo.Experience, dict[str, float]]:
        """A host Batch (numpy) -> the Experience on the devices and its stats (kl, explained_variance)."""
        exp, stats = self.steps.experience(self.state.trainable, self.frozen, self.ref_trainable,
                                           mesh_lib.shard_batch(batch, self.mesh),
                                           self._replicated(np.float32(self.host.beta)))
        return exp, {k: float(v) for k, v in jax.device_get(stats).items()}

    def update(self, exp: ppo.Experience, key) -> dict[str, float]:
        """PPO epochs over the experience; returns the mean losses and statistics."""
        self.state, stats = self.steps.update(self.state, self.frozen, exp, self._replicated(key))
        return {k: float(v) for k, v in jax.device_get(stats).items()}

    def adapt_kl(self, mean_kl: float, n_samples: int) -> None:
        """The adaptive KL controller's step (a fixed beta stays)."""
        k = self.config.kl
        beta = kl_lib.update_beta(self.host.beta, mean_kl, n_samples, adaptive=k.adaptive, target=k.target,
                                  horizon=k.horizon)
        self.host = dataclasses.replace(self.host, beta=beta)

    # ----- memory ----------------------------------------------------------------------------------------------
    def device_steps(self) -> list[aot.Step]:
        """Every jitted call of an iteration on abstract arguments of the real shapes and shardings, in order."""
        c = self.config
        batch_size, prompt, new = c.ppo.batch_size, self.hp.prompt_length, self.sampling.max_new_tokens
        rollout_rows = c.ppo.rollout_batch_size or batch_size
        s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
        key = self._abstract_replicated(s((2,), jnp.uint32))
        prompts = mesh_lib.shard_batch((s((rollout_rows, prompt), jnp.int32),) * 2, self.mesh)
        plan = None
        if c.adm.negative:
            rows = s((rollout_rows, c.adm.max_sequences, c.adm.max_tokens), jnp.int32)
            plan = mesh_lib.shard_batch(rollout.Plan(negative=s((rollout_rows,), jnp.bool_), ban=rows,
                                                     steer_from=rows, steer_to=rows), self.mesh)
        params = aot.abstract(self.policy_params)
        positions = mesh_lib.shard_batch(s((rollout_rows,), jnp.int32), self.mesh)
        steps = [aot.Step("rollout", rollout.generate,
                          (self.module, params, *prompts, key, self.sampling, plan, positions), resident=(1,))]
        if self.renderer is not None:  # each process renders and scores its own rows
            n_images = batch_size // jax.process_count() * c.render.images_per_prompt
            steps += self.renderer.device_steps(n_images)
            for component in self.components.values():
                if component.device_steps is not None:
                    steps += component.device_steps(n_images, (self.renderer.height, self.renderer.width))
        length = prompt + new
        batch = mesh_lib.shard_batch(ppo.Batch(
            input_ids=s((batch_size, length), jnp.int32), attention_mask=s((batch_size, length), jnp.int32),
            response_mask=s((batch_size, new), jnp.int32), ci_state=s((batch_size, new), jnp.float32),
            scores=s((batch_size,), jnp.float32)), self.mesh)
        beta = self._abstract_replicated(s((), jnp.float32))
        state, frozen, ref = (aot.abstract(t) for t in (self.state, self.frozen, self.ref_trainable))
        steps.append(aot.Step("experience", self.steps.experience, (state.trainable, frozen, ref, batch, beta),
                              resident=(0, 1, 2)))
        exp, _ = jax.eval_shape(self.steps.experience, state.trainable, frozen, ref, batch, beta)
        steps.append(aot.Step("update", self.steps.update, (state, frozen, mesh_lib.shard_batch(exp, self.mesh),
                                                           key), resident=(0, 1)))
        return steps

    def _abstract_replicated(self, x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=mesh_lib.replicated(self.mesh))

    def resident(self) -> dict:
        """The trees that stay on the devices through the whole job."""
        trees = {"policy": self.state.trainable, "frozen": self.frozen, "reference": self.ref_trainable,
                 "optimizer": self.state.opt_state}
        if self.renderer is not None:
            trees["renderer"] = self.renderer.params
        trees.update({name: c.params for name, c in self.components.items() if c.params is not None})
        return trees

    def memory_report(self) -> aot.Report:
        return aot.report(self.device_steps(), self.resident())
