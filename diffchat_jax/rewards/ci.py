"""The content-integrity reward component (paper Listing 1, thresholded at `config.ci.threshold`)."""
import numpy as np

from diffchat_jax.rewards.base import Component, RewardBatch, register
from diffchat_jax.text import integrity, keywords


@register("ci")
def make_ci(config) -> Component:
    keyword_config = keywords.from_config(config.ci)
    threshold = float(config.ci.threshold)

    def score(batch: RewardBatch) -> np.ndarray:
        return np.array([integrity.ci_score(x_o, i, y_o, y, threshold, keyword_config)
                         for x_o, i, y_o, y in zip(batch.x_o, batch.i, batch.y_o, batch.responses)])

    return Component("ci", score)
