"""Text-to-image throughput: our jitted renderer vs diffusers' StableDiffusionPipeline (PyTorch), same weights.

Both sides load the same random SD 1.x pipeline folder (diffchat_jax.diffusion.tiny, in the diffusers layout)
and render the same prompts with the same solver, number of steps, guidance (with a negative prompt, so two UNet
passes per step) and image size. Prints images/s for each side and the ratio ours / diffusers per size, and apart
our compile time. torch runs with the fastest of the --threads counts (XLA uses all cores).

  python -m bench.render                                                  # tiny and mid, CPU
  python -m bench.render --sizes=sd15 --batch=8 --dtype=bfloat16 --steps=20  # SD 1.5 size, GPU
"""
import argparse
import os
import tempfile

import diffusers
import jax
import jax.numpy as jnp
import torch

from bench.timing import timed, torch_rate
from diffchat_jax.diffusion import pipeline, render, schedulers, tiny


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,mid", help=f"comma-separated pipeline sizes: {sorted(tiny.SIZES)}")
    p.add_argument("--batch", type=int, default=4, help="prompts per call")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--solver", default="dpmpp_2m", choices=sorted(schedulers.SOLVERS))
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side (after warm-up)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides")
    p.add_argument("--threads", default=f"1,{os.cpu_count()}",
                   help="torch intra-op thread counts to try; the fastest is reported")
    return p.parse_args()


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} on {device} "
          f"(threads: best of {args.threads}); batch {args.batch}, {args.solver} x {args.steps} steps, guidance "
          f"{args.guidance}, {args.dtype}")
    print(f"{'size':>6} {'image':>9} {'ours img/s':>11} {'diffusers img/s':>16} {'ratio':>6} {'compile s':>10}")
    prompts = [f"a red fox in the snow at dawn, number {k}, highly detailed" for k in range(args.batch)]
    negative = ["blurry, low quality"] * args.batch
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as path:
            tiny.build_pipeline(path, size)
            sd, params = pipeline.load_pretrained(path, dtype=jnp.dtype(args.dtype))
            settings = render.RenderSettings(solver=args.solver, num_steps=args.steps,
                                             guidance_scale=args.guidance, negative_prompt=negative[0])
            renderer = render.Renderer(sd, params, settings, batch_size=args.batch)
            ours, compile_s = timed(lambda: renderer(prompts, range(args.batch)), args.repeats)

            torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch_dtype).to(device)
            scheduler = getattr(diffusers, schedulers.DIFFUSERS_SCHEDULERS[args.solver])
            pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            run = lambda: pipe(prompts, negative_prompt=negative, num_inference_steps=args.steps,
                               guidance_scale=args.guidance, output_type="np",
                               generator=torch.Generator(device).manual_seed(0)).images
            theirs = max(torch_rate(run, args.repeats, n) for n in map(int, args.threads.split(",")))
        height, width = renderer.height, renderer.width
        print(f"{size:>6} {f'{height}x{width}':>9} {ours * args.batch:>11.4g} {theirs * args.batch:>16.4g} "
              f"{ours / theirs:>6.2f} {compile_s:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
