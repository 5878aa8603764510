"""Rollout throughput: our jitted sampler vs transformers' `generate` (PyTorch) on the same random BLOOM weights.

Both sides: the same prompts (batch 16 x 48 tokens), exactly 64 new tokens per sample (min_new_tokens = max), top-p
0.9 (top-k off), KV cache, the same thread count. Prints generated tokens/s per shape, the ratio ours / PyTorch,
our compile time apart, and for the last shape the matmul roofline: this machine's 1024^3 matmul FLOP/s (measured
here) divided by the model FLOPs of the whole rollout (prefill + decode, weights and attention over the real context).
Timings are the best of --repeats runs, the two sides alternating (the machine may be shared).

Per shape it also prints a GEMM-only ceiling: the tokens/s of a rollout that did nothing but its weight matmuls, the
prefill at the 1024^3 rate and each decode step's batch-row GEMMs (every block's four projections and the LM head,
distinct weights streamed from memory as in the loop) at the rate timed here. No sampler built on this machine's
XLA matmuls can beat it; its ratio to transformers bounds ours.

  python -m bench.rollout                          # BLOOM 2x64, 4x512, 8x1024; vocab 8192; CPU
  python -m bench.rollout --shapes=24x1536x16 --vocab=250880 --dtype=bfloat16 --batch=64 --no-torch   # 1.1B, GPU
"""
import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from diffchat_jax.models import bloom
from diffchat_jax.sampling import rollout
from bench import shapes

EOS, PAD = 2, 3
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="2x64,4x512,8x1024",
                   help="comma-separated LAYERSxWIDTH[xHEADS] (heads default to WIDTH / 64)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=48, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens per sample")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype, both sides")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (XLA uses all)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side; the best counts")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True, help="time transformers too")
    return p.parse_args()


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def jax_runner(path, prompt, args):
    """A function running our rollout once, and the seconds its first call took (compile + run)."""
    model, params = bloom.load_pretrained(path, dtype=DTYPES[args.dtype])
    config = rollout.SamplingConfig(max_new_tokens=args.new, min_new_tokens=args.new, eos_id=EOS, pad_id=PAD,
                                    top_p=args.top_p)
    ids, mask = jax.device_put((prompt, np.ones_like(prompt)))

    def run():
        return jax.block_until_ready(rollout.generate(model, params, ids, mask, jax.random.key(0), config))

    first_s = seconds(run)
    assert int(run().mask.sum()) == args.batch * args.new
    return run, first_s


def torch_runner(model, prompt, args):
    ids = torch.from_numpy(prompt).long()
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=True, top_p=args.top_p, top_k=0,
                  max_new_tokens=args.new, min_new_tokens=args.new, eos_token_id=EOS, pad_token_id=PAD)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def run():
        with torch.no_grad(), autocast:
            return model.generate(ids, **kwargs)

    assert run().shape == (args.batch, args.prompt + args.new)  # also the warm-up
    return run


def matmul_flops_per_s(dtype, n=1024, repeats=20):
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(matmul(a, a))
    return 2 * n ** 3 / min(seconds(lambda: jax.block_until_ready(matmul(a, a))) for _ in range(repeats))


def rollout_flops(config, args) -> tuple[float, float]:
    """Model FLOPs of one rollout, (prefill, decode): 2 x weights per token (the LM head only where a token is
    drawn) plus attention (q.k and p.v: 4 x width per layer per attended position)."""
    n_layer, width = config.n_layer, config.hidden_size
    block_weights = 12 * width * width * n_layer
    head = width * args.vocab
    prefill = args.prompt * 2 * block_weights + 2 * head + 2 * width * n_layer * args.prompt ** 2
    context = args.prompt + np.arange(1, args.new)  # positions attended when feeding new token t
    decode = (args.new - 1) * 2 * (block_weights + head) + 4 * width * n_layer * context.sum()
    return args.batch * prefill, args.batch * decode


def decode_gemm_seconds(config, args, repeats=10):
    """Seconds of one decode step's weight matmuls alone: [batch, width] through every block's qkv, dense,
    h->4h and 4h->h projections and the LM head, each layer its own weights (streamed from memory, as in the loop)."""
    width, dtype = config.hidden_size, DTYPES[args.dtype]
    weight_shapes = [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)] * config.n_layer
    keys = jax.random.split(jax.random.key(0), len(weight_shapes) + 2)
    weights = [0.02 * jax.random.normal(k, s, dtype) for k, s in zip(keys, weight_shapes)]
    head = 0.02 * jax.random.normal(keys[-1], (width, args.vocab), dtype)
    x = jax.random.normal(keys[-2], (args.batch, width), dtype)

    @jax.jit
    def step(x, weights, head):
        for qkv, dense, up, down in zip(*[iter(weights)] * 4):
            x = x + (x @ qkv).reshape(-1, 3, width).sum(1) @ dense  # every qkv output used: no slice to sink
            x = x + jnp.tanh(x @ up) @ down
        return x @ head

    jax.block_until_ready(step(x, weights, head))
    return min(seconds(lambda: jax.block_until_ready(step(x, weights, head))) for _ in range(repeats))


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} ({args.threads} threads); "
          f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, top-p {args.top_p}, vocab {args.vocab}, "
          f"{args.dtype}")
    flops_per_s = matmul_flops_per_s(DTYPES[args.dtype])
    print(f"1024^3 {args.dtype} matmul: {flops_per_s / 1e9:.0f} GFLOP/s")
    print(f"{'shape':>10} {'ours tok/s':>11} {'torch tok/s':>12} {'ratio':>6} {'compile s':>10} "
          f"{'GEMM-only ceiling tok/s':>24} {'its ratio':>10}")
    for shape in args.shapes.split(","):
        model = shapes.random_torch_bloom(shape, args.vocab)
        prompt = rng.integers(PAD + 1, args.vocab, (args.batch, args.prompt)).astype(np.int32)
        with tempfile.TemporaryDirectory() as path:
            model.save_pretrained(path)
            ours_run, first_s = jax_runner(path, prompt, args)
        runs = {"ours": ours_run}
        if args.torch:
            runs["torch"] = torch_runner(model, prompt, args)
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(args.repeats):
            for side, run in runs.items():  # alternating: a load that comes and goes (shared machine) hits both
                best[side] = min(best[side], seconds(run))
        tokens = args.batch * args.new
        ours = tokens / best["ours"]
        theirs = tokens / best["torch"] if args.torch else float("nan")
        compile_s = first_s - best["ours"]
        prefill_flops, decode_flops = rollout_flops(model.config, args)
        ceiling = tokens / (prefill_flops / flops_per_s + (args.new - 1) * decode_gemm_seconds(model.config, args))
        print(f"{shape:>10} {ours:>11.4g} {theirs:>12.4g} {ours / theirs:>6.2f} {compile_s:>10.1f} "
              f"{ceiling:>24.4g} {ceiling / theirs:>10.2f}", flush=True)
    roofline = tokens / ((prefill_flops + decode_flops) / flops_per_s)
    print(f"roofline at {shape}: {roofline:.0f} tok/s; ours {ours:.0f} tok/s = {ours / roofline:.2f} of it, "
          f"the GEMM-only ceiling {ceiling / roofline:.2f} of it")


if __name__ == "__main__":
    main()
