"""PPO with ADM and VCI (paper section 3.3, appendix A.5; Table 3 column RL): the main training stage.

  python -m diffchat_jax.main --config=configs/ppo.py --config.model.name_or_path=workdirs/sft/export \
      --config.data.train=/path/to/instructpe.json
  python -m diffchat_jax.tiny_models && python -m diffchat_jax.main --config=configs/ppo.py:tiny
      # after configs/sft.py:tiny; tiny random SD + scorers; CPU, minutes

Variants (combine with commas, e.g. `:tiny,no_vci`): tiny; no_vci (alpha = 0); no_negative (no ADM pi-);
no_positive (plain top-p sampling instead of ADM pi+ typical sampling); no_adm (both).
"""
import ml_collections

from diffchat_jax.configs import base
from diffchat_jax.errors import ConfigError
from diffchat_jax.data import SAMPLE_PATH

TINY_MODELS = "workdirs/tiny-models"  # python -m diffchat_jax.tiny_models (make demo builds them)


def get_config(arg=None):
    variants = set(arg.split(",")) if arg else set()
    known = {"tiny", "no_vci", "no_negative", "no_positive", "no_adm"}
    if variants - known:
        raise ConfigError(f"--config=configs/ppo.py: unknown variant(s) {sorted(variants - known)}; known: {sorted(known)}")
    c = base.get_config()
    c.mode = "ppo"
    # The SFT result: its workdir (the export/ inside is used) or a transformers BLOOM folder with its tokenizer.
    c.model.name_or_path = "workdirs/sft/export"
    # Recompute the trainable blocks' activations in the update's backward pass: 11 GiB instead of 34 for the update
    # at the paper's shapes (README, "Memory at the paper's scale"), for one more forward pass of those blocks.
    c.model.remat = True

    c.ppo = ml_collections.ConfigDict()
    c.ppo.epochs = 5  # passes over the training prompts (Table 3)
    c.ppo.batch_size = 128  # prompts per rollout batch (global)
    c.ppo.ppo_epochs = 4  # optimisation passes over each rollout batch (not given by the paper; trlx's default)
    c.ppo.minibatch_size = 32  # samples per optimizer step (not given by the paper)
    c.ppo.grad_accum = 1  # micro-batches per minibatch (memory)
    # Rows per call of the sampler (the KV cache and prefill scale with it); 0 = the whole batch at once.
    c.ppo.rollout_batch_size = 0
    # Rows per forward pass of the experience step (policy and reference log-probs, values); 0 = the whole batch.
    c.ppo.experience_batch_size = 32
    c.ppo.logprob_chunk = 16  # response positions per LM-head chunk: the [B, chunk, V] logits are the peak
    c.ppo.trainable_blocks = 8  # only the last N transformer blocks (+ ln_f, value head) train
    c.ppo.lr = 5e-6
    c.ppo.warmup_steps = 0
    c.ppo.min_lr_ratio = 0.0
    c.ppo.weight_decay = 1e-6
    c.ppo.b1 = 0.9
    c.ppo.b2 = 0.95
    c.ppo.eps = 1e-8
    c.ppo.grad_clip = 1.0
    c.ppo.gamma = 0.99
    c.ppo.lam = 0.95
    c.ppo.clip = 0.2  # policy ratio clipping
    c.ppo.value_clip = 0.2  # value clipping around the rollout's V̂ (not given by the paper; trlx's default)
    c.ppo.vf_coef = 0.5  # value-loss scale w.r.t. the policy loss
    c.ppo.ent_coef = 0.0
    c.ppo.whiten_advantages = True

    c.kl = ml_collections.ConfigDict()
    c.kl.init = 0.05  # initial KL coefficient beta
    c.kl.adaptive = True  # Ziegler et al.'s adaptive controller; False = fixed beta
    c.kl.target = 6.0  # nats per sequence (not given by the paper; trlx's default)
    c.kl.horizon = 10000

    c.vci = ml_collections.ConfigDict()
    c.vci.alpha = 0.05  # V̂ = V + alpha * CI(prefix); 0 disables VCI

    # pi+: typical sampling with mass sampling.typical_mass (0.97) for every sample that is not a pi- negative;
    # False turns it off (the other sampling.* transforms still apply).
    c.adm.positive = True
    c.adm.negative = True  # pi-: keyword removal / replacement plans for adm.negative_fraction of the samples

    # The paper's APC feedback: aesthetics, preference (PickScore) and content integrity. The paper gives no
    # weights; all 1: their spreads across prompts are alike (aesthetic ~0.5, PickScore ~1, CI 0..1).
    c.reward.components = ml_collections.ConfigDict({"aesthetic": 1.0, "pickscore": 1.0, "ci": 1.0})

    c.log_every = 1  # iterations
    c.sample_log_every = 10  # iterations between sample responses written to samples.jsonl
    c.samples_per_log = 8
    c.checkpoint_every = 50

    if "no_vci" in variants:
        c.vci.alpha = 0.0
    if variants & {"no_negative", "no_adm"}:
        c.adm.negative = False
    if variants & {"no_positive", "no_adm"}:
        c.adm.positive = False
        c.sampling.top_p = 0.9  # the usual nucleus sampling in place of typical sampling
    if "tiny" in variants:
        c.model.name_or_path = "workdirs/sft-tiny"
        c.model.compute_dtype = "float32"
        c.data.train = SAMPLE_PATH
        c.data.max_length = 192
        c.ppo.epochs = 4
        c.ppo.batch_size = 32
        c.ppo.minibatch_size = 16
        c.ppo.experience_batch_size = 16
        c.ppo.ppo_epochs = 2
        c.ppo.trainable_blocks = 1
        c.ppo.lr = 1e-3
        c.kl.horizon = 50  # a run of ~30 iterations needs beta to react within it (the paper's 10000 would not)
        c.sampling.max_new_tokens = 48
        c.adm.negative_fraction = 0.25  # enough negatives in a 32-sample batch to exercise pi-
        c.ci.threshold = 0.0  # a dense reward for the tiny model, which rarely reaches 0.7
        c.sample_log_every = 5
        c.checkpoint_every = 10
        # Tiny random SD 1.x and scorers (16x16 images): the whole loop, images included, on CPU. The five model
        # paths follow `tiny_models`, so one flag moves them all (--config.tiny_models=/elsewhere).
        c.tiny_models = TINY_MODELS
        models = c.get_ref("tiny_models")
        c.render.model = models + "/sd"
        c.render.num_steps = 4
        c.render.height = c.render.width = 16  # 8x8 latents: 5x faster on CPU than the pipeline's native 32x32
        c.render.batch_size = 32
        c.render.log_every = 5
        c.reward.aesthetic.clip_model = models + "/scorers/clip"
        c.reward.aesthetic.mlp_weights = models + "/scorers/aesthetic_mlp.pth"
        c.reward.pickscore.model = models + "/scorers/pickscore"
        c.reward.pickscore.processor = ""
    return c
