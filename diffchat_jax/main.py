"""Entry point: `python -m diffchat_jax.main --config=configs/sft.py[:tiny] [--config.a.b=v] [--workdir=DIR]`.

Dispatches on `config.mode`. Rerunning the same command with the same workdir resumes from the newest checkpoint
(a changed config is refused unless --allow_config_change). `--config=configs/<name>.py` finds the packaged configs
from any folder; `--print_config` prints every field with its comment and exits. Bad input ends in one line,
`error: ...`, and exit code 2 (DIFFCHAT_TRACEBACK=1 or --verbosity=1 adds the traceback); Ctrl-C saves a checkpoint
after the current step and exits (a second Ctrl-C exits at once).
"""
import importlib
import os

from absl import flags, logging
from ml_collections import config_flags

from diffchat_jax import cli, errors
from diffchat_jax.utils import distributed

# config.mode -> (module, function(config, workdir, allow_config_change=...)) that runs it (imported on demand).
TRAINERS = {"sft": ("diffchat_jax.sft.trainer", "train_and_evaluate"),
            "ppo": ("diffchat_jax.rl.trainer", "train_and_evaluate"), "eval": ("diffchat_jax.eval.job", "run")}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a variant: configs/sft.py:tiny (configs/ finds the packaged "
    "ones from any folder). Override fields with --config.a.b=value; --print_config lists them all.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and exports go. Default: workdirs/<config>[-<variant>].")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print every field of the resolved config with its comment, "
                                  "then exit.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose saved config.json differs from this config in fields "
    "that alter the run (e.g. more epochs to extend a run); the new config is saved.")


def default_workdir(config_arg: str) -> str:
    path, _, variant = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("workdirs", f"{name}-{variant}" if variant else name)


def run_job(config, workdir: str, allow_config_change: bool = False):
    if config.mode == "chat":
        raise errors.ConfigError("configs/chat.py is the chat's config: python -m diffchat_jax.chat "
                                 "--config=configs/chat.py[:tiny]")
    if config.mode not in TRAINERS:
        raise errors.ConfigError(f"config.mode {config.mode!r} is not one of {sorted(TRAINERS)}")
    distributed.initialize(config.distributed)  # before any other JAX call; one process: nothing to do
    module, function = TRAINERS[config.mode]
    return getattr(importlib.import_module(module), function)(config, workdir, allow_config_change=allow_config_change)


def main(argv):
    if len(argv) > 1:
        raise errors.ConfigError(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; keep the console readable
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    if _PRINT_CONFIG.value:
        cli.print_config(config, config_file.partition(":")[0])
        return
    workdir = _WORKDIR.value or default_workdir(config_file)
    run_job(config, workdir, _ALLOW_CONFIG_CHANGE.value)


def run(argv=None):
    """Console-script entry (`diffchat-jax --config=...`)."""
    cli.run_app(main, __doc__, argv)


if __name__ == "__main__":
    run()
