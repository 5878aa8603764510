"""The pure, jittable core of PPO: partial unfreezing, experience (log-probs, values, rewards, GAE + VCI) and the
update (epochs x shuffled minibatches x gradient-accumulation micro-batches, as nested `lax.scan`s).

Sequences are prompt + response: prompts are left-padded to P tokens, responses right-padded to N, so response
token t sits at column P + t for every row and is predicted by the logits (and valued by the value head) at
column P + t - 1: the state s_t before token t.
"""
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from diffchat_jax.rl import gae, losses
from diffchat_jax.utils.batching import split_microbatches


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
    `trainable` only, so XLA also drops the backward pass below the first trainable block: cheaper than an optax
    mask over the full tree, with the same result.
    """
    flat = traverse_util.flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if is_trainable(k, n_layer, n_trainable)}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable, frozen):
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                         **traverse_util.flatten_dict(trainable)})


# ---------------------------------------------------------------------------------------------------------------
# Forward pieces.
# ---------------------------------------------------------------------------------------------------------------
def response_forward(apply_fn, params, batch, prompt_length: int):
    """Policy/reference outputs on response tokens.

    batch: input_ids, attention_mask [B, P + N]. Returns (logits [B, N, V] f32, logp [B, N], values [B, N] or None),
    where logp[:, t] = log pi(y_t | s_t) and values[:, t] = V(s_t).
    """
    out = apply_fn({"params": params}, batch["input_ids"], batch["attention_mask"])
    logits = out.logits[:, prompt_length - 1:-1]
    tokens = batch["input_ids"][:, prompt_length:]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[..., None], axis=-1)[..., 0]
    values = None if out.values is None else out.values[:, prompt_length - 1:-1]
    return logits, logp, values


def experience(apply_fn, params, ref_params, batch, scores, ci_state, *, prompt_length: int, beta: float,
               gamma: float, lam: float, alpha: float):
    """Everything the update needs from one rollout batch.

    batch: input_ids, attention_mask [B, P + N], response_mask [B, N] (0 also for samples masked out of the
    update). scores: [B] scalar rewards. ci_state: [B, N] CI(s_t) of the prefix before token t.
    Per-token reward: -beta * (log pi - log pi_ref) on each response token, + the scalar reward at the last one.
    Returns a dict of [B, N] arrays (old_logp, old_values = V̂, advantages, returns, kl) for `update`.
    """
    mask = batch["response_mask"].astype(jnp.float32)
    _, logp, values = response_forward(apply_fn, params, batch, prompt_length)
    _, ref_logp, _ = response_forward(apply_fn, ref_params, batch, prompt_length)
    kl = (logp - ref_logp) * mask
    last = jnp.maximum(mask.sum(1).astype(jnp.int32) - 1, 0)
    rewards = -beta * kl + jax.nn.one_hot(last, mask.shape[1]) * scores[:, None] * (mask.sum(1, keepdims=True) > 0)
    advantages, returns = gae.gae_advantages(rewards, values, mask, gamma, lam, ci=ci_state, alpha=alpha)
    return {"old_logp": logp * mask, "old_values": (values + alpha * ci_state) * mask, "advantages": advantages,
            "returns": returns, "kl": kl, "ref_logp": ref_logp * mask}


# ---------------------------------------------------------------------------------------------------------------
# The update.
# ---------------------------------------------------------------------------------------------------------------
def minibatch_loss(trainable, frozen, apply_fn, micro, token_share, *, prompt_length: int, hp):
    """PPO loss of one micro-batch, weighted by its share of the minibatch's response tokens, so that summing
    over micro-batches gives exactly the token-mean loss of the whole minibatch."""
    mask = micro["response_mask"].astype(jnp.float32)
    logits, logp, values = response_forward(apply_fn, merge(trainable, frozen), micro, prompt_length)
    value_hat = values + hp["alpha"] * micro["ci_state"]
    pg, pg_stats = losses.policy_loss(logp, micro["old_logp"], micro["advantages"], mask, hp["clip"])
    vf, vf_stats = losses.value_loss(value_hat, micro["old_values"], micro["returns"], mask, hp["value_clip"])
    ent = losses.entropy(logits, mask)
    loss = pg + hp["vf_coef"] * vf - hp["ent_coef"] * ent
    stats = {"policy_loss": pg, "value_loss": vf, "entropy": ent, **pg_stats, **vf_stats}
    return loss * token_share, jax.tree.map(lambda s: s * token_share, stats)


def update(trainable, opt_state, frozen, apply_fn, tx: optax.GradientTransformation, data, rng, *,
           prompt_length: int, hp, ppo_epochs: int, minibatch_size: int, grad_accum: int):
    """PPO epochs over shuffled minibatches of `data` (dict of [B, ...] arrays: input_ids, attention_mask,
    response_mask, ci_state, old_logp, old_values, advantages (already whitened if asked), returns).

    One optimizer step per minibatch; each minibatch is split into `grad_accum` micro-batches whose gradients
    are summed. Returns (trainable, opt_state, mean stats over all minibatches).
    """
    batch_size = data["input_ids"].shape[0]
    n_minibatches = batch_size // minibatch_size
    grad_fn = jax.value_and_grad(minibatch_loss, has_aux=True)

    def minibatch_step(carry, minibatch):
        trainable, opt_state = carry
        tokens = jnp.maximum(minibatch["response_mask"].sum(), 1.0)

        def accumulate(grads, micro):
            share = micro["response_mask"].sum() / tokens
            (_, stats), micro_grads = grad_fn(trainable, frozen, apply_fn, micro, share,
                                              prompt_length=prompt_length, hp=hp)
            return jax.tree.map(jnp.add, grads, micro_grads), stats

        grads, stats = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, trainable),
                                    split_microbatches(minibatch, grad_accum))
        stats = jax.tree.map(lambda s: s.sum(0), stats)  # token-share weighted: the sum is the minibatch mean
        updates, opt_state = tx.update(grads, opt_state, trainable)
        stats["grad_norm"] = optax.global_norm(grads)
        return (optax.apply_updates(trainable, updates), opt_state), stats

    def epoch(carry, epoch_rng):
        order = jax.random.permutation(epoch_rng, batch_size)[:n_minibatches * minibatch_size]
        minibatches = jax.tree.map(lambda x: x[order].reshape(n_minibatches, minibatch_size, *x.shape[1:]), data)
        return jax.lax.scan(minibatch_step, carry, minibatches)

    (trainable, opt_state), stats = jax.lax.scan(epoch, (trainable, opt_state), jax.random.split(rng, ppo_epochs))
    return trainable, opt_state, jax.tree.map(jnp.mean, stats)

