"""SFT train-step throughput: our jitted step vs the same step in PyTorch (transformers BloomForCausalLM).

Both sides get the same random weights (the torch model is saved and loaded into Flax), the same batch, sequence
length, loss (token-mean cross-entropy on the response half), global-norm clipping and AdamW. Prints training
tokens/s per shape and the ratio ours / PyTorch; compile time is reported apart.

  python -m bench.sft_step                               # BLOOM 2x64 and 4x512, batch 8, length 128
  python -m bench.sft_step --shapes=24x1536x16 --batch=8 --seq=384 --vocab=250880 --dtype=bfloat16   # 1.1B, GPU
"""
import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax.training import train_state

from diffchat_jax.configs import sft as sft_config
from diffchat_jax.models import bloom
from diffchat_jax.sft import trainer
from diffchat_jax.utils import mesh as mesh_lib, optim
from bench import shapes


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="2x64,4x512",
                   help="comma-separated LAYERSxWIDTH[xHEADS] (heads default to WIDTH / 64)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=10, help="timed steps per side (after warm-up)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype, both sides")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (XLA uses all)")
    return p.parse_args()


def make_batch(args, rng):
    ids = rng.integers(0, args.vocab, size=(args.batch, args.seq)).astype(np.int32)
    loss_mask = (np.arange(args.seq)[None] >= args.seq // 2).astype(np.int32).repeat(args.batch, 0)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}


def time_jax(path, batch, args):
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    module, params = bloom.load_pretrained(path, dtype=jnp.float32, compute_dtype=dtype)
    config = sft_config.get_config()
    tx = optim.make_optimizer(config.train, optim.make_schedule(config.train, 1000))
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    state = mesh_lib.shard_params(train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx), mesh)
    step = trainer.make_steps(module, 1, config.train.logprob_chunk, mesh, state).train
    batch = mesh_lib.shard_batch(batch, mesh)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    state, metrics = step(state, batch)  # one more warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return args.batch * args.seq * args.steps / (time.perf_counter() - start), compile_s


def time_torch(model, batch, args):
    config = sft_config.get_config()
    t = config.train
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.b1, t.b2), eps=t.eps, weight_decay=t.weight_decay)
    ids = torch.from_numpy(batch["input_ids"]).long()
    attention = torch.from_numpy(batch["attention_mask"]).long()
    weights = torch.from_numpy(batch["loss_mask"][:, 1:]).float()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(input_ids=ids, attention_mask=attention).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * weights).sum() / weights.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    return args.batch * args.seq * args.steps / (time.perf_counter() - start)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({args.threads} threads); batch {args.batch}, length {args.seq}, vocab {args.vocab}, {args.dtype}")
    print(f"{'shape':>9} {'ours tok/s':>11} {'torch tok/s':>12} {'ratio':>6} {'compile s':>10}")
    for shape in args.shapes.split(","):
        model = shapes.random_torch_bloom(shape, args.vocab)
        batch = make_batch(args, rng)
        with tempfile.TemporaryDirectory() as path:
            model.save_pretrained(path)
            ours, compile_s = time_jax(path, batch, args)
        theirs = time_torch(model, batch, args)
        print(f"{shape:>9} {ours:>11.0f} {theirs:>12.0f} {ours / theirs:>6.2f} {compile_s:>10.1f}")


if __name__ == "__main__":
    main()
