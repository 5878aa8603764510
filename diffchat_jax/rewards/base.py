"""The reward interface: named components scoring a rollout batch, combined into one scalar per sample.

A component is a `Component(name, score, needs_images)`; `score(batch: RewardBatch) -> [B] float` returns one
score per sample (higher is better). Components are registered by name with a factory
`make(config) -> Component` (`register`), and a run picks them by name with weights (`config.reward.components`,
e.g. {"ci": 1.0, "aesthetic": 0.5}). When any chosen component `needs_images`, the responses are rendered once
(by the configured renderer) and every component sees the same images in `batch.images`.

Components that need images score them with models on the devices; their factories take two more keywords,
`make(config, mesh=None, abstract=False)`: the job's mesh (None = this host's devices) and, for the memory
report, abstract=True (shapes only: no weights are read). They also give the report their resident `params` and
`device_steps(n_images, (height, width))`: the jitted calls that scoring n images makes, as aot.Steps.
"""
import dataclasses
from typing import Any, Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class RewardBatch:
    """One rollout batch as the reward components see it; every sequence has length B.

    x_o, y_o: the CI references: raw source / target captions, with x / y standing in where the data has none
        (`diffchat_jax.text.integrity.ci_reference`).
    i: instructions. x: the (beautified) input prompts. responses: the decoded generated prompts y.
    images: [B, N, H, W, 3] uint8, N rendered images per response, or None when no component needs images.
    """
    x_o: Sequence[str]
    i: Sequence[str]
    y_o: Sequence[str]
    x: Sequence[str]
    responses: Sequence[str]
    images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.responses)


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    score: Callable[[RewardBatch], np.ndarray]  # -> [B] float
    needs_images: bool = False
    params: Any = None  # the device arrays the component keeps (its models' params), for the memory report
    device_steps: Callable[[int, tuple[int, int]], list] | None = None  # (n_images, (H, W)) -> [aot.Step]


_FACTORIES: dict[str, Callable[..., Component]] = {}
_NEEDS_IMAGES: dict[str, bool] = {}


def register(name: str, needs_images: bool = False):
    """Decorator: `@register("ci") def make_ci(config) -> Component`; say `needs_images=True` for components
    that score rendered images, so a run can check that it renders before loading any scorer."""
    def wrap(factory):
        if name in _FACTORIES:
            raise ValueError(f"reward component {name!r} registered twice")
        _FACTORIES[name] = factory
        _NEEDS_IMAGES[name] = needs_images
        return factory
    return wrap


def needs_images(name: str) -> bool:
    return _NEEDS_IMAGES[name]


def make_component(name: str, config, mesh=None, abstract: bool = False) -> Component:
    """The registered component; `mesh` and `abstract` go to the factories of components that need images."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown reward component {name!r}; known: {sorted(_FACTORIES)}")
    if _NEEDS_IMAGES[name]:
        return _FACTORIES[name](config, mesh=mesh, abstract=abstract)
    return _FACTORIES[name](config)


def registered() -> list[str]:
    return sorted(_FACTORIES)
