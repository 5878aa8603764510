"""Pure, jittable logit transforms and the draw: (logits [B, V] float32, ...) -> logits [B, V] float32.

A transform sets the tokens it removes to -inf and leaves the others as they are; each one matches its transformers
counterpart (min_tokens_to_keep = 1): `temperature` TemperatureLogitsWarper, `top_k` TopKLogitsWarper, `top_p`
TopPLogitsWarper, `typical` TypicalLogitsWarper, `suppress_eos` MinNewTokensLengthLogitsProcessor, `ban` the
one-token rule of NoBadWordsLogitsProcessor (the caller decides which tokens a multi-token sequence bans now).

Top-p and typical keep the best-ranked tokens (by probability; by closeness of -log p to the entropy) up to a
probability mass. transformers sorts the vocabulary for that; a sort is the slowest thing on a CPU (16 x 8192
float32: 30 ms here, 1.3 s at BLOOM's 250,880). `keep_mass` finds exactly the same set by bisection on the bits
of the rank instead: 32 passes over [B, V] (1.5 ms at 8192).
"""
import jax
import jax.numpy as jnp
from jax import lax

SAMPLE_BLOCK = 256  # tokens per block of the two-level draw in `sample`


def temperature(logits: jax.Array, t: float) -> jax.Array:
    return logits / t


def top_k(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits (and every logit tied with the k-th)."""
    kth = lax.top_k(logits, min(k, logits.shape[-1]))[0][:, -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus: keeps the most probable tokens whose probabilities reach p (at least one)."""
    return jnp.where(keep_mass(logits, jax.nn.softmax(logits), p), logits, -jnp.inf)


def typical(logits: jax.Array, mass: float) -> jax.Array:
    """Locally typical sampling (Meister et al. 2023): ranks tokens by |-log p - entropy| (smallest first) and keeps
    the best-ranked ones whose probabilities reach `mass` (at least one)."""
    logp = jax.nn.log_softmax(logits)
    probs = jnp.exp(logp)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * logp, 0.0), -1, keepdims=True)  # 0 * -inf terms dropped
    return jnp.where(keep_mass(-jnp.abs(-logp - entropy), probs, mass), logits, -jnp.inf)


def suppress_eos(logits: jax.Array, eos_id: int, suppress: jax.Array) -> jax.Array:
    """EOS removed where `suppress` (a bool scalar or [B]), e.g. step < min_new_tokens."""
    logits = jnp.asarray(logits)
    return logits.at[:, eos_id].set(jnp.where(suppress, -jnp.inf, logits[:, eos_id]))


def ban(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Removes tokens [B, K] int32 from their rows; entries < 0 ban nothing."""
    batch, vocab = logits.shape
    tokens = jnp.where(tokens < 0, vocab, tokens)  # out of range: dropped by the scatter
    return jnp.asarray(logits).at[jnp.arange(batch)[:, None], tokens].set(-jnp.inf, mode="drop")


def sortable(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (-0.0 and 0.0 equal; NaN not handled)."""
    bits = lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    # Negative floats: flip every bit (larger magnitude = smaller); others: set the sign bit (above all negatives).
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def keep_mass(rank: jax.Array, probs: jax.Array, mass: float) -> jax.Array:
    """[B, V] bool: token v is kept iff the tokens ranked strictly above it (rank > rank[v]) hold probability < mass.

    That is the set a descending sort by rank and a cumulative sum would keep: the smallest best-ranked set whose
    probability reaches `mass`, with every token tied with its last member, at least the best-ranked token, and
    every token when mass >= sum(probs). rank, probs [B, V] float32.

    G(k) = P(sortable(rank) > k) falls as k grows; the kept tokens are those above the largest k with G(k) >= mass.
    That k is built bit by bit from the top (a bisection over the 2^32 keys): exact in 32 passes, no sort.
    """
    keys = sortable(rank)

    def set_bit(i, k):
        candidate = k | (jnp.uint32(1 << 31) >> i.astype(jnp.uint32))
        above = jnp.sum(jnp.where(keys > candidate[:, None], probs, 0.0), -1)
        return jnp.where(above >= mass, candidate, k)

    k = lax.fori_loop(0, 32, set_bit, jnp.zeros(rank.shape[:1], jnp.uint32))
    return keys > k[:, None]  # if even G(0) < mass, k stays 0 and every (non-NaN) key is above it


def sample(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits): [B, V] -> [B] int32; a -inf token is never drawn."""
    return sample_uniform(jax.random.uniform(key, (logits.shape[0],)), logits)


def sample_rows(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """As `sample`, with one key per row (keys [B] typed or [B, 2] raw): a row's draw depends on its key only,
    not on the rows beside it (how the batch is split into calls, devices or hosts)."""
    return sample_uniform(jax.vmap(lambda k: jax.random.uniform(k, ()))(keys), logits)


def sample_uniform(u: jax.Array, logits: jax.Array) -> jax.Array:
    """The draw of each row of logits [B, V] given its uniform u [B] in [0, 1) -> [B] int32.

    Inverse CDF in two levels: a block of SAMPLE_BLOCK tokens by the blocks' cumulative mass, then a token inside it.
    One uniform per row (not B x V Gumbels: random bits dominate at large V on CPU), no cumulative sum over the
    whole vocabulary (slow on CPU), and float32 rounding relative to a block's mass rather than the total.
    """
    batch, vocab = logits.shape
    block = min(SAMPLE_BLOCK, vocab)
    n_blocks = -(-vocab // block)
    probs = jnp.pad(jax.nn.softmax(logits), ((0, 0), (0, n_blocks * block - vocab)))
    blocks = probs.reshape(batch, n_blocks, block)
    cum = jnp.cumsum(blocks.sum(-1), -1)  # [B, n_blocks]
    target = (1.0 - u[:, None]) * cum[:, -1:]  # in (0, total]
    # The first index whose cumulative mass reaches the target has positive mass; the clip guards rounding.
    b = jnp.minimum(jnp.sum(cum < target, -1), n_blocks - 1)
    before = jnp.where(b > 0, jnp.take_along_axis(cum, jnp.maximum(b - 1, 0)[:, None], -1)[:, 0], 0.0)
    inside = jnp.take_along_axis(blocks, b[:, None, None], 1)[:, 0]  # [B, block]
    last_positive = jnp.max(jnp.where(inside > 0, jnp.arange(block), 0), -1)
    j = jnp.minimum(jnp.sum(jnp.cumsum(inside, -1) < target - before[:, None], -1), last_positive)
    return (b * block + j).astype(jnp.int32)
