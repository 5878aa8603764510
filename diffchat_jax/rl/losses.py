"""PPO loss pieces on response tokens (all inputs [B, T] with a 0/1 mask over real response tokens)."""
import jax
import jax.numpy as jnp


def masked_mean(x, mask):
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def masked_var(x, mask):
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def whiten(x, mask, eps: float = 1e-8):
    """(x - mean) / std over the masked entries; padding stays 0."""
    return (x - masked_mean(x, mask)) * jax.lax.rsqrt(masked_var(x, mask) + eps) * mask


def policy_loss(logp, old_logp, advantages, mask, clip: float):
    """Clipped surrogate (Schulman et al. 2017). Returns (loss, stats) with the clip fraction and approx. KL."""
    log_ratio = (logp - old_logp) * mask
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    stats = {"clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
             "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask)}
    return loss, stats


def value_loss(values, old_values, returns, mask, clip: float):
    """Clipped value loss: mean over tokens of max((V - R)^2, (V_old + clip(V - V_old) - R)^2).

    No factor 1/2 inside: the paper's "value loss scale 0.5" is applied by the caller (vf_coef).
    """
    clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
    loss = masked_mean(jnp.maximum((values - returns) ** 2, (clipped_values - returns) ** 2), mask)
    stats = {"value_clip_fraction": masked_mean((jnp.abs(values - old_values) > clip).astype(jnp.float32), mask)}
    return loss, stats


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R): 1 is a perfect value function, 0 no better than a constant."""
    return 1.0 - masked_var(returns - values, mask) / jnp.maximum(masked_var(returns, mask), 1e-8)
