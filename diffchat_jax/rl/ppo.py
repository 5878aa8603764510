"""The pure, jittable core of PPO: partial unfreezing, the experience step (log-probs, values, rewards, GAE + VCI)
and the update step (epochs x shuffled minibatches x gradient-accumulation micro-batches, as nested `lax.scan`s).

Sequences are prompt + response: prompts are left-padded to P tokens, responses right-padded to N, so response
token t sits at column P + t for every row and is predicted by the logits (and valued by the value head) at
column P + t - 1: the state s_t before token t.

Memory, at BLOOM-1b1 shapes (B 128, P 256, N 128, V 250,880):
  * Only the last `trainable_blocks` blocks differ between the policy and the frozen reference, and nothing below
    them ever changes: the experience step runs the frozen lower blocks ("the trunk") once per rollout batch for
    both, and keeps their output [B, T, H] (compute dtype) in the Experience, so the update runs only the trainable
    blocks (their forward and backward passes), never the frozen ones again.
  * The LM head runs on response positions only, `logprob_chunk` positions at a time (diffchat_jax.rl.logprobs):
    [B, N, V] float32 logits never exist at once.
  * The experience step runs in micro-batches of `experience_batch_size` rows.
  * `make_steps` closes over a frozen `Hyper`: constants are constants to XLA, so ent_coef = 0 removes the entropy
    bonus (and its backward pass) from the graph; the entropy statistic is still reported.
"""
import dataclasses
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from diffchat_jax.models import bloom
from diffchat_jax.rl import gae, logprobs, losses
from diffchat_jax.utils import mesh as mesh_lib
from diffchat_jax.utils.batching import merge_microbatches, split_microbatches
from diffchat_jax.utils.validate import require


# ---------------------------------------------------------------------------------------------------------------
# Partial unfreezing: only the last N blocks, the final layer norm and the value head are trained.
# ---------------------------------------------------------------------------------------------------------------
def is_trainable(path: tuple[str, ...], n_layer: int, n_trainable: int) -> bool:
    """The value head, ln_f and blocks h_{n_layer - n_trainable} ... h_{n_layer - 1}; embeddings (tied with the
    LM head) only when every block trains."""
    top = path[0]
    if top in ("value_head", "ln_f"):
        return True
    if top.startswith("h_"):
        return int(top[2:]) >= n_layer - n_trainable
    return n_trainable >= n_layer


def partition(params, n_layer: int, n_trainable: int):
    """params -> (trainable, frozen), two nested dicts that `merge` puts back together.

    The optimizer sees only `trainable` (frozen params get no optimizer state), and gradients are taken w.r.t.
    `trainable` only: cheaper than an optax mask over the full tree, with the same result.
    """
    flat = traverse_util.flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if is_trainable(k, n_layer, n_trainable)}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable, frozen):
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                         **traverse_util.flatten_dict(trainable)})


# ---------------------------------------------------------------------------------------------------------------
# Hyper-parameters and the typed data of a step.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Hyper:
    """What the jitted steps close over (a change means a new compilation). Field names are config.ppo's, except
    prompt_length (the left-padded prompt width P), n_layer, and alpha (config.vci.alpha)."""
    prompt_length: int
    n_layer: int
    trainable_blocks: int
    gamma: float = 0.99
    lam: float = 0.95
    alpha: float = 0.05
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    whiten_advantages: bool = True
    ppo_epochs: int = 4
    minibatch_size: int = 32
    grad_accum: int = 1
    experience_batch_size: int = 0  # rows per forward pass in the experience step; 0 = the whole batch
    logprob_chunk: int = 16  # response positions per LM-head chunk

    def __post_init__(self):
        # The shapes the steps rely on; rl.trainer.validate_config checks every field from the config before
        # anything is loaded, this guards direct construction.
        for name in ("ppo_epochs", "minibatch_size", "grad_accum", "trainable_blocks", "logprob_chunk"):
            require(getattr(self, name) >= 1, f"ppo.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(self.trainable_blocks <= self.n_layer, "ppo.trainable_blocks",
                f"({self.trainable_blocks}) exceeds the model's {self.n_layer} blocks")
        require(self.minibatch_size % self.grad_accum == 0, "ppo.minibatch_size",
                f"({self.minibatch_size}) must be a multiple of ppo.grad_accum ({self.grad_accum})")

    @classmethod
    def from_config(cls, config, n_layer: int, prompt_length: int) -> "Hyper":
        fields = {f.name for f in dataclasses.fields(cls)} - {"prompt_length", "n_layer", "alpha"}
        return cls(prompt_length=prompt_length, n_layer=n_layer, alpha=config.vci.alpha,
                   **{name: config.ppo[name] for name in fields})

    @property
    def first_trainable(self) -> int:
        """The first trainable block; 0 when every block (and so the tied embedding) trains."""
        return self.n_layer - self.trainable_blocks


@flax.struct.dataclass
class Batch:
    """A scored rollout batch, the experience step's input. B rows, T = P + N columns."""
    input_ids: jax.Array  # [B, T] int32: left-padded prompt ++ right-padded response
    attention_mask: jax.Array  # [B, T] int32
    response_mask: jax.Array  # [B, N] int32: 1 on response tokens; all 0 for a sample left out of the update
    ci_state: jax.Array  # [B, N] float32: CI(s_t), the content integrity of the prefix before token t (VCI)
    scores: jax.Array  # [B] float32: the normalised scalar reward


@flax.struct.dataclass
class Experience:
    """Everything the update needs from one rollout batch; [B, ...] each."""
    input_ids: jax.Array  # [B, T] int32
    attention_mask: jax.Array  # [B, T] int32
    response_mask: jax.Array  # [B, N] int32
    ci_state: jax.Array  # [B, N] float32
    trunk: jax.Array | None  # [B, T, H] compute dtype: the frozen blocks' output; None when every block trains
    old_logp: jax.Array  # [B, N] float32: log pi_old(y_t | s_t), 0 off the mask
    old_values: jax.Array  # [B, N] float32: V̂(s_t) = V(s_t) + alpha * CI(s_t) at the rollout
    advantages: jax.Array  # [B, N] float32: GAE on V̂, whitened over the batch when asked
    returns: jax.Array  # [B, N] float32: targets for V̂


@flax.struct.dataclass
class TrainState:
    """The policy's trainable params (the last blocks, ln_f, the value head) and their optimizer state."""
    trainable: Any
    opt_state: Any


# ---------------------------------------------------------------------------------------------------------------
# Forward pieces.
# ---------------------------------------------------------------------------------------------------------------
def trunk_forward(module: bloom.Bloom, hp: Hyper, frozen, input_ids, attention_mask):
    """[B, T] -> the residual stream entering the first trainable block [B, T, H]; None when every block trains."""
    if hp.first_trainable == 0:
        return None
    return module.apply({"params": frozen}, input_ids, attention_mask, blocks=(0, hp.first_trainable)).hidden


def response_forward(module: bloom.Bloom, hp: Hyper, params, input_ids, attention_mask, trunk,
                     entropy: str = "none"):
    """The trainable blocks (from `trunk`) or the whole model (trunk None) on [B, T] sequences, the LM head on the
    response positions only. Returns (logp [B, N], values [B, N] or None, entropy [B, N] or None), float32:
    logp[:, t] = log pi(y_t | s_t), values[:, t] = V(s_t); `entropy` as in logprobs.token_logprobs."""
    out = module.apply({"params": params}, input_ids, attention_mask, blocks=(hp.first_trainable, hp.n_layer),
                       hidden=trunk, head=False)
    p = hp.prompt_length
    logp, ent = logprobs.token_logprobs(out.hidden[:, p - 1:-1], params["word_embeddings"]["embedding"],
                                        input_ids[:, p:], dtype=module.config.dtype, chunk=hp.logprob_chunk,
                                        entropy=entropy)
    values = None if out.values is None else out.values[:, p - 1:-1]
    return logp, values, ent


# ---------------------------------------------------------------------------------------------------------------
# The steps.
# ---------------------------------------------------------------------------------------------------------------
def stacked_batch_constraint(mesh):
    """tree of [n, B, ...] arrays -> the same, constrained to split dimension 1 over the mesh (identity for no mesh).

    Micro-batches and minibatches are cut out of a batch split over the devices by reshapes and gathers (a
    shuffle); XLA's sharding propagation may lose the split there and run every row on every device, so the
    stacked [n, B, ...] arrays that the scans run over are pinned to it."""
    if mesh is None:
        return lambda tree: tree
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, mesh_lib.BATCH_AXES))
    return lambda tree: jax.lax.with_sharding_constraint(tree, sharding)


def make_experience_fn(module: bloom.Bloom, hp: Hyper, mesh=None):
    """experience(trainable, frozen, ref_trainable, batch: Batch, beta) -> (Experience, stats).

    ref_trainable: the reference (SFT) policy's values of the trainable params; it shares `frozen`.
    Per-token reward: -beta * (log pi - log pi_ref) on each response token, + the scalar reward at the last one.
    stats: float32 scalars: kl (mean over samples of the summed per-token KL), explained_variance (of V̂).
    mesh: the mesh the batch is split over (micro-batches stay split over it); None on one device.
    """
    constrain = stacked_batch_constraint(mesh)

    def forward(trainable, frozen, ref_trainable, rows):
        trunk = trunk_forward(module, hp, frozen, rows["input_ids"], rows["attention_mask"])
        logp, values, _ = response_forward(module, hp, merge(trainable, frozen), rows["input_ids"],
                                           rows["attention_mask"], trunk)
        ref_logp, _, _ = response_forward(module, hp, merge(ref_trainable, frozen), rows["input_ids"],
                                          rows["attention_mask"], trunk)
        return {"trunk": trunk, "logp": logp, "values": values, "ref_logp": ref_logp}

    def experience(trainable, frozen, ref_trainable, batch: Batch, beta):
        rows = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        size = len(batch.input_ids)
        n_micro = size // hp.experience_batch_size if hp.experience_batch_size else 1
        if n_micro > 1:
            out = jax.lax.map(lambda micro: forward(trainable, frozen, ref_trainable, micro),
                              constrain(split_microbatches(rows, n_micro)))
            out = merge_microbatches(out)
        else:
            out = forward(trainable, frozen, ref_trainable, rows)
        mask = batch.response_mask.astype(jnp.float32)
        kl = (out["logp"] - out["ref_logp"]) * mask
        n_tokens = mask.sum(1)
        last = jnp.maximum(n_tokens.astype(jnp.int32) - 1, 0)
        rewards = -beta * kl + jax.nn.one_hot(last, mask.shape[1]) * (batch.scores * (n_tokens > 0))[:, None]
        advantages, returns = gae.gae_advantages(rewards, out["values"], mask, hp.gamma, hp.lam,
                                                 ci=batch.ci_state, alpha=hp.alpha)
        if hp.whiten_advantages:
            advantages = losses.whiten(advantages, mask)
        old_values = (out["values"] + hp.alpha * batch.ci_state) * mask
        exp = Experience(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         response_mask=batch.response_mask, ci_state=batch.ci_state, trunk=out["trunk"],
                         old_logp=out["logp"] * mask, old_values=old_values, advantages=advantages,
                         returns=returns)
        stats = {"kl": kl.sum(1).mean(), "explained_variance": losses.explained_variance(old_values, returns, mask)}
        return exp, stats

    return experience


def make_update_fn(module: bloom.Bloom, tx: optax.GradientTransformation, hp: Hyper, mesh=None):
    """update(state: TrainState, frozen, exp: Experience, key) -> (state, stats): hp.ppo_epochs passes over the
    batch in shuffled minibatches of hp.minibatch_size, one optimizer step each, gradients summed over
    hp.grad_accum micro-batches. stats: the mean over all minibatches of the losses, entropy, clip fractions,
    approximate KL and gradient norm (float32 scalars). mesh: as for make_experience_fn."""
    entropy_mode = "grad" if hp.ent_coef > 0 else "stat"
    constrain = stacked_batch_constraint(mesh)

    def micro_loss(trainable, frozen, micro: Experience, token_share):
        """The PPO loss of one micro-batch, weighted by its share of the minibatch's response tokens, so that
        summing over micro-batches gives exactly the token-mean loss of the whole minibatch."""
        mask = micro.response_mask.astype(jnp.float32)
        logp, values, ent = response_forward(module, hp, merge(trainable, frozen), micro.input_ids,
                                             micro.attention_mask, micro.trunk, entropy=entropy_mode)
        value_hat = values + hp.alpha * micro.ci_state
        pg, pg_stats = losses.policy_loss(logp, micro.old_logp, micro.advantages, mask, hp.clip)
        vf, vf_stats = losses.value_loss(value_hat, micro.old_values, micro.returns, mask, hp.value_clip)
        entropy = losses.masked_mean(ent, mask)
        loss = pg + hp.vf_coef * vf
        if hp.ent_coef > 0:
            loss = loss - hp.ent_coef * entropy
        stats = {"policy_loss": pg, "value_loss": vf, "entropy": entropy, **pg_stats, **vf_stats}
        return loss * token_share, jax.tree.map(lambda s: s * token_share, stats)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def update(state: TrainState, frozen, exp: Experience, key):
        batch_size = len(exp.input_ids)
        n_minibatches = batch_size // hp.minibatch_size

        def minibatch_step(state, minibatch):
            tokens = jnp.maximum(minibatch.response_mask.sum(), 1.0)

            def accumulate(grads, micro):
                share = micro.response_mask.sum() / tokens
                (_, stats), micro_grads = grad_fn(state.trainable, frozen, micro, share)
                return jax.tree.map(jnp.add, grads, micro_grads), stats

            grads, stats = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, state.trainable),
                                        constrain(split_microbatches(minibatch, hp.grad_accum)))
            stats = jax.tree.map(lambda s: s.sum(0), stats)  # token-share weighted: the sum is the minibatch mean
            updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
            stats["grad_norm"] = optax.global_norm(grads)
            return TrainState(optax.apply_updates(state.trainable, updates), opt_state), stats

        def epoch(state, epoch_key):
            order = jax.random.permutation(epoch_key, batch_size)[:n_minibatches * hp.minibatch_size]
            minibatches = jax.tree.map(
                lambda x: x[order].reshape(n_minibatches, hp.minibatch_size, *x.shape[1:]), exp)
            return jax.lax.scan(minibatch_step, state, constrain(minibatches))

        state, stats = jax.lax.scan(epoch, state, jax.random.split(key, hp.ppo_epochs))
        return state, jax.tree.map(jnp.mean, stats)

    return update


class Steps(NamedTuple):
    """The jitted steps of one PPO job (see make_steps)."""
    experience: Any  # (trainable, frozen, ref_trainable, batch, beta) -> (Experience, stats)
    update: Any  # (state, frozen, exp, key) -> (state, stats); donates state


def make_steps(module: bloom.Bloom, tx: optax.GradientTransformation, hp: Hyper, mesh, state: TrainState,
               frozen) -> Steps:
    """Both steps, jitted once with explicit shardings: params and optimizer state as `mesh.param_shardings`
    gives them (replicated, or split on `fsdp`), batches and experience split over the mesh, scalars and keys
    replicated. `state` and `frozen` (arrays or ShapeDtypeStructs) give the trees' shapes. The update donates its
    TrainState: the new params and optimizer state take the old ones' buffers."""
    params = mesh_lib.param_shardings(state.trainable, mesh)
    state_shardings = TrainState(params, mesh_lib.param_shardings(state.opt_state, mesh))
    frozen_shardings = mesh_lib.param_shardings(frozen, mesh)
    data, scalar = mesh_lib.data_sharded(mesh), mesh_lib.replicated(mesh)
    experience = jax.jit(make_experience_fn(module, hp, mesh),
                         in_shardings=(params, frozen_shardings, params, data, scalar),
                         out_shardings=(data, scalar))
    update = jax.jit(make_update_fn(module, tx, hp, mesh), in_shardings=(state_shardings, frozen_shardings, data, scalar),
                     out_shardings=(state_shardings, scalar), donate_argnums=0)
    return Steps(experience, update)
