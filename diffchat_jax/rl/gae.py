"""Generalised advantage estimation (paper eqs. 5-6) with VCI, the paper's value estimate with content integrity.

Indexing (one row per response, T response tokens, action t = emitting token t):
    s_t      the state before token t: prompt + y_<t.
    r_t      per-token reward for emitting token t (KL penalty each token, the scalar reward at the last one).
    V(s_t)   the value head at the hidden state of the last token of s_t.
    CI(s_t)  the content integrity of the prefix y_<t (0 for the empty prefix).
VCI (eq. 7): V̂(s_t) = V(s_t) + alpha * CI(s_t), used in place of V in every TD error:
    delta_t = r_t + gamma * V̂(s_{t+1}) - V̂(s_t),   A_t = sum_l (gamma * lam)^l delta_{t+l},
with V̂ = 0 after the last response token (the episode ends there). Returns are A_t + V̂(s_t): targets for V̂.
The value head itself is therefore trained toward returns - alpha * CI(s_t): V learns the part of the return
that the content integrity of the prefix does not already account for, and V̂ = V + alpha * CI tracks the return.
alpha = 0 is plain GAE.
"""
import jax
import jax.numpy as jnp


def gae_advantages(rewards, values, mask, gamma: float, lam: float, ci=None, alpha: float = 0.0):
    """Advantages and returns by a reverse scan over response tokens.

    rewards, values, mask: [B, T] float (mask 1 on real response tokens, which are contiguous from t = 0; padding
    after the end gets advantage and return 0). ci: [B, T] CI(s_t) as in the module docstring, or None.
    Returns (advantages [B, T], returns [B, T]) with returns = advantages + V̂.
    """
    mask = mask.astype(jnp.float32)
    value_hat = values if ci is None else values + alpha * ci
    value_hat = value_hat * mask
    # V̂(s_{t+1}), 0 past the last real token.
    next_value = jnp.concatenate([value_hat[:, 1:], jnp.zeros_like(value_hat[:, :1])], axis=1)
    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    deltas = (rewards + gamma * next_value * next_mask - value_hat) * mask

    def step(next_advantage, xs):
        delta, m, nm = xs
        advantage = (delta + gamma * lam * next_advantage * nm) * m
        return advantage, advantage

    time_major = (deltas.T, mask.T, next_mask.T)  # [T, B]
    _, advantages = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), time_major, reverse=True)
    advantages = advantages.T
    return advantages, (advantages + value_hat) * mask
