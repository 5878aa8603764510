"""PPO iteration profile: where the time goes (rollout, render, reward, experience, update) and how much memory.

Runs the real trainer (`diffchat_jax.rl.trainer`) with random weights standing in for the trained models, and
reads the per-phase timings it logs. The first iterations (compilation) are left out.

  python -m bench.ppo_step                      # BLOOM 2x64 (the tiny config) and 4x512, CI reward, CPU
  python -m bench.ppo_step --shape=bloom-1b1    # the paper's configuration (configs/ppo.py): B 128, 384 tokens,
                                                # SD 1.5 at 512x512 with 20 DPM-Solver++ steps, PickScore on CLIP-H,
                                                # the aesthetic head on CLIP-L, bf16 policy
  python -m bench.ppo_step --shape=tiny --run   # the same flow on the tiny models (a test runs it)

On the CPU, --shape prints the memory report of that configuration (XLA's estimate per step, no weights: as
`python -m diffchat_jax.memory`). On an accelerator (or with --run) it builds random models of the real
shapes (BLOOM from the built-in table with a byte-level BPE tokenizer of the sample: ids past it decode to
nothing; SD 1.5's architecture; CLIP ViT-H/14 and ViT-L/14), times iterations, and prints the seconds per phase
and the device's peak memory (`jax.devices()[0].memory_stats()`; the CPU keeps none), after the trainer's own
memory report. On CPU the 1b1 iteration would take hours, so without --run it stops after the report.
"""
import argparse
import dataclasses
import json
import os
import tempfile

import jax
import numpy as np

from diffchat_jax.configs import ppo as ppo_config
from diffchat_jax import memory
from diffchat_jax.data import SAMPLE_PATH, examples as examples_lib, tokenizer as tokenizer_lib
from diffchat_jax.models import bloom, known
from diffchat_jax.rl import trainer
from diffchat_jax.utils import metrics as metrics_lib
from bench import shapes

PHASES = ("rollout", "render", "reward", "experience", "update")
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Scale:
    """The models of one --shape: the policy's BLOOM config, an SD size of diffusion.tiny, the two CLIP configs
    (None: the tiny stand-ins of rewards.image.build_tiny_models) and the config variant they fill in."""
    policy: dict
    sd: str
    clip_l: dict | None
    clip_h: dict | None
    variant: str


SCALES = {
    "tiny": Scale(policy=dict(vocab_size=1024, hidden_size=64, n_layer=2, n_head=4), sd="tiny", clip_l=None,
                  clip_h=None, variant="tiny"),
    "bloom-1b1": Scale(policy=known.BLOOM["bigscience/bloom-1b1"], sd="sd15", clip_l=known.CLIP_L14,
                       clip_h=known.CLIP_H14, variant=""),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SCALES), help="one configuration with its image rewards (see above)")
    p.add_argument("--run", action="store_true", help="with --shape: time iterations even on the CPU")
    p.add_argument("--shapes", default="2x64,4x512", help="without --shape: comma-separated LAYERSxWIDTH[xHEADS]")
    p.add_argument("--batch", type=int, default=32, help="without --shape: rollout batch (ppo.batch_size)")
    p.add_argument("--minibatch", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=48)
    p.add_argument("--iterations", type=int, default=7, help="iterations timed after --warmup ones")
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args()


def sample_tokenizer(folder: str):
    examples, _ = examples_lib.load_examples(SAMPLE_PATH)
    return tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.sample_corpus(examples), 1024, folder)


def sample_for(path: str, rows: int) -> tuple[str, int]:
    """(data file, epochs) for `rows` prompts: the sample's first rows when it has enough (one epoch, so that
    only the iterations asked for run), else the whole sample for as many epochs as needed."""
    with open(SAMPLE_PATH, encoding="utf-8") as f:
        lines = f.readlines()
    if rows > len(lines):
        return SAMPLE_PATH, -(-rows // len(lines))
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines[:rows])
    return path, 1


def random_policy_folder(path: str, hf_config: dict, tokenizer) -> None:
    """A random BLOOM of the config with the tokenizer, saved as an SFT export would be."""
    config = bloom.BloomConfig.from_hf(hf_config)
    bloom.save_pretrained(config, bloom.init_params(config, jax.random.PRNGKey(0)), path)
    tokenizer.save_pretrained(path)


def random_reward_models(root: str, scale: Scale) -> dict[str, str]:
    """Random SD and scorer checkpoints of the scale, in the real formats -> config overrides."""
    from diffchat_jax import tiny_models
    from diffchat_jax.diffusion import tiny
    from diffchat_jax.rewards import image
    if scale.clip_l is None:
        paths = tiny_models.build(root)
    else:
        paths = {"sd": tiny.build_pipeline(os.path.join(root, "sd"), scale.sd),
                 "clip": image.save_random_clip(os.path.join(root, "clip_l"), scale.clip_l),
                 "pickscore": image.save_random_clip(os.path.join(root, "clip_h"), scale.clip_h),
                 "mlp_weights": image.save_random_aesthetic_mlp(os.path.join(root, "aesthetic_mlp.pth"),
                                                                scale.clip_l["projection_dim"])}
    return {"render.model": paths["sd"], "reward.aesthetic.clip_model": paths["clip"],
            "reward.aesthetic.mlp_weights": paths["mlp_weights"], "reward.pickscore.model": paths["pickscore"],
            "reward.pickscore.processor": ""}


def timed_rows(workdir: str, warmup: int, iterations: int) -> list[dict]:
    rows = [r for r in metrics_lib.read_metrics(workdir) if "time_update_s" in r][warmup:]
    return rows[:iterations]


def run_scale(args) -> None:
    scale = SCALES[args.shape]
    config = ppo_config.get_config(scale.variant or None)
    accelerator = jax.devices()[0].platform != "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        policy = os.path.join(tmp, "policy")
        os.makedirs(policy)
        with open(os.path.join(policy, "config.json"), "w") as f:
            json.dump(scale.policy, f)
        config.model.name_or_path = policy
        print(f"{args.shape}: configs/ppo.py{':' + scale.variant if scale.variant else ''} on "
              f"{jax.devices()[0].platform}")
        if not (accelerator or args.run):
            print("memory report (XLA's estimate per device, no weights):")
            print("\n".join(memory.job_report(config).lines()))
            print("not run: an iteration at this scale takes hours on the CPU (run on an accelerator, or --run)")
            return
        # The trainer prints the same report for the real shapes at start-up, then runs.
        tokenizer = sample_tokenizer(os.path.join(tmp, "tokenizer"))
        random_policy_folder(policy, scale.policy, tokenizer)
        config.update_from_flattened_dict(random_reward_models(os.path.join(tmp, "models"), scale))
        config.data.train, config.ppo.epochs = sample_for(os.path.join(tmp, "data.jsonl"),
                                                          config.ppo.batch_size * (args.warmup + args.iterations))
        config.checkpoint_every = 10_000  # measure training, not checkpoint writes
        config.render.log_every = 0
        workdir = os.path.join(tmp, "run")
        trainer.train_and_evaluate(config, workdir)
        rows = timed_rows(workdir, args.warmup, args.iterations)
        stats = jax.devices()[0].memory_stats() or {}
    times = {p: float(np.mean([r.get(f"time_{p}_s", 0.0) for r in rows])) for p in PHASES}
    print(f"{len(rows)} timed iterations; seconds per phase: "
          + ", ".join(f"{p} {t:.2f}" for p, t in times.items()) + f"; total {sum(times.values()):.2f}")
    peak = stats.get("peak_bytes_in_use")
    print(f"peak device memory: {peak / GIB:.2f} GiB (jax.devices()[0].memory_stats()['peak_bytes_in_use'])"
          if peak else "peak device memory: not reported by this platform")


def run_shapes(args) -> None:
    """The per-shape profile on the tiny config with the CI reward (no rendering)."""
    table = [f"jax {jax.__version__} on {jax.devices()[0].platform} x {jax.device_count()}; batch {args.batch}, "
             f"minibatch {args.minibatch}, {args.new_tokens} new tokens, CI reward, ADM and VCI on",
             f"{'shape':>10} " + " ".join(f"{p + ' %':>12}" for p in PHASES if p != "render")
             + f" {'s / iteration':>14} {'rollout tok/s':>14} {'update tok/s':>13}"]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = sample_tokenizer(os.path.join(tmp, "tokenizer"))
        for shape in args.shapes.split(","):
            model_dir, workdir = os.path.join(tmp, shape, "model"), os.path.join(tmp, shape, "run")
            random_policy_folder(model_dir, {"vocab_size": len(tokenizer), **shapes.bloom_shape(shape)}, tokenizer)
            config = ppo_config.get_config("tiny")
            config.model.name_or_path = model_dir
            config.reward.components = {"ci": 1.0}
            config.ppo.batch_size, config.ppo.minibatch_size = args.batch, args.minibatch
            config.ppo.experience_batch_size = args.minibatch
            config.sampling.max_new_tokens = args.new_tokens
            config.data.max_length = max(config.data.max_length, 144 + args.new_tokens)
            per_epoch = 240 // args.batch
            config.ppo.epochs = -(-(args.warmup + args.iterations) // per_epoch)
            config.checkpoint_every = 10_000
            trainer.train_and_evaluate(config, workdir)
            rows = timed_rows(workdir, args.warmup, args.iterations)
            phases = [p for p in PHASES if p != "render"]
            times = {p: np.mean([r[f"time_{p}_s"] for r in rows]) for p in phases}
            total = sum(times.values())
            table.append(f"{shape:>10} " + " ".join(f"{100 * times[p] / total:>12.1f}" for p in phases)
                         + f" {total:>14.2f} {np.mean([r['rollout_tokens_per_s'] for r in rows]):>14.0f}"
                         f" {np.mean([r['update_tokens_per_s'] for r in rows]):>13.0f}")
    print("\n".join(table))  # after the trainers' own logs


def main():
    args = parse_args()
    if args.shape:
        run_scale(args)
    else:
        run_shapes(args)


if __name__ == "__main__":
    main()
