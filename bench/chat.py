"""Chat latency: time to the first streamed token and seconds per turn (rewrite + render), as the chat runs a turn
(chat/engine.py: Chat.instruct with a streaming callback, then the render and the PNG).

Random models in the real formats: a BLOOM of --bloom shape with a BPE tokenizer trained on the shipped sample (its
vocabulary is 1024, so the LM head is cheaper than a real BLOOM's 250880), and an SD 1.x pipeline per --sizes
(diffchat_jax.diffusion.tiny). After one warm-up turn (compilation apart, printed) every timed turn edits the
previous prompt. The anchor is the first size: later sizes' seconds per turn are also shown as a ratio of it.
Numbers, not a test.

  python -m bench.chat                                             # tiny and mid SD, tiny BLOOM, CPU
  python -m bench.chat --bloom=1b1 --sizes=sd15 --steps=20 --max-new-tokens=128   # bloom-1b1 + SD 1.5 shapes, GPU
"""
import argparse
import tempfile
import time

import jax
import jax.numpy as jnp

from bench.eval import BLOOM_SHAPES, build_rewriter
from diffchat_jax.chat import engine
from diffchat_jax.data import SAMPLE_PATH, examples as examples_lib
from diffchat_jax.diffusion import pipeline, render, tiny

INSTRUCTIONS = ("make it snow", "at night", "in the style of a watercolor", "add a red umbrella", "make it sunny")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,mid", help=f"comma-separated SD pipeline sizes: {sorted(tiny.SIZES)}")
    p.add_argument("--bloom", default="tiny", choices=sorted(BLOOM_SHAPES), help="the rewriter's shape")
    p.add_argument("--turns", type=int, default=5, help="timed turns per size")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the SD pipeline's")
    p.add_argument("--batch", type=int, default=1, help="(the chat renders one image a turn)")
    return p.parse_args()


def timed_turn(chat: engine.Chat, instruction: str) -> tuple[float, float, int]:
    """(seconds to the first streamed text, seconds of the whole turn, response tokens)."""
    start, first = time.perf_counter(), []
    turn_text = lambda text: first or first.append(time.perf_counter() - start)
    turn = chat.instruct(instruction, on_text=turn_text)
    total = time.perf_counter() - start
    return (first[0] if first else total), total, len(chat.rewriter.tokenizer(turn.prompt)["input_ids"])


def main():
    args = parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; BLOOM {args.bloom} {BLOOM_SHAPES[args.bloom]} "
          f"(greedy, up to {args.max_new_tokens} new tokens), {args.steps} dpmpp_2m steps, SD {args.dtype}; "
          f"{args.turns} timed turns per size")
    rows = examples_lib.load_examples(SAMPLE_PATH)[0][:64]
    with tempfile.TemporaryDirectory() as root:
        rewriter = build_rewriter(f"{root}/bloom", args.bloom, rows, args)
        print(f"{'SD size':>8} {'image':>9} {'first token s':>13} {'s/turn':>8} {'tokens':>7} {'vs anchor':>9} "
              f"{'warm-up turn s':>14}")
        anchor = None
        for size in args.sizes.split(","):
            folder = tiny.build_pipeline(f"{root}/sd-{size}", size)
            models = {size: folder}
            settings = render.RenderSettings(num_steps=args.steps)
            load = lambda path: pipeline.load_pretrained(path, dtype=jnp.dtype(args.dtype))
            chat = engine.Chat(rewriter, f"random BLOOM {args.bloom}", models, settings, f"{root}/session-{size}",
                               engine.Settings(seed=0, model=size, steps=args.steps), load_pipeline=load)
            chat.start(rows[0].x)
            _, warm_up, _ = timed_turn(chat, "make it brighter")
            runs = [timed_turn(chat, INSTRUCTIONS[k % len(INSTRUCTIONS)]) for k in range(args.turns)]
            first = sum(r[0] for r in runs) / len(runs)
            per_turn = sum(r[1] for r in runs) / len(runs)
            tokens = sum(r[2] for r in runs) / len(runs)
            anchor = anchor or per_turn
            height, width = chat.renderer(size, args.steps).height, chat.renderer(size, args.steps).width
            print(f"{size:>8} {f'{height}x{width}':>9} {first:>13.3f} {per_turn:>8.3f} {tokens:>7.1f} "
                  f"{per_turn / anchor:>9.3g} {warm_up:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
