"""The README's memory table: `python -m diffchat_jax.memory` for the paper's PPO configuration (configs/ppo.py:
B 128, 256 + 128 tokens, SD 1.5 at 512x512, CLIP-H PickScore, CLIP-L aesthetic) on 1 and 8 devices, with and
without fsdp, for BLOOM-1b1, 3b and 7b1 (shapes from the built-in table; no weights). Each row runs in its own
process (the device count is fixed when jax starts); on 2 CPU cores the whole table takes about half an hour.

  python -m bench.memory_table                 # every row
  python -m bench.memory_table --rows=1b1      # the rows whose name contains "1b1"
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("rollout", "render", "aesthetic", "pickscore", "experience", "update")
# name -> (model, devices, fsdp, extra flags)
ROWS = {
    "1b1": ("bloom-1b1", 1, 1, ()),
    "1b1 remat off": ("bloom-1b1", 1, 1, ("--config.model.remat=False",)),
    "1b1 remat off, grad_accum 2": ("bloom-1b1", 1, 1, ("--config.model.remat=False", "--config.ppo.grad_accum=2")),
    "1b1 rollout_batch_size 32": ("bloom-1b1", 1, 1, ("--config.ppo.rollout_batch_size=32",)),
    "1b1 x8": ("bloom-1b1", 8, 1, ()),
    "1b1 x8 fsdp 8": ("bloom-1b1", 8, 8, ()),
    "3b": ("bloom-3b", 1, 1, ()),
    "3b rollout_batch_size 32": ("bloom-3b", 1, 1, ("--config.ppo.rollout_batch_size=32",)),
    "3b x8 fsdp 8": ("bloom-3b", 8, 8, ()),
    "7b1": ("bloom-7b1", 1, 1, ()),
    "7b1 x8 fsdp 8": ("bloom-7b1", 8, 8, ()),
    "7b1 x8 fsdp 8 rollout_batch_size 32": ("bloom-7b1", 8, 8, ("--config.ppo.rollout_batch_size=32",)),
}


def report(model: str, devices: int, fsdp: int, extra) -> dict:
    cmd = [sys.executable, "-m", "diffchat_jax.memory", "--config=configs/ppo.py",
           f"--config.model.name_or_path=bigscience/{model}", f"--config.mesh.fsdp={fsdp}", "--json", *extra]
    if devices > 1:
        cmd.append(f"--devices={devices}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="", help="only the rows whose name contains this")
    args = p.parse_args()
    print("| configuration | " + " | ".join(STEPS) + " | resident | peak per device |")
    print("|---" * (len(STEPS) + 3) + "|")
    for name, (model, devices, fsdp, extra) in ROWS.items():
        if args.rows not in name:
            continue
        r = report(model, devices, fsdp, extra)
        resident = sum(r["resident_gib"].values())
        cells = [f"{r['steps'][s]['peak_gib']:.1f}" for s in STEPS]
        print(f"| {name} | " + " | ".join(cells) + f" | {resident:.1f} | **{r['peak_gib']:.1f}** |", flush=True)


if __name__ == "__main__":
    main()
