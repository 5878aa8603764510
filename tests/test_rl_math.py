"""GAE (+VCI), PPO loss pieces and the KL controller against hand-computed values and plain NumPy loops."""
import jax.numpy as jnp
import numpy as np
import pytest

from diffchat_jax.rl import gae, kl, losses


def numpy_gae(rewards, values, mask, gamma, lam, ci=None, alpha=0.0):
    """The textbook loop, one row at a time, stopping at each row's length."""
    value_hat = values + (alpha * ci if ci is not None else 0.0)
    advantages, returns = np.zeros_like(rewards), np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        length = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(length)):
            next_value = value_hat[b, t + 1] if t + 1 < length else 0.0
            delta = rewards[b, t] + gamma * next_value - value_hat[b, t]
            running = delta + gamma * lam * running
            advantages[b, t] = running
            returns[b, t] = running + value_hat[b, t]
    return advantages, returns


def test_gae_hand_computed():
    # One row of 3 tokens then 1 pad; gamma = 0.5, lam = 0.5 so the arithmetic is exact.
    rewards = np.array([[0.0, 0.0, 1.0, 9.0]], np.float32)
    values = np.array([[0.5, 0.25, 0.5, 7.0]], np.float32)
    mask = np.array([[1, 1, 1, 0]], np.float32)
    adv, ret = gae.gae_advantages(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 0.5, 0.5)
    # deltas: d2 = 1 - 0.5 = 0.5; d1 = 0 + 0.5*0.5 - 0.25 = 0; d0 = 0 + 0.5*0.25 - 0.5 = -0.375
    # A2 = 0.5; A1 = 0 + 0.25*0.5 = 0.125; A0 = -0.375 + 0.25*0.125 = -0.34375
    np.testing.assert_allclose(adv, [[-0.34375, 0.125, 0.5, 0.0]], atol=1e-7)
    np.testing.assert_allclose(ret, [[0.15625, 0.375, 1.0, 0.0]], atol=1e-7)


def test_gae_vci_hand_computed():
    # Same row with CI(s_t) = [0, 0.5, 1] and alpha = 0.5: V̂ = [0.5, 0.5, 1.0].
    rewards = np.array([[0.0, 0.0, 1.0]], np.float32)
    values = np.array([[0.5, 0.25, 0.5]], np.float32)
    ci = np.array([[0.0, 0.5, 1.0]], np.float32)
    mask = np.ones((1, 3), np.float32)
    adv, ret = gae.gae_advantages(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 0.5, 0.5,
                                  ci=jnp.asarray(ci), alpha=0.5)
    # d2 = 1 - 1 = 0; d1 = 0.5*1 - 0.5 = 0; d0 = 0.5*0.5 - 0.5 = -0.25 -> A = [-0.25, 0, 0]
    np.testing.assert_allclose(adv, [[-0.25, 0.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(ret, [[0.25, 0.5, 1.0]], atol=1e-7)


@pytest.mark.parametrize("alpha", [0.0, 0.05, 1.0])
def test_gae_matches_numpy_loop_with_padding(alpha):
    rng = np.random.default_rng(0)
    batch, length = 6, 11
    lengths = rng.integers(1, length + 1, size=batch)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
    rewards = rng.normal(size=(batch, length)).astype(np.float32) * mask
    values = rng.normal(size=(batch, length)).astype(np.float32)  # garbage at pads must not leak
    ci = rng.uniform(size=(batch, length)).astype(np.float32)
    adv, ret = gae.gae_advantages(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 0.99, 0.95,
                                  ci=jnp.asarray(ci), alpha=alpha)
    want_adv, want_ret = numpy_gae(rewards, values, mask, 0.99, 0.95, ci, alpha)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)


def test_vci_changes_advantages_only_through_ci_differences():
    """With a constant CI the VCI terms cancel inside each TD error except at the end (V̂ = 0 there)."""
    rng = np.random.default_rng(1)
    rewards, values = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    mask = np.ones((2, 5))
    base, _ = gae.gae_advantages(rewards, values, mask, 1.0, 1.0)
    with_ci, _ = gae.gae_advantages(rewards, values, mask, 1.0, 1.0, ci=np.full((2, 5), 0.8), alpha=0.5)
    # gamma = lam = 1: A_t = sum of rewards from t - V̂_t, so the shift is exactly -alpha * CI at every t.
    np.testing.assert_allclose(np.asarray(with_ci), np.asarray(base) - 0.4, atol=1e-6)


def test_policy_loss_hand_computed():
    logp = jnp.log(jnp.array([[1.5, 0.5, 1.1, 1.0]]))
    old = jnp.zeros((1, 4))
    adv = jnp.array([[1.0, -1.0, 2.0, 5.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = losses.policy_loss(logp, old, adv, mask, clip=0.2)
    # ratios 1.5, 0.5, 1.1: terms max(-A r, -A clip(r)) = max(-1.5, -1.2) = -1.2; max(0.5, 0.8) = 0.8;
    # max(-2.2, -2.2) = -2.2 -> mean = -0.8667; clipped (strictly larger) on tokens 0 and 1.
    np.testing.assert_allclose(loss, (-1.2 + 0.8 - 2.2) / 3, rtol=1e-6)
    np.testing.assert_allclose(stats["clip_fraction"], 2 / 3, rtol=1e-6)


def test_value_loss_hand_computed():
    values = jnp.array([[1.0, 0.0, 0.3]])
    old = jnp.array([[0.5, 0.5, 0.2]])
    returns = jnp.array([[2.0, 0.0, 0.0]])
    mask = jnp.ones((1, 3))
    loss, stats = losses.value_loss(values, old, returns, mask, clip=0.2)
    # token 0: (1-2)^2 = 1 vs clipped 0.7 -> (0.7-2)^2 = 1.69 -> 1.69
    # token 1: (0-0)^2 = 0 vs clipped 0.3 -> 0.09 -> 0.09;   token 2: 0.09 vs (0.3)^2 = 0.09 -> 0.09
    np.testing.assert_allclose(loss, (1.69 + 0.09 + 0.09) / 3, rtol=1e-5)
    np.testing.assert_allclose(stats["value_clip_fraction"], 2 / 3, rtol=1e-6)


def test_whiten_uses_only_masked_entries():
    x = jnp.array([[1.0, 2.0, 3.0, 100.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    out = np.asarray(losses.whiten(x, mask))
    np.testing.assert_allclose(out[0, :3], np.array([-1.0, 0.0, 1.0]) / np.sqrt(2 / 3 + 1e-8), rtol=1e-6)
    assert out[0, 3] == 0.0


def test_explained_variance():
    returns = jnp.array([[1.0, 2.0, 3.0]])
    mask = jnp.ones((1, 3))
    np.testing.assert_allclose(losses.explained_variance(returns, returns, mask), 1.0)
    np.testing.assert_allclose(losses.explained_variance(jnp.full((1, 3), 2.0), returns, mask), 0.0, atol=1e-6)


def test_kl_controller():
    assert kl.update_beta(0.05, 100.0, 128, adaptive=False, target=6.0, horizon=10000) == 0.05
    # KL twice the target: error clipped to +0.2 -> beta * (1 + 0.2 * 128 / 10000)
    np.testing.assert_allclose(kl.update_beta(0.05, 12.0, 128, adaptive=True, target=6.0, horizon=10000),
                               0.05 * (1 + 0.2 * 0.0128))
    # KL 10% under target: error -0.1
    np.testing.assert_allclose(kl.update_beta(0.05, 5.4, 128, adaptive=True, target=6.0, horizon=10000),
                               0.05 * (1 - 0.1 * 0.0128))
