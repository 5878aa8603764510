"""Chunked log-probs and entropies through the tied LM head (diffchat_jax.rl.logprobs) against the plain [B, N, V]
computation: values and gradients; and PPO's response forward (trunk + trainable blocks) against a full forward."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffchat_jax.models import bloom
from diffchat_jax.rl import logprobs, ppo


def plain(hidden, embedding, tokens, dtype):
    """The reference: the whole [B, N, V] logits, log_softmax, gather; entropy from the full distribution."""
    logits = bloom.lm_logits(hidden, embedding, dtype)
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]
    return logp, -(jnp.exp(logp_all) * logp_all).sum(-1)


def random_inputs(seed=0, batch=3, length=11, width=8, vocab=37):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(k1, (batch, length, width)), 0.5 * jax.random.normal(k2, (vocab, width)),
            jax.random.randint(k3, (batch, length), 0, vocab))


def test_entropy_of_a_known_distribution():
    """Logits log(1/2, 1/2) and log(1, ~0): entropies ln 2 and ~0 (the identity embedding makes hidden the logits)."""
    hidden = jnp.log(jnp.array([[[0.5, 0.5], [1.0, 1e-30]]]))
    logp, ent = logprobs.token_logprobs(hidden, jnp.eye(2), jnp.array([[1, 0]]), dtype=jnp.float32, chunk=1,
                                        entropy="stat")
    np.testing.assert_allclose(ent, [[np.log(2), 0.0]], atol=1e-6)
    np.testing.assert_allclose(logp, [[np.log(0.5), 0.0]], atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 4, 11, 64])  # 4 does not divide N = 11 (the last chunk is padded)
def test_values_match_the_plain_computation(chunk):
    hidden, embedding, tokens = random_inputs()
    want_logp, want_ent = plain(hidden, embedding, tokens, jnp.float32)
    logp, ent = logprobs.token_logprobs(hidden, embedding, tokens, dtype=jnp.float32, chunk=chunk, entropy="stat")
    np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-6)
    none_logp, none_ent = logprobs.token_logprobs(hidden, embedding, tokens, dtype=jnp.float32, chunk=chunk)
    assert none_ent is None
    np.testing.assert_array_equal(none_logp, logp)


def test_bf16_head_matches_the_plain_bf16_head():
    hidden, embedding, tokens = random_inputs(seed=1)
    want, _ = plain(hidden, embedding, tokens, jnp.bfloat16)
    logp, _ = logprobs.token_logprobs(hidden, embedding, tokens, dtype=jnp.bfloat16, chunk=4)
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-5)  # same bf16 matmul, float32 reductions
    exact, _ = plain(hidden, embedding, tokens, jnp.float32)
    assert 1e-4 < float(jnp.abs(logp - exact).max()) < 0.1  # bf16 really was used


def test_gradients_match_the_plain_computation():
    """d/d(hidden, embedding) of a weighted sum of log-probs and entropies ("grad" mode)."""
    hidden, embedding, tokens = random_inputs(seed=2)
    w1, w2 = jax.random.normal(jax.random.PRNGKey(5), (2, *tokens.shape))

    def loss(fn):
        def f(h, e):
            logp, ent = fn(h, e)
            return (w1 * logp).sum() + (w2 * ent).sum()
        return jax.grad(f, argnums=(0, 1))(hidden, embedding)

    want = loss(lambda h, e: plain(h, e, tokens, jnp.float32))
    got = loss(lambda h, e: logprobs.token_logprobs(h, e, tokens, dtype=jnp.float32, chunk=4, entropy="grad"))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_stat_entropy_carries_no_gradient():
    hidden, embedding, tokens = random_inputs(seed=3)
    grad = jax.grad(lambda h: logprobs.token_logprobs(h, embedding, tokens, dtype=jnp.float32, chunk=4,
                                                      entropy="stat")[1].sum())(hidden)
    np.testing.assert_array_equal(grad, 0.0)
    grad = jax.grad(lambda h: logprobs.token_logprobs(h, embedding, tokens, dtype=jnp.float32, chunk=4,
                                                      entropy="grad")[1].sum())(hidden)
    assert float(jnp.abs(grad).max()) > 1e-3


def test_the_head_never_materialises_all_logits():
    """XLA's temporaries for the chunked log-probs stay far below one [B, N, V] float32 logits tensor."""
    b, n, h, v = 8, 128, 64, 50_000
    args = (jax.ShapeDtypeStruct((b, n, h), jnp.float32), jax.ShapeDtypeStruct((v, h), jnp.float32),
            jax.ShapeDtypeStruct((b, n), jnp.int32))
    fn = jax.jit(lambda x, e, t: jax.grad(lambda x: logprobs.token_logprobs(x, e, t, dtype=jnp.float32,
                                                                            chunk=8)[0].sum())(x))
    temp = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
    full = b * n * v * 4
    assert temp < full / 4, (temp, full)


# ----- PPO's response forward: trunk + trainable blocks + chunked head == the whole model, plainly -------------
CONFIG = bloom.BloomConfig(vocab_size=41, hidden_size=32, n_layer=4, n_head=4, value_head=True)


@pytest.mark.parametrize("trainable_blocks", [1, 3, 4])
def test_response_forward_matches_a_full_forward(trainable_blocks):
    params = bloom.init_params(CONFIG, jax.random.PRNGKey(0))
    params["value_head"]["kernel"] = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (32, 1))
    prompt, response = 5, 6
    ids = jax.random.randint(jax.random.PRNGKey(2), (3, prompt + response), 0, CONFIG.vocab_size)
    mask = jnp.ones_like(ids).at[0, :2].set(0)  # a left-padded row
    module = bloom.Bloom(CONFIG)
    full = module.apply({"params": params}, ids, mask)
    want_logp = jnp.take_along_axis(jax.nn.log_softmax(full.logits[:, prompt - 1:-1]), ids[:, prompt:, None],
                                    -1)[..., 0]
    hp = ppo.Hyper(prompt_length=prompt, n_layer=4, trainable_blocks=trainable_blocks, logprob_chunk=4)
    trainable, frozen = ppo.partition(params, 4, trainable_blocks)
    trunk = ppo.trunk_forward(module, hp, frozen, ids, mask)
    assert (trunk is None) == (trainable_blocks == 4)
    for remat in (False, True):
        m = bloom.Bloom(dataclasses.replace(CONFIG, remat=remat))
        logp, values, _ = ppo.response_forward(m, hp, ppo.merge(trainable, frozen), ids, mask, trunk)
        np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(values, full.values[:, prompt - 1:-1], rtol=1e-5, atol=1e-6)
