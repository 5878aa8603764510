"""PPO iteration profile: where the time goes (rollout, scoring, experience, update) and update throughput.

Runs the real trainer (`diffchat_jax.rl.trainer`) on the tiny PPO config with a random BLOOM of each shape standing
in for the SFT model (a byte-level BPE trained on the shipped sample), and reads the per-phase timings it logs.
The first iterations (compilation) are left out.

  python -m bench.ppo_step                      # BLOOM 2x64 (the tiny config) and 4x512
  python -m bench.ppo_step --shapes=24x1536x16 --batch=128 --minibatch=32 --new_tokens=128   # 1.1B, GPU
"""
import argparse
import os
import tempfile

import jax
import numpy as np

from configs import ppo as ppo_config
from diffchat_jax.data import SAMPLE_PATH, examples as examples_lib, tokenizer as tokenizer_lib
from diffchat_jax.models import bloom
from diffchat_jax.rl import trainer
from diffchat_jax.utils import metrics as metrics_lib
from bench import shapes

PHASES = ("rollout", "reward", "experience", "update")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="2x64,4x512", help="comma-separated LAYERSxWIDTH[xHEADS]")
    p.add_argument("--batch", type=int, default=32, help="rollout batch (ppo.batch_size)")
    p.add_argument("--minibatch", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=48)
    p.add_argument("--iterations", type=int, default=7, help="iterations timed after --warmup ones")
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args()


def random_sft_folder(path: str, shape: str, tokenizer) -> None:
    """A random BLOOM of `shape` with the tokenizer, saved as an SFT export would be."""
    config = bloom.BloomConfig(vocab_size=len(tokenizer), **shapes.bloom_shape(shape))
    bloom.save_pretrained(config, bloom.init_params(config, jax.random.PRNGKey(0)), path)
    tokenizer.save_pretrained(path)


def main():
    args = parse_args()
    examples, _ = examples_lib.load_examples(SAMPLE_PATH)
    table = [f"jax {jax.__version__} on {jax.devices()[0].platform} x {jax.device_count()}; batch {args.batch}, "
             f"minibatch {args.minibatch}, {args.new_tokens} new tokens, CI reward, ADM and VCI on",
             f"{'shape':>10} " + " ".join(f"{p + ' %':>12}" for p in PHASES)
             + f" {'s / iteration':>14} {'rollout tok/s':>14} {'update tok/s':>13}"]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.sample_corpus(examples), 1024,
                                                      os.path.join(tmp, "tokenizer"))
        for shape in args.shapes.split(","):
            model_dir, workdir = os.path.join(tmp, shape, "model"), os.path.join(tmp, shape, "run")
            random_sft_folder(model_dir, shape, tokenizer)
            config = ppo_config.get_config("tiny")
            config.model.name_or_path = model_dir
            config.ppo.batch_size, config.ppo.minibatch_size = args.batch, args.minibatch
            config.sampling.max_new_tokens = args.new_tokens
            config.data.max_length = max(config.data.max_length, 144 + args.new_tokens)
            per_epoch = 240 // args.batch
            config.ppo.epochs = -(-(args.warmup + args.iterations) // per_epoch)
            config.checkpoint_every = 10_000  # measure training, not checkpoint writes
            trainer.train_and_evaluate(config, workdir)
            rows = [r for r in metrics_lib.read_metrics(workdir) if "time_update_s" in r][args.warmup:]
            rows = rows[:args.iterations]
            times = {p: np.mean([r[f"time_{p}_s"] for r in rows]) for p in PHASES}
            total = sum(times.values())
            rollout_rate = np.mean([r["rollout_tokens_per_s"] for r in rows])
            update_rate = np.mean([r["update_tokens_per_s"] for r in rows])
            table.append(f"{shape:>10} " + " ".join(f"{100 * times[p] / total:>12.1f}" for p in PHASES)
                         + f" {total:>14.2f} {rollout_rate:>14.0f} {update_rate:>13.0f}")
    print("\n".join(table))  # after the trainers' own logs


if __name__ == "__main__":
    main()
