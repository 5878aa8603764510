"""Render prompts to PNG files with a Stable Diffusion 1.x checkpoint (the renderer PPO's image rewards use).

  python -m diffchat_jax.txt2img --model=stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --prompt="a red fox in the snow, highly detailed" --seeds=0,1,2 --out=renders/
  python -m diffchat_jax.txt2img --model=deliberate_v2.safetensors --prompts=prompts.txt --out=renders/

Writes OUT/{prompt index:04d}_{seed}.png for every prompt and seed, with the prompt, negative prompt, seed, model,
solver, steps and guidance in each file's PNG text chunks. Every flag, the prompts file and the output folder are
checked before the model is loaded; a bad one is one `error:` line and exit status 2.
"""
import argparse
import os
import tempfile

import jax.numpy as jnp
import tqdm

from diffchat_jax import errors
from diffchat_jax.diffusion import images, pipeline, render, schedulers

# The smallest multiple every pipeline takes: 8 latent pixels x a VAE scale of at least 2 (SD 1.x has 8, so
# multiples of 64; that is checked once the model is loaded).
SIZE_MULTIPLE = 16
MAX_SEED = 2 ** 32  # seeds are uint32 PRNG keys


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors (a bad value, a missing flag) as one `error:` line through errors.run_command, not the
    usage text."""

    def error(self, message):
        raise errors.ConfigError(f"{message}; see --help")


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def image_side(text: str) -> int:
    value = integer(text)
    if value < 0 or value % SIZE_MULTIPLE:
        raise argparse.ArgumentTypeError(f"must be 0 (the model's native size) or a positive multiple of "
                                         f"{SIZE_MULTIPLE}, got {value}")
    return value


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    out_of_range = [s for s in seeds if not 0 <= s < MAX_SEED]
    if out_of_range:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {out_of_range[0]}")
    return seeds


def parse_args(argv):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers pipeline folder or hub id, or a single .safetensors")
    p.add_argument("--config_from", default="", help="single files: a diffusers pipeline with configs + tokenizer")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeat the flag for more)")
    source.add_argument("--prompts", help="a UTF-8 text file, one prompt per line (blank lines skipped)")
    p.add_argument("--seeds", type=seed_list, default="0", help="comma-separated seeds; every prompt is rendered "
                                                                "with each")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--solver", default="dpmpp_2m", choices=sorted(schedulers.SOLVERS))
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance; <= 1 turns it off")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--height", type=image_side, default=0, help="0 = the model's native size")
    p.add_argument("--width", type=image_side, default=0, help="0 = the model's native size")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch_size", type=positive_int, default=4, help="images per jitted call")
    return p.parse_args(argv)


def read_prompts_file(path: str) -> list[str]:
    """One prompt per non-blank line of a UTF-8 file."""
    where = f"--prompts {path}"
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise errors.DataError(f"{where}: no such file; check the path") from None
    except IsADirectoryError:
        raise errors.DataError(f"{where}: is a directory, expected a text file with one prompt per line") from None
    prompts = []
    for n, line in enumerate(raw.splitlines(), 1):
        try:
            prompts.append(line.decode("utf-8").strip())
        except UnicodeDecodeError as e:
            raise errors.DataError(f"{where}: not UTF-8 text (byte 0x{line[e.start]:02x} on line {n}); "
                                   "save it as UTF-8") from None
    prompts = [prompt for prompt in prompts if prompt]
    if not prompts:
        raise errors.DataError(f"{where}: no prompts (the file is empty or blank); write one prompt per line")
    return prompts


def read_prompts(args) -> list[str]:
    return args.prompt if args.prompt else read_prompts_file(args.prompts)


def check_out_folder(out: str) -> None:
    """Makes --out and writes a probe file there, so that an unwritable folder fails before the model loads."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise errors.ConfigError(f"--out {out}: cannot write there ({e.strerror or e}); "
                                 "choose a folder you can write to") from e


def render_all(args, prompts: list[str]) -> None:
    sd, params = pipeline.load_pretrained(args.model, dtype=jnp.dtype(args.dtype),
                                          config_from=args.config_from or None)
    settings = render.RenderSettings(solver=args.solver, num_steps=args.steps, guidance_scale=args.guidance,
                                     negative_prompt=args.negative, height=args.height, width=args.width)
    renderer = render.Renderer(sd, params, settings, batch_size=args.batch_size)
    jobs = [(k, prompt, seed) for k, prompt in enumerate(prompts) for seed in args.seeds]
    for start in tqdm.trange(0, len(jobs), args.batch_size, desc="render"):
        chunk = jobs[start:start + args.batch_size]
        rendered = renderer([prompt for _, prompt, _ in chunk], [seed for _, _, seed in chunk])
        for (k, prompt, seed), image in zip(chunk, rendered):
            images.save_png(os.path.join(args.out, f"{k:04d}_{seed}.png"), image, {
                "prompt": prompt, "negative_prompt": args.negative, "seed": seed, "model": args.model,
                "solver": args.solver, "steps": args.steps, "guidance_scale": args.guidance})
    print(f"{len(jobs)} images in {args.out}")


def run(argv) -> None:
    args = parse_args(argv)
    prompts = read_prompts(args)
    check_out_folder(args.out)
    render_all(args, prompts)


def main(argv=None) -> None:
    errors.run_command(run, argv)


if __name__ == "__main__":
    main()
