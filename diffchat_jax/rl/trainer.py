"""PPO training (paper section 3.3): rollout with ADM, rewards, experience with VCI, clipped PPO updates.

`train_and_evaluate(config, workdir)` runs or resumes the job. One iteration (diffchat_jax.rl.learner does each
stage; the loop of diffchat_jax.train.loop does resume, metrics, checkpoints):
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
import numpy as np

from diffchat_jax.data import examples as examples_lib
from diffchat_jax.data import tokenize as tokenize_lib
from diffchat_jax.data import tokenizer as tokenizer_lib
from diffchat_jax.diffusion import images as images_lib, render as render_lib
from diffchat_jax.models import bloom
from diffchat_jax.rewards import base as reward_base
from diffchat_jax.rl import ppo
from diffchat_jax.sampling import rollout as rollout_lib
from diffchat_jax.rl.learner import HostState, Learner, active_components, renders_images
from diffchat_jax.text import adm, integrity, keywords
from diffchat_jax.train import loop, run_config
from diffchat_jax.utils import distributed, mesh as mesh_lib, metrics as metrics_lib
from diffchat_jax.utils.validate import DTYPES, check_data_source, check_model_source, one_of, require


# ---------------------------------------------------------------------------------------------------------------
# Config checks.
# ---------------------------------------------------------------------------------------------------------------
def validate_config(config, num_devices: int) -> None:
    p, m = config.ppo, config.model
    require(p.lr > 0, "ppo.lr", f"must be > 0, got {p.lr}")
    for field in ("epochs", "ppo_epochs", "grad_accum", "trainable_blocks", "logprob_chunk"):
        require(p[field] >= 1, f"ppo.{field}", f"must be >= 1, got {p[field]}")
    require(p.batch_size % p.minibatch_size == 0, "ppo.batch_size",
            f"({p.batch_size}) must be a multiple of ppo.minibatch_size ({p.minibatch_size})")
    require(p.minibatch_size % (p.grad_accum * num_devices) == 0, "ppo.minibatch_size",
            f"({p.minibatch_size}) must be a multiple of grad_accum x devices = {p.grad_accum} x {num_devices}")
    require(p.batch_size % num_devices == 0, "ppo.batch_size", f"must be a multiple of {num_devices} devices")
    for field in ("rollout_batch_size", "experience_batch_size"):  # rows per call of that step
        rows = p[field]
        require(rows == 0 or (rows > 0 and p.batch_size % rows == 0 and rows % num_devices == 0), f"ppo.{field}",
                f"({rows}) must be 0 (the whole batch) or divide ppo.batch_size ({p.batch_size}) and be a multiple "
                f"of {num_devices} devices")
    require(0 < p.gamma <= 1 and 0 <= p.lam <= 1, "ppo.gamma/lam", f"must be in (0, 1], got {p.gamma}, {p.lam}")
    require(p.clip > 0 and p.value_clip > 0, "ppo.clip/value_clip", "must be > 0")
    require(p.ent_coef >= 0, "ppo.ent_coef", f"must be >= 0, got {p.ent_coef}")
    require(config.kl.init >= 0, "kl.init", f"must be >= 0, got {config.kl.init}")
    require(config.kl.target > 0 and config.kl.horizon > 0, "kl.target/horizon", "must be > 0")
    require(config.vci.alpha >= 0, "vci.alpha", f"must be >= 0, got {config.vci.alpha}")
    require(0 <= config.adm.negative_fraction <= 1, "adm.negative_fraction", "must be in [0, 1]")
    require(config.memory_limit_gib >= 0, "memory_limit_gib", f"must be >= 0 (0 = no check), got "
            f"{config.memory_limit_gib}")
    one_of(config.reward.on_nonfinite, ("error", "mask"), "reward.on_nonfinite")
    one_of(config.reward.normalize, ("none", "scale", "standardize"), "reward.normalize")
    require(len(active_components(config)) > 0, "reward.components", "is empty (or every weight is 0)")
    for name in config.reward.components:
        one_of(name, reward_base.registered(), f"reward.components.{name}")
    if renders_images(config):
        validate_render_config(config.render)
    one_of(m.compute_dtype, DTYPES, "model.compute_dtype")
    one_of(m.param_dtype, DTYPES, "model.param_dtype")
    require(bool(m.name_or_path), "model.name_or_path", "is empty: set the SFT workdir or export folder")
    check_model_source(m.name_or_path, "model.name_or_path",
                       "run SFT first, e.g. python -m diffchat_jax.main --config=configs/sft.py:tiny")
    require(bool(config.data.train), "data.train", "is empty")
    check_data_source(config.data.train, "data.train")
    keywords.from_config(config.ci)  # candidate_pos and tagger, as typed on the command line
    rollout_lib.SamplingConfig.from_config(config.sampling, eos_id=0, pad_id=0)  # its checks (ids do not matter)


def validate_render_config(r) -> None:
    require(bool(r.model), "render.model", "is empty: image rewards need a Stable Diffusion checkpoint")
    check_model_source(r.model, "render.model", "tiny random models for the tiny configs: "
                       "python -m diffchat_jax.tiny_models")
    render_lib.validate_settings(r)


# ---------------------------------------------------------------------------------------------------------------
# Data: prompts, references, keyword vocabulary.
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
class Prompts:
    """The training prompts, built once."""
    tokenizer: object
    examples: list
    data: tokenize_lib.TokenizedData
    references: list  # per tokenized row: (x_o, i, y_o) for CI
    vocab: adm.KeywordVocab
    prompt_length: int  # P: the longest prompt (every prompt is left-padded to it)


def load_prompts(config) -> Prompts:
    model_dir = bloom.resolve_model_dir(config.model.name_or_path)
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
    require(int(data.prompt_lengths.max()) <= max_prompt, "sampling.max_new_tokens",
            f"leaves {max_prompt} prompt tokens but prompts need up to {int(data.prompt_lengths.max())}")
    return Prompts(tokenizer, examples, data, references, vocab, int(data.prompt_lengths.max()))


# ---------------------------------------------------------------------------------------------------------------
# Logging.
# ---------------------------------------------------------------------------------------------------------------
def log_samples(path: str, iteration: int, prompts: Prompts, rows, responses, scores, reward, negatives, edits,
                count: int):
    """The first `count` rows of the batch: rows, responses, scores, reward [B]; negatives [B] bool (or empty: no
    ADM pi-); edits: per row, the pi- [keyword, replacement] pairs."""
    with open(path, "a", encoding="utf-8") as f:
        for b in range(min(count, len(rows))):
            ex = prompts.examples[prompts.data.example_index[rows[b]]]
            f.write(json.dumps({
                "iteration": iteration, "x": ex.x, "i": ex.i, "y_reference": ex.y, "response": responses[b],
                "reward": float(reward[b]), **{k: float(v[b]) for k, v in scores.items()},
                "negative": bool(negatives[b]) if len(negatives) else False, "edits": edits[b],
            }) + "\n")


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
# The job.
# ---------------------------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str, mesh=None, allow_config_change: bool = False) -> dict[str, float]:
    """Runs (or resumes) PPO in `workdir`; returns the mean reward of the first and last iterations this process
    ran. A resume with a config that alters the run raises ConfigError unless allow_config_change."""
    mesh = mesh or mesh_lib.from_config(config)
    validate_config(config, mesh.size)
    workdir = os.path.abspath(workdir)
    changed = run_config.check_resume(config, workdir, allow_config_change)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    p = config.ppo

    # ----- set-up -----
    prompts = load_prompts(config)
    iterations_per_epoch = tokenize_lib.num_batches(len(prompts.data), p.batch_size)
    require(iterations_per_epoch > 0, "ppo.batch_size", f"exceeds the {len(prompts.data)} training prompts")
    total_iterations = p.epochs * iterations_per_epoch
    learner = Learner(config, mesh, prompt_length=prompts.prompt_length, tokenizer=prompts.tokenizer,
                      total_iterations=total_iterations)
    print(f"{len(prompts.data)} prompts, {iterations_per_epoch} iterations per epoch, {total_iterations} "
          f"iterations on {mesh.size} device(s) (mesh {dict(mesh.shape)}); "
          f"tagger: {keywords.get_tagger(config.ci.tagger).name}")
    loop.check_memory(learner.memory_report(), config.memory_limit_gib)
    writer = metrics_lib.MetricWriter(workdir) if is_main else None
    samples_path = os.path.join(workdir, "samples.jsonl")
    keyword_config = keywords.from_config(config.ci)
    tokenizer = prompts.tokenizer
    # The mean reward of the first and last iterations this process runs.
    run = {"first_reward": float("nan"), "last_reward": float("nan"), "first": True}

    def iteration(state, host, it, log):
        learner.state, learner.host = state, HostState.from_json(host)
        epoch, index = divmod(it, iterations_per_epoch)
        order = np.random.default_rng((config.seed, epoch)).permutation(len(prompts.data))
        # The global batch, the same on every process; host stages run on this process's part of it.
        mine = mesh_lib.process_rows(mesh, p.batch_size)
        rows = order[index * p.batch_size:(index + 1) * p.batch_size][mine]
        positions = np.arange(p.batch_size)[mine]
        rollout_key, update_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), it))
        times = {}

        # Rollout.
        t0 = time.perf_counter()
        prompt_ids, prompt_mask = left_padded_prompts(prompts.data, rows, prompts.prompt_length,
                                                      tokenizer.pad_token_id)
        refs = [prompts.references[r] for r in rows]
        plans = adm.make_plans([ref[2] for ref in refs], prompts.vocab, tokenizer, seed=(config.seed, it),
                               negative_fraction=config.adm.negative_fraction, remove_prob=config.adm.remove_prob,
                               keywords_per_negative=config.adm.keywords_per_negative,
                               max_sequences=config.adm.max_sequences, max_tokens=config.adm.max_tokens,
                               positions=positions) if config.adm.negative else None
        response_ids, response_mask = learner.rollout(prompt_ids, prompt_mask, plans, rollout_key, positions)
        lengths = response_mask.sum(1)
        times["rollout"] = time.perf_counter() - t0
        responses = [s.strip() for s in tokenizer.batch_decode(
            [r[:n] for r, n in zip(response_ids, lengths)], skip_special_tokens=True)]
        all_responses = distributed.gather_objects(responses)

        # Images of the responses (for the image rewards): N per response, seeds by render.seed_policy.
        t0 = time.perf_counter()
        images, seeds = learner.render(responses, it)
        if images is not None:
            times["render"] = time.perf_counter() - t0

        # Rewards (of the whole batch: gathered) and prefix CI.
        t0 = time.perf_counter()
        examples = [prompts.examples[prompts.data.example_index[r]] for r in rows]
        reward_batch = reward_base.RewardBatch(x_o=[r[0] for r in refs], i=[r[1] for r in refs],
                                               y_o=[r[2] for r in refs], x=[e.x for e in examples],
                                               responses=responses, images=images)
        scored = learner.score(reward_batch, all_responses)
        ci_state = state_ci(integrity.prefix_ci_batch(refs, response_ids, tokenizer, lengths, keyword_config))
        times["reward"] = time.perf_counter() - t0

        # Experience and update.
        t0 = time.perf_counter()
        batch = ppo.Batch(input_ids=np.concatenate([prompt_ids, response_ids], 1).astype(np.int32),
                          attention_mask=np.concatenate([prompt_mask, response_mask], 1).astype(np.int32),
                          response_mask=(response_mask * scored.valid[mine, None]).astype(np.int32),
                          ci_state=ci_state.astype(np.float32), scores=scored.reward[mine].astype(np.float32))
        beta = learner.host.beta
        exp, exp_stats = learner.experience(batch)  # its stats are on the host: the step has finished
        times["experience"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        update_stats = learner.update(exp, update_key)
        times["update"] = time.perf_counter() - t0
        del exp
        learner.adapt_kl(exp_stats["kl"], p.batch_size)

        # Bookkeeping (over the whole batch).
        valid = scored.valid
        all_lengths = distributed.gather_rows(lengths)
        negatives = distributed.gather_rows(plans.negative) if plans is not None else np.zeros(0, bool)
        mean_reward = float(scored.raw[valid].mean()) if valid.any() else float("nan")
        run["first_reward"] = mean_reward if run["first"] else run["first_reward"]
        run["last_reward"] = mean_reward
        done = it + 1
        # Samples and images at the first iteration and every N: a resumed run logs what an uninterrupted one would.
        if done % config.sample_log_every == 0 or done == 1:
            edits = distributed.gather_objects(
                [[[e.keyword.lemma, e.replacement] for e in plans.edits[b]] for b in range(len(rows))]
                if plans is not None else [[] for _ in rows])
            if is_main:
                all_rows = order[index * p.batch_size:(index + 1) * p.batch_size]
                log_samples(samples_path, done, prompts, all_rows, all_responses, scored.scores, scored.raw,
                            negatives, edits, config.samples_per_log)
        if (writer and images is not None and config.render.log_every
                and (done % config.render.log_every == 0 or done == 1)):
            log_images(workdir, writer, done, responses, images, seeds, config.render.log_images,
                       config.render.model)  # process 0's rows: the first of the batch
        run["first"] = False
        tokens = float(all_lengths.sum())
        metrics = {
            "reward": mean_reward, **{f"reward_{k}": float(v[valid].mean()) for k, v in scored.scores.items()},
            "reward_normalized": float(scored.reward[valid].mean()), "masked_samples": float((~valid).sum()),
            "kl": exp_stats["kl"], "beta": beta, "response_length": float(all_lengths.mean()),
            "explained_variance": exp_stats["explained_variance"], **update_stats,
            "negatives": float(negatives.sum()),
            "rollout_tokens_per_s": tokens / times["rollout"],
            "update_tokens_per_s": tokens * p.ppo_epochs / times["update"],
            **{f"time_{k}_s": v for k, v in times.items()}}
        return learner.state, learner.host.to_json(), metrics

    spec = loop.Loop(desc="ppo", unit="iteration", workdir=workdir, total_steps=total_iterations,
                     log_every=config.log_every, checkpoint_every=config.checkpoint_every,
                     keep_checkpoints=config.keep_checkpoints,
                     rewind=(lambda done: metrics_lib.rewind_jsonl(samples_path, "iteration", done),
                             lambda done: loop.rewind_step_folders(os.path.join(workdir, "images"), done)))
    run_config.save(config, workdir, changed)
    state, host = loop.run(spec, learner.state, learner.host.to_json(), iteration, writer)
    learner.state, learner.host = state, HostState.from_json(host)

    # ----- export -----
    export_dir = loop.export_bloom(workdir, learner.module.config, learner.policy_params, tokenizer)  # a collective
    if is_main:
        writer.close()
        print(f"checkpoints: {os.path.join(workdir, 'checkpoints')}\nmetrics (TensorBoard + metrics.jsonl): "
              f"{workdir}\nsample responses: {samples_path}\ntransformers export (policy + value head): {export_dir}")
        if learner.renderer is not None and config.render.log_every:
            print(f"rendered samples (PNG, prompt in the metadata; also TensorBoard images): {workdir}/images")
    return {"first_reward": run["first_reward"], "last_reward": run["last_reward"], "iterations": total_iterations}
