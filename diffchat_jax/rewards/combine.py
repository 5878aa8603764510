"""Scalar rewards from named components: weighted sum, non-finite handling, running normalisation, clipping.

    reward = clip(normalise(sum_k w_k * score_k), -clip, clip)

Non-finite scores are never averaged in: `on_nonfinite="error"` stops the run naming the component and sample;
`"mask"` drops those samples from the update (their `valid` flag is False and their reward 0).
Normalisation uses running moments over all rewards seen so far (kept in the checkpoint):
`"none"`, `"scale"` (divide by the running std, the reward scaling of trlx/TRL) or `"standardize"`.
"""
import dataclasses
from typing import Mapping, Sequence

import numpy as np

from diffchat_jax.errors import UserError
from diffchat_jax.rewards.base import Component, RewardBatch


class NonFiniteReward(UserError, ValueError):
    """A component returned NaN or inf and the config says to stop (exit code 3)."""
    exit_code = 3
    label = "reward error"


@dataclasses.dataclass(frozen=True)
class Moments:
    """Running count / mean / sum of squared deviations (Chan et al.'s parallel update)."""
    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: np.ndarray) -> "Moments":
        if x.size == 0:
            return self
        n, mean, m2 = float(x.size), float(x.mean()), float(((x - x.mean()) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        return Moments(total, self.mean + delta * n / total, self.m2 + m2 + delta ** 2 * self.count * n / total)

    @property
    def std(self) -> float:
        """The running std; 1 until there are two values, and while they are all equal (nothing to scale by)."""
        variance = self.m2 / self.count if self.count > 1 else 0.0
        return float(np.sqrt(variance)) if variance > 1e-12 else 1.0


def score_components(components: Mapping[str, Component], batch: RewardBatch) -> dict[str, np.ndarray]:
    """Every component's [B] float64 scores, checked for shape."""
    scores = {}
    for name, component in components.items():
        s = np.asarray(component.score(batch), dtype=np.float64)
        if s.shape != (len(batch),):
            raise ValueError(f"reward component {name!r} returned shape {s.shape}, expected ({len(batch)},)")
        scores[name] = s
    return scores


def combine(scores: Mapping[str, np.ndarray], weights: Mapping[str, float], responses: Sequence[str],
            on_nonfinite: str) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sum of component scores [B] -> (reward [B] float64, valid [B] bool); `responses` name a sample
    in the error."""
    valid = np.ones(len(responses), bool)
    for name, s in scores.items():
        bad = ~np.isfinite(s)
        if bad.any() and on_nonfinite == "error":
            b = int(np.flatnonzero(bad)[0])
            raise NonFiniteReward(f"reward component {name!r} is {s[b]} for sample {b} "
                                  f"(response {responses[b]!r}); set reward.on_nonfinite='mask' to drop "
                                  f"such samples instead")
        valid &= ~bad
    total = sum(weights[name] * np.where(valid, s, 0.0) for name, s in scores.items())
    return np.where(valid, total, 0.0), valid


def normalize(reward: np.ndarray, valid: np.ndarray, moments: Moments, mode: str,
              clip: float) -> tuple[np.ndarray, Moments]:
    """Updates the running moments with the valid rewards, then normalises and clips (0 = no clipping)."""
    moments = moments.update(reward[valid])
    if mode == "scale":
        reward = reward / moments.std
    elif mode == "standardize":
        reward = (reward - moments.mean) / moments.std
    elif mode != "none":
        raise ValueError(f"reward.normalize must be 'none', 'scale' or 'standardize', got {mode!r}")
    if clip > 0:
        reward = np.clip(reward, -clip, clip)
    return np.where(valid, reward, 0.0), moments
