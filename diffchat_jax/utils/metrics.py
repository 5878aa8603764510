"""One metrics writer: TensorBoard event files (scalars, images), a metrics.jsonl file (easy to read back), and the
console."""
import json
import os

import tensorboardX
import tqdm


class MetricWriter:
    """Writes scalar metrics to `<logdir>/` (TensorBoard events + metrics.jsonl) and prints a console line.

    Only process 0 of a multi-host run should create one.
    """

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        self._tb = tensorboardX.SummaryWriter(logdir)
        self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a", encoding="utf-8")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        # tqdm.write keeps an active progress bar intact.
        tqdm.tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

    def write_image(self, step: int, name: str, image) -> None:
        """An image summary: image [H, W, 3] uint8 (e.g. a grid of rendered samples)."""
        self._tb.add_image(name, image, step, dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()
        self._jsonl.close()


def read_metrics(logdir: str) -> list[dict]:
    """The rows of `<logdir>/metrics.jsonl`, in order."""
    with open(os.path.join(logdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
