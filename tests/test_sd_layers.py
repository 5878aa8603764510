"""The attention shared by the SD UNet and VAE: its CPU blocked form against PyTorch's scaled_dot_product_attention."""
import numpy as np
import pytest
import torch
import jax.numpy as jnp

from diffchat_jax.models import sd_layers


def torch_attention(q, k, v):
    """[B, T, N, D] numpy -> [B, T, N, D] with torch's reference (heads-first inside)."""
    q, k, v = (torch.from_numpy(np.ascontiguousarray(a.transpose(0, 2, 1, 3))) for a in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v).numpy().transpose(0, 2, 1, 3)


@pytest.mark.parametrize("batch, length, keys, heads, dim, max_scores", [
    (2, 64, 64, 4, 8, 2 * 16 * 64),  # 4 query blocks of 16
    (3, 32, 7, 2, 16, 3 * 8 * 7),  # cross-attention-like: 4 blocks of 8 queries over 7 keys
    (2, 48, 48, 1, 32, 1 << 22),  # one block (the whole score matrix fits)
])
def test_blocked_attention_matches_torch(batch, length, keys, heads, dim, max_scores):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, length, heads, dim), np.float32)
    k, v = (rng.standard_normal((batch, keys, heads, dim), np.float32) for _ in range(2))
    expected = torch_attention(q, k, v)
    blocked = sd_layers._blocked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), max_scores)
    np.testing.assert_allclose(np.asarray(blocked), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sd_layers.attention(q, k, v)), expected, atol=1e-5)  # the dispatch
