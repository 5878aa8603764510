"""Shared test helpers: config overrides, killing a run after its first checkpoint, 8-device subprocesses, folders
made once per test run."""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import filelock
import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# conftest's tiny_sft_run: 8 epochs of configs/sft.py:tiny (104 steps), checkpointed halfway.
TINY_SFT_FLAGS = ("--config.train.epochs=8", "--config.checkpoint_every=52", "--config.eval_every=50")


def override(config, **dotted):
    """Sets `config.a.b = v` for every `a.b=v` keyword (dots given as in `--config.a.b`)."""
    config.update_from_flattened_dict(dotted)
    return config


def kill_after_first_checkpoint(proc: subprocess.Popen, ckpt_dir, timeout: float = 600, delay_s: float = 0.0) -> None:
    """Waits until `ckpt_dir` holds a finished checkpoint (orbax renames it to its step number when complete),
    then `delay_s` more (a random point of the steps after it), then SIGKILLs the run, as a preemption would."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
            break
        time.sleep(0.05)
    time.sleep(delay_s)
    assert proc.poll() is None, f"the run finished before it could be killed (delay {delay_s:.2f} s)"
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


TIMING = re.compile(r"^time_|tokens_per_s$")  # metrics that measure the machine, not the run


def interrupt_once_running(proc: subprocess.Popen, workdir, after_step: int, delay_s: float,
                           timeout: float = 600) -> str:
    """Waits until `workdir/metrics.jsonl` has a row after `after_step`, then `delay_s` more, then sends SIGINT
    (Ctrl-C); returns the run's console output, asserting it stopped with its checkpoint message (exit 130)."""
    deadline = time.time() + timeout
    metrics = pathlib.Path(workdir) / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(l)["step"] > after_step for l in metrics.read_text().splitlines()
                                    if l.strip()):
            break
        time.sleep(0.05)
    time.sleep(delay_s)
    assert proc.poll() is None, f"the run finished before the Ctrl-C (delay {delay_s:.2f} s)"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 130, out
    assert out.strip().splitlines()[-1].startswith("stopped: interrupted at "), out
    return out


def assert_same_outputs(expected, actual) -> None:
    """A resumed run's workdir against an uninterrupted run's: the same checkpoints, metrics.jsonl rows (timings
    aside), samples.jsonl rows and rendered PNGs."""
    expected, actual = pathlib.Path(expected), pathlib.Path(actual)
    listing = lambda folder: sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    assert listing(actual / "checkpoints") == listing(expected / "checkpoints")
    for name in ("metrics.jsonl", "samples.jsonl"):
        rows = [[json.loads(l) for l in (root / name).read_text().splitlines() if l.strip()]
                if (root / name).exists() else None for root in (expected, actual)]
        assert (rows[0] is None) == (rows[1] is None), name
        if rows[0] is None:
            continue
        assert len(rows[1]) == len(rows[0]), (name, len(rows[0]), len(rows[1]))
        for a, b in zip(rows[0], rows[1]):
            assert a.keys() == b.keys(), (name, a, b)
            for key in a:
                if isinstance(a[key], float) and not TIMING.search(key):
                    np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=f"{name} {key} {a}")
                elif not TIMING.search(key):
                    assert b[key] == a[key], (name, key, a, b)
    assert listing(actual / "images") == listing(expected / "images")
    for folder in listing(expected / "images"):
        pngs = listing(expected / "images" / folder)
        assert listing(actual / "images" / folder) == pngs
        for png in pngs:
            a, b = (np.asarray(Image.open(root / "images" / folder / png)) for root in (expected, actual))
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, (folder, png)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(config_arg: str, workdir, *flags, processes: int = 2, devices: int = 4,
                    per_process=None) -> list[subprocess.Popen]:
    """`main` as a job of `processes` processes on localhost (jax.distributed, CPU collectives over gloo), each
    with `devices` CPU devices; per_process(i) -> extra flags of process i. processes=1: one plain process."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    port = free_port()
    procs = []
    for i in range(processes):
        job = ([f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={i}"]
               if processes > 1 else [])
        cmd = [sys.executable, "-m", "diffchat_jax.main", f"--config={config_arg}", f"--workdir={workdir}", *flags,
               *job, *(per_process(i) if per_process else [])]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 900) -> list[str]:
    """Waits for every process; returns their outputs (fails, showing them, unless all exited 0)."""
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(f"[process {i}: exit {p.returncode}]\n{o[-4000:]}"
                                                              for i, (p, o) in enumerate(zip(procs, outs)))
    return outs


def load_checkpoint(folder):
    """The `state` tree of an orbax checkpoint folder (checkpoints/N) as numpy, whatever topology saved it."""
    import jax
    import orbax.checkpoint as ocp
    checkpointer = ocp.StandardCheckpointer()
    path = pathlib.Path(folder).absolute() / "state"
    meta = checkpointer.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return jax.tree.map(np.asarray, checkpointer.restore(path, target))
