"""Logit transforms vs transformers' warpers and processors (PyTorch); the exact mass selection; the draw."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal
from transformers.generation import logits_process as hf

from diffchat_jax.sampling import logits as logits_lib


def random_logits(seed, batch=8, vocab=500):
    """Rows from flat to peaked (scales 0.3 .. 8), a few tokens already removed (-inf) in every row."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, vocab)) * np.geomspace(0.3, 8, batch)[:, None]
    logits[rng.random((batch, vocab)) < 0.05] = -np.inf
    return logits.astype(np.float32)


def theirs(processor, logits, input_ids=None):
    ids = torch.zeros((len(logits), 1), dtype=torch.long) if input_ids is None else input_ids
    return processor(ids, torch.from_numpy(logits.copy())).numpy()


def assert_same_transform(ours, expected):
    """Same removed set, same values where kept."""
    ours = np.asarray(ours)
    assert_array_equal(np.isfinite(ours), np.isfinite(expected))
    np.testing.assert_allclose(ours[np.isfinite(ours)], expected[np.isfinite(expected)], rtol=1e-6)


top_p, typical = jax.jit(logits_lib.top_p), jax.jit(logits_lib.typical)  # one compile for every mass


@pytest.mark.parametrize("seed", [0, 1])
def test_top_k_top_p_typical_keep_the_tokens_transformers_keeps(seed):
    logits = random_logits(seed)
    kept_sizes = set()
    for k in [1, 7, 100, 10_000]:
        assert_same_transform(logits_lib.top_k(logits, k), theirs(hf.TopKLogitsWarper(k), logits))
    for p in [0.05, 0.3, 0.9, 0.99]:
        ours = top_p(logits, p)
        assert_same_transform(ours, theirs(hf.TopPLogitsWarper(p), logits))
        kept_sizes.update(np.isfinite(ours).sum(1).tolist())
    for mass in [0.05, 0.2, 0.5, 0.9, 0.97, 0.999]:
        ours = typical(logits, mass)
        assert_same_transform(ours, theirs(hf.TypicalLogitsWarper(mass), logits))
        kept_sizes.update(np.isfinite(ours).sum(1).tolist())
    assert min(kept_sizes) == 1 and max(kept_sizes) > 300  # the cases span one token to most of the vocabulary


def test_temperature_eos_suppression_and_bans_match_transformers():
    logits = random_logits(2)
    assert_same_transform(logits_lib.temperature(logits, 0.7), theirs(hf.TemperatureLogitsWarper(0.7), logits))
    eos, prompt_len = 4, 5
    processor = hf.MinNewTokensLengthLogitsProcessor(prompt_len, min_new_tokens=3, eos_token_id=eos)
    for step in range(5):
        ids = torch.zeros((len(logits), prompt_len + step), dtype=torch.long)
        assert_same_transform(logits_lib.suppress_eos(logits, eos, jnp.asarray(step < 3)),
                              theirs(processor, logits, ids))
    banned = np.array([[5, 9, -1]] * len(logits), np.int32)
    assert_same_transform(logits_lib.ban(logits, banned),
                          theirs(hf.NoBadWordsLogitsProcessor([[5], [9]], eos_token_id=eos), logits))
    nothing = logits_lib.ban(logits, np.full((len(logits), 2), -1, np.int32))
    assert_array_equal(nothing, logits)


def test_sortable_keeps_the_float_order():
    x = np.concatenate([np.random.default_rng(3).normal(size=1000) * 10.0 ** np.arange(-20, 20, 0.04),
                        [0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.4e38, -3.4e38]]).astype(np.float32)
    keys = np.asarray(logits_lib.sortable(x)).astype(np.int64)
    order = np.argsort(x, kind="stable")
    assert (np.diff(keys[order]) >= 0).all()
    assert (np.diff(keys[order])[np.diff(x[order]) > 0] > 0).all()  # strictly larger floats, strictly larger keys
    assert keys[x == 0][0] == keys[x == 0][1]  # -0.0 == 0.0


def test_keep_mass_edge_cases():
    probs = np.array([[0.5, 0.25, 0.125, 0.125], [0.25] * 4, [1.0, 0.0, 0.0, 0.0]], np.float32)
    rank = probs  # any increasing function of the probabilities ranks alike
    # Exactly the mass reached; ties at the boundary all kept (transformers' top-p would keep an arbitrary part).
    assert_array_equal(logits_lib.keep_mass(rank, probs, 0.75),
                       [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert_array_equal(logits_lib.keep_mass(rank, probs, 1e-9), [[1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert logits_lib.keep_mass(rank, probs, 1.5).all()  # more than all the mass: everything


def chi_square(counts, probs):
    """Pearson's statistic over the categories of positive probability; counts elsewhere must be 0."""
    assert counts[probs == 0].sum() == 0
    expected = counts.sum() * probs[probs > 0]
    return ((counts[probs > 0] - expected) ** 2 / expected).sum(), int((probs > 0).sum()) - 1


def test_sample_frequencies_match_the_distribution():
    """60k draws over 300 tokens (two blocks of the two-level draw, the last one padded)."""
    rng = np.random.default_rng(4)
    row = rng.normal(size=300).astype(np.float32) * 1.5
    row[rng.random(300) < 0.3] = -np.inf
    draws = np.asarray(jax.jit(logits_lib.sample)(jax.random.key(0), np.tile(row, (60_000, 1))))
    counts = np.bincount(draws, minlength=300)
    statistic, dof = chi_square(counts, np.asarray(jax.nn.softmax(row)))
    limit = dof + 6 * np.sqrt(2 * dof)  # six standard deviations of a chi-square with dof degrees of freedom
    assert statistic < limit, (statistic, limit)
    # The same test rejects a slightly different distribution (temperature 1.1).
    wrong, _ = chi_square(counts, np.asarray(jax.nn.softmax(row / 1.1)))
    assert wrong > 2 * limit, (wrong, limit)
