"""Bar charts of the evaluation (matplotlib, no display needed): charts/<metric>.png, a group of bars per system,
a bar per SD model, the mean with its std over rows as an error bar.

    write_charts("DIR/charts", summaries, systems=["user", "ours"], models=["sd15", "dreamlike"])
"""
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffchat_jax.eval import results  # noqa: E402


def write_charts(folder: str, summaries: Sequence[results.Summary], systems: Sequence[str], models: Sequence[str],
                 metrics: Sequence[str]) -> list[str]:
    """One PNG per metric in `folder` (written atomically); returns their paths. A system without the metric
    (an editor's CI) has no bar."""
    cells = {(c.system, c.model, c.metric): c for c in summaries}
    models = [results.ALL_MODELS if m == "-" else m for m in models]
    os.makedirs(folder, exist_ok=True)
    paths = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(systems) * max(1, len(models)) ** 0.5, 3.2), dpi=100)
        width = 0.8 / len(models)
        for k, model in enumerate(models):
            found = [cells.get((s, model, metric)) for s in systems]
            x = [i + (k - (len(models) - 1) / 2) * width for i, c in enumerate(found) if c is not None]
            means = [c.mean for c in found if c is not None]
            stds = [c.std if model != results.ALL_MODELS else 0.0 for c in found if c is not None]
            ax.bar(x, means, width * 0.95, yerr=stds, capsize=2, label=model)
        ax.set_xticks(np.arange(len(systems)), systems, rotation=20, ha="right")
        ax.set_title(results.LABELS.get(metric, metric) + " (higher is better)")
        if len(models) > 1:
            ax.legend(fontsize="small")
        fig.tight_layout()
        path = os.path.join(folder, f"{metric}.png")
        fig.savefig(f"{path}.tmp", format="png")
        plt.close(fig)
        os.replace(f"{path}.tmp", path)
        paths.append(path)
    return paths
