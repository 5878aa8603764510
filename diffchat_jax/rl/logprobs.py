"""Token log-probabilities and entropies through the tied LM head without materialising [B, N, V] at once.

At BLOOM's vocabulary (250,880) the float32 logits of a PPO batch are the largest tensor of the whole job
(B 128 x N 128 x V = 16 GB, and the log-softmax and its backward pass as much again). Here the head runs on
`chunk` positions at a time inside a `lax.scan`; each chunk's logits live only inside the scan body, which is
rematerialised (`jax.checkpoint`) in the backward pass, so the peak is [B, chunk, V] float32 in both directions.

The matmul runs in the compute dtype with float32 accumulation (as bloom.lm_logits); logsumexp, the gathered
log-probability and the entropy are float32 reductions. Values and gradients equal the plain computation
(`jax.nn.log_softmax` over the full [B, N, V] logits) up to float rounding; tests/test_logprobs.py checks both.
"""
import jax
import jax.numpy as jnp

from diffchat_jax.models import bloom

ENTROPY_MODES = ("none", "stat", "grad")


def token_logprobs(hidden: jax.Array, embedding: jax.Array, tokens: jax.Array, *, dtype, chunk: int,
                   entropy: str = "none") -> tuple[jax.Array, jax.Array | None]:
    """log softmax(hidden @ embedding.T)[token] and the entropy of that softmax, position by position.

    Args:
        hidden: [B, N, H] the LM head's input (the ln_f output) at the positions that predict `tokens`.
        embedding: [V, H] the tied word embeddings.
        tokens: [B, N] int32, the tokens whose log-probabilities are wanted.
        dtype: the compute dtype of the head's matmul.
        chunk: positions per scan step (the peak is [B, chunk, V] float32); N need not be a multiple.
        entropy: "none" (not computed: returns None), "stat" (computed, no gradient flows through it: a
            statistic that costs no backward pass) or "grad" (differentiable, for an entropy bonus).
    Returns:
        (logp [B, N] float32, entropy [B, N] float32 or None).
    """
    if entropy not in ENTROPY_MODES:
        raise ValueError(f"entropy must be one of {ENTROPY_MODES}, got {entropy!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    batch, length, width = hidden.shape
    chunk = min(chunk, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    # [n_chunks, B, chunk, ...]: scan over position chunks; padded positions are computed and dropped.
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(batch, n_chunks, chunk, width).swapaxes(0, 1)
    t = jnp.pad(tokens, ((0, 0), (0, pad))).reshape(batch, n_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(h_chunk, t_chunk):
        logits = bloom.lm_logits(h_chunk, embedding, dtype)  # [B, chunk, V] float32
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, t_chunk[..., None], axis=-1)[..., 0] - lse
        if entropy == "none":
            return logp, None
        # H = lse - sum_v p_v * logit_v: no [B, chunk, V] log-softmax needed.
        ent = lse - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
        return logp, ent if entropy == "grad" else jax.lax.stop_gradient(ent)

    _, (logp, ent) = jax.lax.scan(lambda carry, xs: (carry, one_chunk(*xs)), None, (h, t))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(batch, n_chunks * chunk)[:, :length]
    return unchunk(logp), None if ent is None else unchunk(ent)
