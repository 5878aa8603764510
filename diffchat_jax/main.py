"""Entry point: `python -m diffchat_jax.main --config=configs/sft.py[:tiny] [--config.a.b=v] [--workdir=DIR]`.

Dispatches on `config.mode`. Rerunning the same command with the same workdir resumes from the newest checkpoint.
"""
import importlib
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from diffchat_jax.rewards.combine import NonFiniteReward
from diffchat_jax.utils.validate import ConfigError

# config.mode -> the module whose train_and_evaluate(config, workdir) runs it (imported on demand).
TRAINERS = {"sft": "diffchat_jax.sft.trainer", "ppo": "diffchat_jax.rl.trainer"}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a variant: configs/sft.py:tiny", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and exports go. Default: workdirs/<config>[-<variant>].")
flags.mark_flags_as_required(["config"])


def default_workdir(config_arg: str) -> str:
    path, _, variant = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("workdirs", f"{name}-{variant}" if variant else name)


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; keep the console readable
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    if config.distributed:
        jax.distributed.initialize()
    if config.mode not in TRAINERS:
        print(f"config error: config.mode {config.mode!r} is not one of {sorted(TRAINERS)}", file=sys.stderr)
        sys.exit(2)
    trainer = importlib.import_module(TRAINERS[config.mode])
    try:
        trainer.train_and_evaluate(config, workdir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteReward as e:
        print(f"reward error: {e}", file=sys.stderr)
        sys.exit(3)


def run():
    """Console-script entry (`diffchat-jax --config=...`)."""
    app.run(main)


if __name__ == "__main__":
    run()
