"""Evaluation throughput: test rows per minute of the eval's three stages, generation (a model: system's jitted
rewriter), rendering (the row's raw image and its target image) and scoring (the five image metrics and CI).

The stages are timed as the eval job runs them (eval/job.py), each after a warm-up call (compile times apart), on
random models in the real formats: a BLOOM of --bloom shape with a BPE tokenizer trained on the shipped sample,
an SD 1.x pipeline per --sizes (diffchat_jax.diffusion.tiny) and the tiny scorers. The anchor is the first size:
each later size's rows/min is also shown as a ratio of it. Numbers, not a test.

  python -m bench.eval                                   # tiny and mid SD pipelines, CPU
  python -m bench.eval --sizes=sd15 --rows=32 --steps=20  # SD 1.5's shapes (512x512), GPU
"""
import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffchat_jax.data import SAMPLE_PATH, examples as examples_lib, tokenizer as tokenizer_lib
from diffchat_jax.diffusion import pipeline, render, tiny
from diffchat_jax.eval import metrics as metrics_lib, systems
from diffchat_jax.models import bloom
from diffchat_jax.rewards import image
from diffchat_jax.sampling import rewriter as rewriter_lib
from diffchat_jax.text import keywords

BLOOM_SHAPES = {"tiny": (64, 2, 4), "small": (256, 4, 8), "1b1": (1536, 24, 16)}  # hidden, layers, heads


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,mid", help=f"comma-separated SD pipeline sizes: {sorted(tiny.SIZES)}")
    p.add_argument("--bloom", default="tiny", choices=sorted(BLOOM_SHAPES), help="the rewriter's shape")
    p.add_argument("--rows", type=int, default=16, help="test rows per timed pass")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch", type=int, default=8, help="rows per jitted call, every stage")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the SD pipeline's")
    return p.parse_args()


def timed_s(fn):
    """(seconds of one warm call, seconds of the first call): the first compiles."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start, first


def build_rewriter(folder: str, shape: str, rows, args) -> rewriter_lib.Rewriter:
    tokenizer = tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.sample_corpus(rows), 1024, folder)
    hidden, layers, heads = BLOOM_SHAPES[shape]
    config = bloom.BloomConfig(vocab_size=len(tokenizer), hidden_size=hidden, n_layer=layers, n_head=heads)
    params = bloom.init_params(config, jax.random.key(0))
    decoding = rewriter_lib.Decoding(greedy=True, max_new_tokens=args.max_new_tokens, batch_size=args.batch)
    return rewriter_lib.Rewriter(bloom.Bloom(config), params, tokenizer, decoding)


def main():
    args = parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x {jax.device_count()}; {args.rows} rows, BLOOM "
          f"{args.bloom} (greedy, {args.max_new_tokens} new tokens), {args.steps} dpmpp_2m steps, 1 image per "
          f"prompt, batch {args.batch}, SD {args.dtype}")
    rows = examples_lib.load_examples(SAMPLE_PATH)[0][:args.rows]
    xs, instructions = [r.x for r in rows], [r.i for r in rows]
    with tempfile.TemporaryDirectory() as root:
        rewriter = build_rewriter(f"{root}/bloom", args.bloom, rows, args)
        generate_s, generate_first = timed_s(lambda: np.asarray(rewriter.rewrite(xs, instructions).lengths))
        targets = rewriter.rewrite(xs, instructions).texts
        paths = image.build_tiny_models(f"{root}/scorers")
        scorer = metrics_lib.ImageMetrics.load(
            {"clip_model": paths["clip"], "mlp_weights": paths["mlp_weights"], "pickscore_model": paths["pickscore"],
             "hps_weights": paths["hps"], "hps_config": paths["pickscore"]}, metrics_lib.IMAGE_METRICS,
            batch_size=args.batch)
        keyword_config = keywords.KeywordConfig()
        print(f"{'SD size':>8} {'image':>9} {'stage':>10} {'s/row':>8} {'rows/min':>9} {'share':>6} "
              f"{'vs anchor':>9} {'first call s':>12}")
        anchor = None
        for size in args.sizes.split(","):
            folder = tiny.build_pipeline(f"{root}/sd-{size}", size)
            sd, params = pipeline.load_pretrained(folder, dtype=jnp.dtype(args.dtype))
            renderer = render.Renderer(sd, params, render.RenderSettings(num_steps=args.steps),
                                       batch_size=args.batch)
            seeds = list(range(len(rows)))
            render_both = lambda: np.stack([renderer(xs, seeds), renderer(targets, seeds)])
            render_s, render_first = timed_s(render_both)
            raw, target = (images[:, None] for images in render_both())
            score = lambda: (scorer(raw, target, xs, targets),
                             systems.ci_scores(rows, targets, keyword_config))[0]["aesthetic"]
            score_s, score_first = timed_s(score)
            stages = {"generation": (generate_s, generate_first), "rendering": (render_s, render_first),
                      "scoring": (score_s, score_first)}
            total = sum(s for s, _ in stages.values())
            anchor = anchor or total
            size_name = f"{renderer.height}x{renderer.width}"
            for name, (seconds, first) in [*stages.items(), ("all", (total, None))]:
                per_row = seconds / len(rows)
                ratio = f"{anchor / total:.3g}" if name == "all" else ""
                first = "" if first is None else f"{first:.1f}"
                print(f"{size:>8} {size_name:>9} {name:>10} {per_row:>8.3g} {60 / per_row:>9.4g} "
                      f"{seconds / total:>6.1%} {ratio:>9} {first:>12}", flush=True)


if __name__ == "__main__":
    main()
