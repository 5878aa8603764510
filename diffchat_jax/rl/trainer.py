"""PPO training (paper section 3.3): rollout with ADM, rewards, experience with VCI, clipped PPO updates.

`train_and_evaluate(config, workdir)` runs or resumes the job. One iteration:
  prompts T(x, i) -> jitted rollout (pi+ typical sampling; pi- keyword plans for a fraction of samples)
  -> decode -> render the responses with Stable Diffusion (when an image reward is on; fixed seeds)
  -> reward components (CI, aesthetic, PickScore ...) -> combined, normalised scalar reward
  -> prefix CI of every response (VCI) -> jitted experience (log-probs, values, reference log-probs, GAE)
  -> jitted update (epochs x minibatches; only the last N blocks, ln_f and the value head train)
  -> adaptive KL coefficient, metrics, samples, checkpoints.
"""
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from diffchat_jax.data import examples as examples_lib
from diffchat_jax.data import tokenize as tokenize_lib
from diffchat_jax.data import tokenizer as tokenizer_lib
from diffchat_jax.diffusion import images as images_lib, pipeline as sd_pipeline, render as render_lib, schedulers
from diffchat_jax.models import bloom
from diffchat_jax.rewards import base as reward_base, combine
from diffchat_jax.rewards import ci as _ci, image as _image  # noqa: F401  (register "ci", "aesthetic", "pickscore")
from diffchat_jax.rl import kl as kl_lib, losses, ppo
from diffchat_jax.sampling import rollout
from diffchat_jax.sft.trainer import DTYPES, check_data_source
from diffchat_jax.text import adm, integrity, keywords
from diffchat_jax.utils import checkpoint, mesh as mesh_lib, metrics as metrics_lib, optim
from diffchat_jax.utils.validate import ConfigError, one_of, require


# ---------------------------------------------------------------------------------------------------------------
# Config checks.
# ---------------------------------------------------------------------------------------------------------------
def resolve_model_dir(name_or_path: str) -> str:
    """An SFT workdir resolves to its export/; a transformers folder or hub id is used as it is."""
    export = os.path.join(name_or_path, "export")
    return export if os.path.isfile(os.path.join(export, "config.json")) else name_or_path


def validate_config(config, num_devices: int) -> None:
    p, m = config.ppo, config.model
    require(p.lr > 0, "ppo.lr", f"must be > 0, got {p.lr}")
    for field in ("epochs", "ppo_epochs", "grad_accum", "trainable_blocks"):
        require(p[field] >= 1, f"ppo.{field}", f"must be >= 1, got {p[field]}")
    require(p.batch_size % p.minibatch_size == 0, "ppo.batch_size",
            f"({p.batch_size}) must be a multiple of ppo.minibatch_size ({p.minibatch_size})")
    require(p.minibatch_size % (p.grad_accum * num_devices) == 0, "ppo.minibatch_size",
            f"({p.minibatch_size}) must be a multiple of grad_accum x devices = {p.grad_accum} x {num_devices}")
    require(p.batch_size % num_devices == 0, "ppo.batch_size", f"must be a multiple of {num_devices} devices")
    require(0 < p.gamma <= 1 and 0 <= p.lam <= 1, "ppo.gamma/lam", f"must be in (0, 1], got {p.gamma}, {p.lam}")
    require(p.clip > 0 and p.value_clip > 0, "ppo.clip/value_clip", "must be > 0")
    require(config.kl.init >= 0, "kl.init", f"must be >= 0, got {config.kl.init}")
    require(config.kl.target > 0 and config.kl.horizon > 0, "kl.target/horizon", "must be > 0")
    require(config.vci.alpha >= 0, "vci.alpha", f"must be >= 0, got {config.vci.alpha}")
    require(0 <= config.adm.negative_fraction <= 1, "adm.negative_fraction", "must be in [0, 1]")
    one_of(config.reward.on_nonfinite, ("error", "mask"), "reward.on_nonfinite")
    one_of(config.reward.normalize, ("none", "scale", "standardize"), "reward.normalize")
    require(len(config.reward.components) > 0, "reward.components", "is empty")
    for name in config.reward.components:
        one_of(name, reward_base.registered(), f"reward.components.{name}")
    if renders_images(config):
        validate_render_config(config.render)
    one_of(m.compute_dtype, DTYPES, "model.compute_dtype")
    one_of(m.param_dtype, DTYPES, "model.param_dtype")
    require(bool(m.name_or_path), "model.name_or_path", "is empty: set the SFT workdir or export folder")
    require(not _looks_local(m.name_or_path) or os.path.isdir(m.name_or_path), "model.name_or_path",
            f"not found: {m.name_or_path} (run SFT first, e.g. "
            f"python -m diffchat_jax.main --config=configs/sft.py:tiny)")
    require(bool(config.data.train), "data.train", "is empty")
    check_data_source(config.data.train, "data.train")


def renders_images(config) -> bool:
    return any(reward_base.needs_images(name) for name in config.reward.components)


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~", "workdirs"))


def validate_render_config(r) -> None:
    require(bool(r.model), "render.model", "is empty: image rewards need a Stable Diffusion checkpoint")
    require(not _looks_local(r.model) or os.path.exists(r.model), "render.model",
            f"not found: {r.model} (tiny random models for the tiny configs: python -m diffchat_jax.tiny_models)")
    one_of(r.solver, schedulers.SOLVERS, "render.solver")
    one_of(r.seed_policy, ("fixed", "per_iteration"), "render.seed_policy")
    one_of(r.dtype, DTYPES, "render.dtype")
    for field in ("num_steps", "images_per_prompt", "batch_size"):
        require(r[field] >= 1, f"render.{field}", f"must be >= 1, got {r[field]}")
    require(r.height >= 0 and r.width >= 0, "render.height/width", "must be >= 0 (0 = the model's size)")


def build_renderer(config) -> render_lib.Renderer:
    r = config.render
    sd, params = sd_pipeline.load_pretrained(r.model, dtype=DTYPES[r.dtype], config_from=r.config_from or None)
    try:
        settings = render_lib.RenderSettings.from_config(r)
        return render_lib.Renderer(sd, params, settings, batch_size=r.batch_size)
    except ValueError as e:  # e.g. an image size the UNet cannot take
        raise ConfigError(f"config.render: {e}") from e


def render_seeds(r, iteration: int, batch_size: int) -> np.ndarray:
    """[B, N] seeds of the N images of each of B responses under `render.seed_policy`."""
    first = r.seed + (iteration * r.images_per_prompt if r.seed_policy == "per_iteration" else 0)
    return np.broadcast_to(first + np.arange(r.images_per_prompt), (batch_size, r.images_per_prompt))


def log_images(workdir: str, writer, iteration: int, responses, images: np.ndarray, seeds: np.ndarray,
               count: int, model: str) -> None:
    """The first image of the first `count` responses: a TensorBoard grid and one PNG each (prompt in metadata)."""
    count = min(count, len(responses))
    folder = os.path.join(workdir, "images", f"{iteration:06d}")
    for b in range(count):
        images_lib.save_png(os.path.join(folder, f"{b:03d}.png"), images[b, 0],
                            {"prompt": responses[b], "seed": int(seeds[b, 0]), "model": model,
                             "iteration": iteration})
    writer.write_image(iteration, "samples", images_lib.grid(images[:count, 0], columns=min(count, 4)))


# ---------------------------------------------------------------------------------------------------------------
# Host-side helpers.
# ---------------------------------------------------------------------------------------------------------------
def left_padded_prompts(data: tokenize_lib.TokenizedData, rows: np.ndarray, prompt_length: int, pad_id: int):
    """The prompts of `rows`, left-padded to `prompt_length`: (ids [B, P] int32, mask [B, P] int32)."""
    ids = np.full((len(rows), prompt_length), pad_id, np.int32)
    mask = np.zeros((len(rows), prompt_length), np.int32)
    for b, r in enumerate(rows):
        n = int(data.prompt_lengths[r])
        ids[b, prompt_length - n:] = data.input_ids[r, :n]
        mask[b, prompt_length - n:] = 1
    return ids, mask


def state_ci(prefix_ci: np.ndarray) -> np.ndarray:
    """Prefix CI after token t [B, N] -> CI(s_t) of the state before token t (0 for the empty prefix)."""
    return np.concatenate([np.zeros_like(prefix_ci[:, :1]), prefix_ci[:, :-1]], axis=1)


@dataclasses.dataclass
class Setup:
    """What the loop needs, built once."""
    module: bloom.Bloom
    tokenizer: object
    examples: list
    data: tokenize_lib.TokenizedData
    references: list  # per tokenized row: (x_o, i, y_o) for CI
    vocab: adm.KeywordVocab
    prompt_length: int


def build_setup(config) -> tuple[Setup, dict]:
    """Data, tokenizer, model and keyword vocabulary; returns (setup, initial params with a value head)."""
    model_dir = resolve_model_dir(config.model.name_or_path)
    tokenizer = tokenizer_lib.load_tokenizer(model_dir)
    examples, report = examples_lib.load_examples(config.data.train, on_bad_row=config.data.on_bad_row,
                                                  max_chars=config.data.max_chars)
    print(f"data: {report.summary()}")
    max_prompt = config.data.max_length - config.sampling.max_new_tokens
    require(max_prompt >= 16, "sampling.max_new_tokens",
            f"leaves {max_prompt} prompt tokens of data.max_length {config.data.max_length}")
    data, tok_report = tokenize_lib.tokenize_examples(examples, tokenizer, config.data.max_length,
                                                      on_overlong=config.data.on_bad_row)
    print(f"tokenized: {tok_report.summary()}")
    references = [integrity.ci_reference(examples[k]) for k in data.example_index]
    vocab = adm.build_vocab([ref[2] for ref in references], keywords.from_config(config.ci))
    module, params = bloom.load_pretrained(model_dir, dtype=DTYPES[config.model.param_dtype], value_head=True,
                                           compute_dtype=DTYPES[config.model.compute_dtype])
    module = bloom.Bloom(dataclasses.replace(module.config, remat=config.model.remat))
    prompt_length = int(min(data.prompt_lengths.max(), max_prompt))
    require(int(data.prompt_lengths.max()) <= max_prompt, "sampling.max_new_tokens",
            f"leaves {max_prompt} prompt tokens but prompts need up to {int(data.prompt_lengths.max())}")
    return Setup(module, tokenizer, examples, data, references, vocab, prompt_length), params


def log_samples(path: str, iteration: int, setup: Setup, rows, responses, scores, reward, plans, count: int):
    with open(path, "a", encoding="utf-8") as f:
        for b in range(min(count, len(rows))):
            ex = setup.examples[setup.data.example_index[rows[b]]]
            f.write(json.dumps({
                "iteration": iteration, "x": ex.x, "i": ex.i, "y_reference": ex.y, "response": responses[b],
                "reward": float(reward[b]), **{k: float(v[b]) for k, v in scores.items()},
                "negative": bool(plans.negative[b]) if plans is not None else False,
                "edits": [[e.keyword.lemma, e.replacement] for e in plans.edits[b]] if plans is not None else [],
            }) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str, mesh=None) -> dict[str, float]:
    """Runs (or resumes) PPO in `workdir`; returns the mean reward of the first and last iterations."""
    mesh = mesh or mesh_lib.make_mesh()
    validate_config(config, mesh.size)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    p = config.ppo

    # ----- set-up -----
    setup, params = build_setup(config)
    n_layer = setup.module.config.n_layer
    require(p.trainable_blocks <= n_layer, "ppo.trainable_blocks", f"exceeds the model's {n_layer} blocks")
    ref_params = params  # the frozen SFT policy (its value head is computed and ignored)
    trainable, frozen = ppo.partition(params, n_layer, p.trainable_blocks)
    # The policy's trainable part gets its own buffers (the update donates them); the reference shares the rest.
    trainable = jax.tree.map(jnp.copy, trainable)
    iterations_per_epoch = tokenize_lib.num_batches(len(setup.data), p.batch_size)
    require(iterations_per_epoch > 0, "ppo.batch_size", f"exceeds the {len(setup.data)} training prompts")
    total_iterations = p.epochs * iterations_per_epoch
    updates_per_iteration = p.ppo_epochs * (p.batch_size // p.minibatch_size)
    tx = optim.make_optimizer(p, optim.make_schedule(p, total_iterations * updates_per_iteration))
    renderer = build_renderer(config) if renders_images(config) else None
    components = {name: reward_base.make_component(name, config) for name in config.reward.components}
    weights = dict(config.reward.components)
    print(f"{len(setup.data)} prompts, {iterations_per_epoch} iterations per epoch, {total_iterations} "
          f"iterations on {mesh.size} device(s); tagger: {keywords.get_tagger(config.ci.tagger).name}")

    state = {"trainable": trainable, "opt_state": tx.init(trainable), "beta": np.float32(config.kl.init),
             "moments": np.zeros(3, np.float32), "iteration": np.int32(0)}
    state = mesh_lib.replicate(state, mesh)
    frozen, ref_params = mesh_lib.replicate((frozen, ref_params), mesh)
    ckpt = checkpoint.manager(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
    state, _ = checkpoint.restore_latest(ckpt, state)
    start = int(state["iteration"])  # the checkpoint's step is the iteration count too; the state says it itself
    if start:
        print(f"resumed from checkpoint at iteration {start}")
    writer = metrics_lib.MetricWriter(workdir) if is_main else None
    samples_path = os.path.join(workdir, "samples.jsonl")

    hp = {"clip": p.clip, "value_clip": p.value_clip, "vf_coef": p.vf_coef, "ent_coef": p.ent_coef,
          "alpha": config.vci.alpha}
    experience_fn = jax.jit(ppo.experience, static_argnums=0,
                            static_argnames=("prompt_length", "gamma", "lam", "alpha"))
    update_fn = jax.jit(ppo.update, static_argnums=(3, 4), static_argnames=(
        "prompt_length", "ppo_epochs", "minibatch_size", "grad_accum"), donate_argnums=(0, 1))
    special = set(setup.tokenizer.all_special_ids) - {setup.tokenizer.eos_token_id}
    sampling = dataclasses.replace(
        rollout.SamplingConfig.from_config(config.sampling, setup.tokenizer.eos_token_id,
                                           setup.tokenizer.pad_token_id),
        typical_mass=config.sampling.typical_mass if config.adm.positive else 1.0, banned_ids=tuple(sorted(special)))

    # ----- loop -----
    first_reward = last_reward = float("nan")
    with tqdm.tqdm(total=total_iterations, initial=start, desc="ppo", disable=not is_main) as bar:
        for it in range(start, total_iterations):
            epoch, index = divmod(it, iterations_per_epoch)
            order = np.random.default_rng((config.seed, epoch)).permutation(len(setup.data))
            rows = order[index * p.batch_size:(index + 1) * p.batch_size]
            key = jax.random.fold_in(jax.random.PRNGKey(config.seed), it)
            rollout_key, update_key = jax.random.split(key)
            times = {}

            # Rollout.
            t0 = time.perf_counter()
            prompt_ids, prompt_mask = left_padded_prompts(setup.data, rows, setup.prompt_length,
                                                          setup.tokenizer.pad_token_id)
            refs = [setup.references[r] for r in rows]
            plans = adm.make_plans([ref[2] for ref in refs], setup.vocab, setup.tokenizer,
                                   seed=(config.seed, it), negative_fraction=config.adm.negative_fraction,
                                   remove_prob=config.adm.remove_prob,
                                   keywords_per_negative=config.adm.keywords_per_negative,
                                   max_sequences=config.adm.max_sequences,
                                   max_tokens=config.adm.max_tokens) if config.adm.negative else None
            params_now = ppo.merge(state["trainable"], frozen)
            prompts = mesh_lib.shard_batch({"ids": prompt_ids, "mask": prompt_mask}, mesh)
            plan = None if plans is None else mesh_lib.shard_batch(rollout.Plan.from_adm(plans), mesh)
            out = rollout.generate(setup.module, params_now, prompts["ids"], prompts["mask"], rollout_key, sampling,
                                   plan)
            response_ids, response_mask = (np.asarray(x) for x in jax.device_get((out.tokens, out.mask)))
            lengths = response_mask.sum(1)
            times["rollout"] = time.perf_counter() - t0

            responses = [s.strip() for s in setup.tokenizer.batch_decode(
                [r[:n] for r, n in zip(response_ids, lengths)], skip_special_tokens=True)]

            # Images of the responses (for the image rewards): N per response, seeds by render.seed_policy.
            images = seeds = None
            if renderer is not None:
                t0 = time.perf_counter()
                seeds = render_seeds(config.render, it, len(rows))
                images = renderer(np.repeat(responses, seeds.shape[1]).tolist(), seeds.reshape(-1))
                images = images.reshape(*seeds.shape, *images.shape[1:])  # [B, N, H, W, 3]
                times["render"] = time.perf_counter() - t0

            # Rewards and prefix CI.
            t0 = time.perf_counter()
            examples = [setup.examples[setup.data.example_index[r]] for r in rows]
            batch = reward_base.RewardBatch(x_o=[r[0] for r in refs], i=[r[1] for r in refs],
                                            y_o=[r[2] for r in refs], x=[e.x for e in examples],
                                            responses=responses, images=images)
            scores = combine.score_components(components, batch)
            raw_reward, valid = combine.combine(scores, weights, batch, config.reward.on_nonfinite)
            moments = combine.Moments(*(float(v) for v in np.asarray(state["moments"])))
            reward, moments = combine.normalize(raw_reward, valid, moments, config.reward.normalize,
                                                config.reward.clip)
            ci_state = state_ci(integrity.prefix_ci_batch(refs, response_ids, setup.tokenizer, lengths,
                                                          keywords.from_config(config.ci)))
            times["reward"] = time.perf_counter() - t0

            # Experience and update.
            t0 = time.perf_counter()
            data = {"input_ids": np.concatenate([prompt_ids, response_ids], 1).astype(np.int32),
                    "attention_mask": np.concatenate([prompt_mask, response_mask], 1).astype(np.int32),
                    "response_mask": (response_mask * valid[:, None]).astype(np.int32),
                    "ci_state": ci_state.astype(np.float32)}
            data = mesh_lib.shard_batch(data, mesh)
            beta = float(state["beta"])
            exp = experience_fn(setup.module.apply, params_now, ref_params, data,
                                mesh_lib.shard_batch(reward.astype(np.float32), mesh), data["ci_state"],
                                prompt_length=setup.prompt_length, beta=beta, gamma=p.gamma, lam=p.lam,
                                alpha=config.vci.alpha)
            mask = data["response_mask"].astype(jnp.float32)
            advantages = losses.whiten(exp["advantages"], mask) if p.whiten_advantages else exp["advantages"]
            jax.block_until_ready(advantages)
            times["experience"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            update_data = {**data, "old_logp": exp["old_logp"], "old_values": exp["old_values"],
                           "advantages": advantages, "returns": exp["returns"]}
            trainable, opt_state, stats = update_fn(
                state["trainable"], state["opt_state"], frozen, setup.module.apply, tx, update_data, update_key,
                prompt_length=setup.prompt_length, hp=hp, ppo_epochs=p.ppo_epochs,
                minibatch_size=p.minibatch_size, grad_accum=p.grad_accum)
            stats = jax.device_get(stats)
            times["update"] = time.perf_counter() - t0

            # KL control, bookkeeping.
            mean_kl = float(jax.device_get(exp["kl"].sum(1)).mean())
            new_beta = kl_lib.update_beta(beta, mean_kl, len(rows), adaptive=config.kl.adaptive,
                                          target=config.kl.target, horizon=config.kl.horizon)
            state = {"trainable": trainable, "opt_state": opt_state, "beta": np.float32(new_beta),
                     # float32, as a checkpoint restores it (jax arrays without x64): a resumed run normalises
                     # with exactly the moments an uninterrupted one has.
                     "moments": np.array([moments.count, moments.mean, moments.m2], np.float32),
                     "iteration": np.int32(it + 1)}
            mean_reward = float(raw_reward[valid].mean()) if valid.any() else float("nan")
            first_reward = mean_reward if it == start else first_reward
            last_reward = mean_reward
            bar.update(1)
            if writer and ((it + 1) % config.log_every == 0 or it + 1 == total_iterations):
                tokens = float(lengths.sum())
                explained = losses.explained_variance(exp["old_values"], exp["returns"], mask)
                writer.write(it + 1, {
                    "reward": mean_reward, **{f"reward_{k}": float(v[valid].mean()) for k, v in scores.items()},
                    "reward_normalized": float(reward[valid].mean()), "masked_samples": float((~valid).sum()),
                    "kl": mean_kl, "beta": beta, "response_length": float(lengths.mean()),
                    "explained_variance": float(explained),
                    **{k: float(v) for k, v in stats.items()},
                    "negatives": float(plans.negative.sum()) if plans is not None else 0.0,
                    "rollout_tokens_per_s": tokens / times["rollout"],
                    "update_tokens_per_s": tokens * p.ppo_epochs / times["update"],
                    **{f"time_{k}_s": v for k, v in times.items()}})
            if is_main and ((it + 1) % config.sample_log_every == 0 or it == start):
                log_samples(samples_path, it + 1, setup, rows, batch.responses, scores, raw_reward, plans,
                            config.samples_per_log)
            if (writer and images is not None and config.render.log_every
                    and ((it + 1) % config.render.log_every == 0 or it == start)):
                log_images(workdir, writer, it + 1, responses, images, seeds, config.render.log_images,
                           config.render.model)
            if (it + 1) % config.checkpoint_every == 0 or it + 1 == total_iterations:
                checkpoint.save(ckpt, it + 1, state)
    ckpt.wait_until_finished()

    # ----- export -----
    export_dir = os.path.join(workdir, "export")
    if is_main:
        params = jax.device_get(ppo.merge(state["trainable"], frozen))
        bloom.save_pretrained(setup.module.config, params, export_dir)
        setup.tokenizer.save_pretrained(export_dir)
        writer.close()
        print(f"checkpoints: {ckpt.directory}\nmetrics (TensorBoard + metrics.jsonl): {workdir}\n"
              f"sample responses: {samples_path}\ntransformers export (policy + value head): {export_dir}")
        if renderer is not None and config.render.log_every:
            print(f"rendered samples (PNG, prompt in the metadata; also TensorBoard images): {workdir}/images")
    return {"first_reward": first_reward, "last_reward": last_reward, "iterations": total_iterations}
