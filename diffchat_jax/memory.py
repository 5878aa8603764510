"""What a configured job needs in memory per device, before it runs: every jitted step lowered and compiled on
abstract shapes (jax.ShapeDtypeStruct: no weights are read, nothing is downloaded), as XLA's memory analysis
says.

  python -m diffchat_jax.memory --config=configs/ppo.py [--config.x=...] [--devices=N] [--json]
  python -m diffchat_jax.memory --config=configs/ppo.py --config.model.name_or_path=bigscience/bloom-1b1
  python -m diffchat_jax.memory --config=configs/sft.py --devices=8 --config.mesh.fsdp=8

Model shapes come from each checkpoint's config.json when it is a local folder, else from a built-in table
(diffchat_jax/models/known.py: bloom-560m / 1b1 / 1b7 / 3b / 7b1, SD 1.5, CLIP ViT-L/14 and ViT-H/14).
PPO's prompts are taken at their longest, data.max_length - sampling.max_new_tokens tokens.

One line per step (rollout, render, each image scorer, experience, update for PPO; train_step for SFT):
temporaries, arguments, outputs and their peak (temp + args + out - donated buffers reused), then the trees that
stay resident through the job (params, optimizer state, the reference policy, the renderer and scorers), and
last `peak per device: X GiB` = the resident trees + the largest transient of any step (its temporaries and the
arguments and outputs it adds to the resident ones). --json prints the same as one JSON object.

Without --devices the report is for this machine's devices (a GPU compiles as it will run). --devices=N
reports for N devices of the CPU backend (XLA's CPU compiler, so temporaries may differ from a GPU's; the CPU's
Stable Diffusion attention is blocked per query chunk where GPUs use jax.nn.dot_product_attention).
"""
import os
import sys


def _devices_flag(argv: list[str]) -> int | None:
    for arg in argv:
        if arg.startswith("--devices="):
            return int(arg.split("=", 1)[1])
    return None


if __name__ == "__main__":  # the device count must be set before jax starts
    _n = _devices_flag(sys.argv)
    if _n:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={_n}").strip()
        os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402

import jax  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffchat_jax import cli, errors  # noqa: E402
from diffchat_jax.utils import aot, mesh as mesh_lib  # noqa: E402
from diffchat_jax.utils.validate import require  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with an optional variant: configs/ppo.py:tiny",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", None, "Report for this many (CPU) devices; default: this machine's.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")


def ppo_report(config, mesh) -> aot.Report:
    from diffchat_jax.rl import learner as learner_lib  # noqa: PLC0415 (imports the reward components)
    prompt_length = config.data.max_length - config.sampling.max_new_tokens
    require(prompt_length >= 1, "sampling.max_new_tokens", f"leaves no prompt tokens of data.max_length "
            f"{config.data.max_length}")
    learner = learner_lib.Learner(config, mesh, prompt_length=prompt_length, abstract=True)
    return learner.memory_report()


def sft_report(config, mesh) -> aot.Report:
    from diffchat_jax.data import tokenizer as tokenizer_lib  # noqa: PLC0415
    from diffchat_jax.sft import trainer  # noqa: PLC0415
    t = config.train
    vocab_size = config.tokenizer.train_vocab_size
    if not vocab_size and not config.model.name_or_path:
        vocab_size = len(tokenizer_lib.load_tokenizer(config.tokenizer.name_or_path))
    module, params = trainer.load_model(config, vocab_size, jax.random.PRNGKey(0), abstract=True)
    state = trainer.make_state(config, params, module, 1, mesh)
    steps = trainer.make_steps(module, t.grad_accum, t.logprob_chunk, mesh, state)
    return aot.report(trainer.device_steps(steps, state, t.batch_size, config.data.max_length, mesh),
                      {"params": state.params, "optimizer": state.opt_state})


REPORTS = {"ppo": ppo_report, "sft": sft_report}


def job_report(config, devices=None) -> aot.Report:
    """The memory report of `config`'s job on `devices` (default: all) with the config's mesh."""
    require(config.mode in REPORTS, "mode", f"{config.mode!r} has no memory report; known: {sorted(REPORTS)}")
    return REPORTS[config.mode](config, mesh_lib.from_config(config, devices))


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    devices = jax.devices()
    if _DEVICES.value is not None:
        if not 1 <= _DEVICES.value <= len(devices):
            raise errors.ConfigError(f"--devices={_DEVICES.value}: this machine has {len(devices)} device(s) "
                                     f"(more CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
        devices = devices[:_DEVICES.value]
    report = job_report(config, devices)
    if _JSON.value:
        print(json.dumps(report.to_json()))
    else:
        print(f"{config.mode} on {len(devices)} {devices[0].platform} device(s), mesh.fsdp {config.mesh.fsdp}")
        print("\n".join(report.lines()))


def run():
    cli.run_app(main, __doc__)


if __name__ == "__main__":
    run()
