"""Render prompts to PNG files with a Stable Diffusion 1.x checkpoint (the renderer PPO's image rewards use).

  python -m diffchat_jax.txt2img --model=stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --prompt="a red fox in the snow, highly detailed" --seeds=0,1,2 --out=renders/
  python -m diffchat_jax.txt2img --model=deliberate_v2.safetensors --prompts=prompts.txt --out=renders/

Writes OUT/{prompt index:04d}_{seed}.png for every prompt and seed, with the prompt, negative prompt, seed, model,
solver, steps and guidance in each file's PNG text chunks.
"""
import argparse
import os
import sys

import jax.numpy as jnp
import tqdm

from diffchat_jax.diffusion import images, pipeline, render, schedulers


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers pipeline folder or hub id, or a single .safetensors")
    p.add_argument("--config_from", default="", help="single files: a diffusers pipeline with configs + tokenizer")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeat the flag for more)")
    source.add_argument("--prompts", help="a UTF-8 text file, one prompt per line (blank lines skipped)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; every prompt is rendered with each")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--solver", default="dpmpp_2m", choices=sorted(schedulers.SOLVERS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance; <= 1 turns it off")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--height", type=int, default=0, help="0 = the model's native size")
    p.add_argument("--width", type=int, default=0, help="0 = the model's native size")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch_size", type=int, default=4, help="images per jitted call")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    if args.prompt:
        return args.prompt
    with open(args.prompts, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        sys.exit(f"{args.prompts}: no prompts")
    return prompts


def main(argv=None) -> None:
    args = parse_args(argv)
    prompts = read_prompts(args)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        sys.exit(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    sd, params = pipeline.load_pretrained(args.model, dtype=jnp.dtype(args.dtype),
                                          config_from=args.config_from or None)
    settings = render.RenderSettings(solver=args.solver, num_steps=args.steps, guidance_scale=args.guidance,
                                     negative_prompt=args.negative, height=args.height, width=args.width)
    renderer = render.Renderer(sd, params, settings, batch_size=args.batch_size)
    jobs = [(k, prompt, seed) for k, prompt in enumerate(prompts) for seed in seeds]
    for start in tqdm.trange(0, len(jobs), args.batch_size, desc="render"):
        chunk = jobs[start:start + args.batch_size]
        rendered = renderer([prompt for _, prompt, _ in chunk], [seed for _, _, seed in chunk])
        for (k, prompt, seed), image in zip(chunk, rendered):
            images.save_png(os.path.join(args.out, f"{k:04d}_{seed}.png"), image, {
                "prompt": prompt, "negative_prompt": args.negative, "seed": seed, "model": args.model,
                "solver": args.solver, "steps": args.steps, "guidance_scale": args.guidance})
    print(f"{len(jobs)} images in {args.out}")


if __name__ == "__main__":
    main()
