"""Builds the tiny random models the tiny configs use (CPU demos and tests; needs torch), in the real formats.

    python -m diffchat_jax.tiny_models [OUT]       # default OUT: workdirs/tiny-models

OUT/sd       a Stable Diffusion 1.x pipeline in the diffusers layout (diffchat_jax.diffusion.tiny, size "tiny")
OUT/ip2p     an InstructPix2Pix pipeline in the diffusers layout, the same size (diffchat_jax.diffusion.tiny)
OUT/scorers  CLIP + LAION aesthetic MLP, PickScore and HPS stand-ins (diffchat_jax.rewards.image.build_tiny_models)
"""
import os
import sys

from diffchat_jax import errors
from diffchat_jax.utils import torch_dep

DEFAULT_OUT = "workdirs/tiny-models"


def build(out_dir: str = DEFAULT_OUT) -> dict[str, str]:
    """Writes every tiny model under out_dir; returns {"sd": folder, "ip2p": folder, "clip": ..., "pickscore": ...,
    ...}."""
    torch_dep.require_torch("building the tiny models (python -m diffchat_jax.tiny_models)")
    from diffchat_jax.diffusion import tiny
    from diffchat_jax.rewards import image
    paths = {"sd": tiny.build_pipeline(os.path.join(out_dir, "sd"), "tiny"),
             "ip2p": tiny.build_ip2p_pipeline(os.path.join(out_dir, "ip2p"))}
    paths.update(image.build_tiny_models(os.path.join(out_dir, "scorers")))
    return paths


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[1] in ("-h", "--help"):
        print(__doc__)
        return
    if len(argv) > 2 or (len(argv) == 2 and argv[1].startswith("-")):
        raise errors.ConfigError(f"unexpected arguments {argv[1:]}; usage: python -m diffchat_jax.tiny_models [OUT]")
    for name, path in build(argv[1] if len(argv) == 2 else DEFAULT_OUT).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    errors.run_command(main, sys.argv)
