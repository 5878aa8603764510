"""One metrics writer: TensorBoard event files (scalars, images), a metrics.jsonl file (easy to read back), and the
console."""
import json
import os
import sys

import tqdm

from diffchat_jax.utils import files


class MetricWriter:
    """Writes scalar metrics to `<logdir>/` (TensorBoard events + metrics.jsonl) and prints a console line.

    Only process 0 of a multi-host run should create one. A resumed run calls `rewind(step)` before writing: rows
    after `step` (written by the interrupted run after its last checkpoint) leave metrics.jsonl, and TensorBoard
    is told to drop its events after `step` too (purge_step), so the files read as an uninterrupted run's.
    """

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        self._purge_step = None
        self._tb_writer = None
        self._jsonl = None

    def rewind(self, step: int) -> None:
        rewind_jsonl(os.path.join(self.logdir, "metrics.jsonl"), "step", step)
        self._purge_step = step + 1

    @property
    def _tb(self):
        if self._tb_writer is None:
            self._tb_writer = import_tensorboardx().SummaryWriter(self.logdir, purge_step=self._purge_step)
        return self._tb_writer

    def write(self, step: int, scalars: dict[str, float]) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        if self._jsonl is None:
            self._jsonl = open(os.path.join(self.logdir, "metrics.jsonl"), "a", encoding="utf-8")
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        # tqdm.write keeps an active progress bar intact.
        tqdm.tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

    def write_image(self, step: int, name: str, image) -> None:
        """An image summary: image [H, W, 3] uint8 (e.g. a grid of rendered samples)."""
        self._tb.add_image(name, image, step, dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        if self._tb_writer is not None:
            self._tb_writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def import_tensorboardx():
    """tensorboardX, imported without torch: it imports torch (3 s) only to accept torch tensors, and we give it
    numpy arrays. Where torch is already imported, it is used as it is."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        import tensorboardX  # pylint: disable=import-outside-toplevel
        return tensorboardX
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        import tensorboardX  # pylint: disable=import-outside-toplevel
    finally:
        del sys.modules["torch"]
    return tensorboardX


def rewind_jsonl(path: str, key: str, step: int) -> None:
    """Drops the rows of a JSONL file whose `key` is after `step` (atomically: a kill leaves the old or new file)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip() and json.loads(line)[key] <= step]
    files.write_atomic(path, "".join(lines))


def read_metrics(logdir: str) -> list[dict]:
    """The rows of `<logdir>/metrics.jsonl`, in order."""
    with open(os.path.join(logdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
