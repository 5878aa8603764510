"""KL coefficient control: fixed, or adaptive (Ziegler et al. 2019, as in trlx/TRL's AdaptiveKLController).

Adaptive: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon), where KL is the batch's mean
per-sequence KL(policy || reference) and n_steps the number of samples it was measured on.
"""


def update_beta(beta: float, kl: float, n_steps: int, *, adaptive: bool, target: float, horizon: int) -> float:
    if not adaptive:
        return beta
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)
