"""Rollout throughput: our jitted sampler vs transformers' `generate` (PyTorch) on the same random BLOOM weights.

Both sides: the same prompts (batch 16 x 48 tokens), exactly 64 new tokens per sample (min_new_tokens = max), top-p
0.9 (top-k off), KV cache, the same thread count. Prints generated tokens/s per shape, the ratio ours / PyTorch,
our compile time apart, and for the last shape the matmul roofline: this machine's 1024^3 matmul FLOP/s (measured
here) divided by the model FLOPs of the whole rollout (prefill + decode, weights and attention over the real context).
Timings are the best of --repeats runs, the two sides alternating (the machine may be shared).

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


def rollout_flops(config, args):
    """Model FLOPs of one rollout: 2 x weights per token (the LM head only where a token is drawn) plus attention
    (q.k and p.v: 4 x width per layer per attended position)."""
    n_layer, width = config.n_layer, config.hidden_size
    block_weights = 12 * width * width * n_layer
    head = width * args.vocab
    prefill = args.prompt * 2 * block_weights + 2 * head + 2 * width * n_layer * args.prompt ** 2
    context = args.prompt + np.arange(1, args.new)  # positions attended when feeding new token t
    decode = (args.new - 1) * 2 * (block_weights + head) + 4 * width * n_layer * context.sum()
    return args.batch * (prefill + decode)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} ({args.threads} threads); "
          f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, top-p {args.top_p}, vocab {args.vocab}, "
          f"{args.dtype}")
    print(f"{'shape':>10} {'ours tok/s':>11} {'torch tok/s':>12} {'ratio':>6} {'compile s':>10}")
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
        ours = args.batch * args.new / best["ours"]
        theirs = args.batch * args.new / best["torch"] if args.torch else float("nan")
        compile_s = first_s - best["ours"]
        print(f"{shape:>10} {ours:>11.0f} {theirs:>12.0f} {ours / theirs:>6.2f} {compile_s:>10.1f}", flush=True)
    flops_per_s = matmul_flops_per_s(DTYPES[args.dtype])
    roofline = args.batch * args.new / (rollout_flops(model.config, args) / flops_per_s)
    print(f"roofline at {shape}: 1024^3 {args.dtype} matmul {flops_per_s / 1e9:.0f} GFLOP/s -> {roofline:.0f} tok/s; "
          f"ours {ours:.0f} tok/s = {ours / roofline:.2f} of it")


if __name__ == "__main__":
    main()
