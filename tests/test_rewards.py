"""Reward interface and combination: registry, weights, non-finite handling, running normalisation, CI component."""
import ml_collections
import numpy as np
import pytest

from diffchat_jax.rewards import base, ci as _ci, combine  # noqa: F401  (_ci registers "ci")
from diffchat_jax.text import keywords

BATCH = base.RewardBatch(x_o=["a horse in a field"] * 3, i=["turn the horse into a zebra"] * 3,
                         y_o=["a zebra in a field"] * 3, x=["a horse in a field, 8k"] * 3,
                         responses=["a zebra in a field, 8k", "a horse in a field", "a zebra"])


def constant(name, values):
    return base.Component(name, lambda batch: np.asarray(values, dtype=np.float64))


def test_weighted_sum():
    scores = {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([0.5, 0.0, -1.0])}
    reward, valid = combine.combine(scores, {"a": 2.0, "b": 4.0}, BATCH.responses, "error")
    np.testing.assert_allclose(reward, [4.0, 4.0, 2.0])
    assert valid.all()


def test_nonfinite_error_names_component_and_sample():
    scores = {"a": np.array([1.0, np.nan, 3.0])}
    with pytest.raises(combine.NonFiniteReward, match=r"'a' is nan for sample 1 \(response 'a horse in a field'\)"):
        combine.combine(scores, {"a": 1.0}, BATCH.responses, "error")


def test_nonfinite_mask_drops_the_sample_and_keeps_it_out_of_the_moments():
    scores = {"a": np.array([1.0, np.inf, 3.0]), "b": np.array([1.0, 1.0, np.nan])}
    reward, valid = combine.combine(scores, {"a": 1.0, "b": 1.0}, BATCH.responses, "mask")
    np.testing.assert_array_equal(valid, [True, False, False])
    np.testing.assert_allclose(reward, [2.0, 0.0, 0.0])
    normalized, moments = combine.normalize(reward, valid, combine.Moments(), "none", 0.0)
    assert moments.count == 1 and moments.mean == 2.0
    assert np.isfinite(normalized).all()


def test_running_moments_match_numpy():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3.0, 2.0, size=n) for n in (5, 17, 1, 40)]
    moments = combine.Moments()
    for chunk in chunks:
        moments = moments.update(chunk)
    everything = np.concatenate(chunks)
    np.testing.assert_allclose([moments.count, moments.mean, moments.std],
                               [everything.size, everything.mean(), everything.std()], rtol=1e-10)


@pytest.mark.parametrize("mode", ["none", "scale", "standardize"])
def test_normalize_modes_and_clip(mode):
    history = combine.Moments().update(np.array([0.0, 4.0]))  # mean 2, std 2 before this batch
    reward = np.array([2.0, 6.0, -10.0])
    out, moments = combine.normalize(reward, np.ones(3, bool), history, mode, clip=2.5)
    everything = np.array([0.0, 4.0, 2.0, 6.0, -10.0])
    expected = {"none": reward, "scale": reward / everything.std(),
                "standardize": (reward - everything.mean()) / everything.std()}[mode]
    np.testing.assert_allclose(out, np.clip(expected, -2.5, 2.5))
    assert moments.count == 5


@pytest.mark.parametrize("mode", ["scale", "standardize"])
def test_constant_rewards_normalize_to_finite_values(mode):
    """All-equal rewards have std 0: normalising must not divide by it."""
    moments = combine.Moments()
    for _ in range(3):
        out, moments = combine.normalize(np.zeros(4), np.ones(4, bool), moments, mode, clip=0.0)
        np.testing.assert_array_equal(out, 0.0)
    out, _ = combine.normalize(np.full(4, 2.0), np.ones(4, bool), combine.Moments(), "scale", clip=0.0)
    np.testing.assert_allclose(out, 2.0)


def test_score_components_checks_shapes():
    with pytest.raises(ValueError, match=r"returned shape \(2,\), expected \(3,\)"):
        combine.score_components({"bad": constant("bad", [1.0, 2.0])}, BATCH)


def test_registry():
    assert "ci" in base.registered()
    with pytest.raises(ValueError, match="unknown reward component 'nope'"):
        base.make_component("nope", None)
    with pytest.raises(ValueError, match="registered twice"):
        base.register("ci")(lambda config: None)


@pytest.mark.skipif(not keywords.wordnet_available(), reason="NLTK WordNet is not installed")
def test_ci_component_scores_listing1():
    config = ml_collections.ConfigDict({"ci": {"threshold": 0.7, "candidate_pos": keywords.CANDIDATE_POS,
                                               "stop_list": True, "tagger": "pattern"}})
    component = base.make_component("ci", config)
    # zebra (highlighted, 2) + field = 1.0; highlighted zebra lost: 1/2 < 0.7 -> 0; zebra alone: 2/2 = 1.0.
    np.testing.assert_allclose(component.score(BATCH), [1.0, 0.0, 1.0])
