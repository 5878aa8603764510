"""Builds the tiny random models the tiny configs use (CPU demos and tests; needs torch), in the real formats.

    python -m diffchat_jax.tiny_models [OUT]       # default OUT: workdirs/tiny-models

OUT/sd       a Stable Diffusion 1.x pipeline in the diffusers layout (diffchat_jax.diffusion.tiny, size "tiny")
OUT/ip2p     an InstructPix2Pix pipeline in the diffusers layout, the same size (diffchat_jax.diffusion.tiny)
OUT/scorers  CLIP + LAION aesthetic MLP, PickScore and HPS stand-ins (diffchat_jax.rewards.image.build_tiny_models)

The models are built in a temporary folder beside OUT and moved into place when complete (with
OUT/tiny-models.json, the list of paths, written last). When OUT is already complete they are not built again
(`--force` rebuilds); a build killed halfway leaves OUT as it was.
"""
import json
import os
import shutil
import sys
import tempfile

from diffchat_jax import errors
from diffchat_jax.utils import torch_dep

DEFAULT_OUT = "workdirs/tiny-models"
INDEX = "tiny-models.json"  # name -> path relative to OUT; written last, so its presence means complete
USAGE = "usage: python -m diffchat_jax.tiny_models [OUT] [--force]"


def built(out_dir: str) -> dict[str, str] | None:
    """The paths of a complete build in out_dir, or None."""
    try:
        with open(os.path.join(out_dir, INDEX), encoding="utf-8") as f:
            relative = json.load(f)
    except (OSError, ValueError):
        return None
    paths = {name: os.path.join(out_dir, rel) for name, rel in relative.items()}
    return paths if all(os.path.exists(p) for p in paths.values()) else None


def build(out_dir: str = DEFAULT_OUT, force: bool = False) -> dict[str, str]:
    """Writes every tiny model under out_dir (unless already complete there); returns {"sd": folder, "ip2p":
    folder, "clip": ..., "pickscore": ..., ...}."""
    out_dir = os.path.abspath(out_dir)
    if not force and (paths := built(out_dir)) is not None:
        return paths
    torch_dep.require_torch("building the tiny models (python -m diffchat_jax.tiny_models)")
    from diffchat_jax.diffusion import tiny
    from diffchat_jax.rewards import image
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".building-", dir=os.path.dirname(out_dir))
    try:
        paths = {"sd": tiny.build_pipeline(os.path.join(staging, "sd"), "tiny"),
                 "ip2p": tiny.build_ip2p_pipeline(os.path.join(staging, "ip2p"))}
        paths.update(image.build_tiny_models(os.path.join(staging, "scorers")))
        with open(os.path.join(staging, INDEX), "w", encoding="utf-8") as f:
            json.dump({name: os.path.relpath(p, staging) for name, p in paths.items()}, f, indent=1)
        if not force and built(out_dir) is not None:  # another process finished the same build first
            return built(out_dir)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return built(out_dir)


def main(argv: list[str]) -> None:
    args = argv[1:]
    if args in (["-h"], ["--help"]):
        print(__doc__)
        return
    force = "--force" in args
    args = [a for a in args if a != "--force"]
    if len(args) > 1 or any(a.startswith("-") for a in args):
        raise errors.ConfigError(f"unexpected arguments {argv[1:]}; {USAGE}")
    out_dir = args[0] if args else DEFAULT_OUT
    if not force and built(out_dir) is not None:
        print(f"tiny models already built in {out_dir} (--force rebuilds them)")
    for name, path in build(out_dir, force).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    errors.run_command(main, sys.argv)
