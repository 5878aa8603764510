"""Reward components (registered by name on import) and their combination; see base.py for the interface."""
from diffchat_jax.rewards import ci  # noqa: F401  (registers "ci")
