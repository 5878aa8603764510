"""Shared test helpers: config overrides, killing a run after its first checkpoint, 8-device subprocesses, folders
made once per test run."""
import os
import pathlib
import shutil
import subprocess
import sys
import time

import filelock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# conftest's tiny_sft_run: 8 epochs of configs/sft.py:tiny (104 steps), checkpointed halfway.
TINY_SFT_FLAGS = ("--config.train.epochs=8", "--config.checkpoint_every=52", "--config.eval_every=50")


def override(config, **dotted):
    """Sets `config.a.b = v` for every `a.b=v` keyword (dots given as in `--config.a.b`)."""
    config.update_from_flattened_dict(dotted)
    return config


def kill_after_first_checkpoint(proc: subprocess.Popen, ckpt_dir, timeout: float = 600) -> None:
    """Waits until `ckpt_dir` holds a finished checkpoint (orbax renames it to its step number when complete),
    then SIGKILLs the run, as a preemption would."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.kill()
    proc.wait()


def run_on_8_cpu_devices(script: str) -> str:
    """Runs `script` in a fresh interpreter with 8 host CPU devices; returns its stdout (fails on an error)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def start_main(config_arg: str, workdir, *flags) -> subprocess.Popen:
    """Starts `python -m diffchat_jax.main --config=CONFIG_ARG --workdir=WORKDIR FLAGS...` (not waited for)."""
    cmd = [sys.executable, "-m", "diffchat_jax.main", f"--config={config_arg}", f"--workdir={workdir}", *flags]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def once_per_run(tmp_path_factory, name: str, make) -> pathlib.Path:
    """The folder `name`, filled by `make(folder)` once per test run: the first xdist worker to ask makes it under
    a file lock, the others wait and reuse it (xdist's own --dist loadgroup ignores its marks under pytest 9)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' basetemps are siblings
    folder = root / name
    with filelock.FileLock(str(folder) + ".lock"):
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".complete").touch()
    return folder
