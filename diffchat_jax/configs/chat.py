"""The chat (paper Fig. 1): `python -m diffchat_jax.chat --config=configs/chat.py[:tiny] [--config.x=...]`.

A DiffChat model rewrites the current prompt with each instruction; every turn is rendered with one of
render.models and saved to the session folder. Variant tiny: the tiny demo's PPO model and the tiny random SD
pipelines of `python -m diffchat_jax.tiny_models` (`make demo` builds both), on CPU.
"""
import ml_collections

from diffchat_jax.configs.eval import DEMO_WORKDIR
from diffchat_jax.configs.ppo import TINY_MODELS
from diffchat_jax.errors import ConfigError


def get_config(arg=None):
    variants = set(arg.split(",")) if arg else set()
    if variants - {"tiny"}:
        raise ConfigError(f"--config=configs/chat.py: unknown variant(s) {sorted(variants - {'tiny'})}; known: tiny")
    c = ml_collections.ConfigDict()
    c.mode = "chat"
    # The DiffChat model: an SFT / PPO workdir (its export/ is used), a transformers BLOOM folder or a hub id.
    c.model = "workdirs/ppo/export"
    # How it writes y: greedy (deterministic) or a seeded draw with typical sampling (ADM pi+'s mass).
    c.decoding = ml_collections.ConfigDict(dict(greedy=True, typical_mass=0.97, temperature=1.0, seed=0,
                                                max_new_tokens=128, max_prompt_tokens=384, dtype="float32"))
    c.render = ml_collections.ConfigDict(dict(
        # NAME=PATH[,NAME=PATH...]: Stable Diffusion 1.x checkpoints (diffusers folders, hub ids or single
        # .safetensors files). The prompt is model-agnostic: /model NAME switches and keeps the conversation.
        models="sd15=stable-diffusion-v1-5/stable-diffusion-v1-5",
        model="",  # the first turn's model; empty = the first of `models`
        solver="dpmpp_2m", num_steps=25, guidance_scale=7.5, negative_prompt="", height=0, width=0))
    c.seed = 0  # the first turn's image seed (/seed N changes it)
    c.session_dir = ""  # where session.json and the images go; empty = workdirs/chat/<date-time>
    c.web = ml_collections.ConfigDict(dict(host="127.0.0.1", port=7860, share=False))
    if "tiny" in variants:
        c.tiny_models = TINY_MODELS
        c.demo_workdir = DEMO_WORKDIR
        c.model = c.get_ref("demo_workdir") + "/ppo"
        c.decoding.max_new_tokens = 48
        models = c.get_ref("tiny_models")
        c.render.models = "tiny=" + models + "/sd"
        c.render.num_steps = 4
    return c
