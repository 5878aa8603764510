"""`study report`: win / tie / lose rates of each pair with bootstrap 95% intervals -> study.md, study.csv and a
stacked bar chart like the paper's Fig. 5 (study.png), in the eval folder.

A pair's votes are resampled with replacement (BOOTSTRAP times, a fixed seed); an interval is the 2.5th and
97.5th percentiles of a rate over the resamples.
"""
import csv
import dataclasses
import io
import os

import numpy as np

from diffchat_jax.study.votes import Votes, outcome
from diffchat_jax.utils import files

BOOTSTRAP = 2000
OUTCOMES = ("win", "tie", "lose")


@dataclasses.dataclass(frozen=True)
class PairResult:
    model: str
    a: str
    b: str
    votes: int
    annotators: int
    rates: dict[str, float]  # outcome -> rate, from a's side
    intervals: dict[str, tuple[float, float]]  # outcome -> (low, high)


def bootstrap_intervals(outcomes: list[str], rounds: int = BOOTSTRAP, seed: int = 0) -> dict[str, tuple]:
    codes = np.array([OUTCOMES.index(o) for o in outcomes])
    draws = np.random.default_rng(seed).integers(0, len(codes), size=(rounds, len(codes)))
    resampled = codes[draws]  # [rounds, n]
    return {o: tuple(float(q) for q in np.percentile((resampled == k).mean(1), [2.5, 97.5]))
            for k, o in enumerate(OUTCOMES)}


def pair_results(votes: list[dict]) -> list[PairResult]:
    groups = {}
    for v in votes:
        groups.setdefault((v["model"], v["system_a"], v["system_b"]), []).append(v)
    out = []
    for (model, a, b), group in sorted(groups.items()):
        outcomes = [outcome(v) for v in group]
        rates = {o: outcomes.count(o) / len(outcomes) for o in OUTCOMES}
        out.append(PairResult(model, a, b, len(group), len({v["annotator"] for v in group}), rates,
                              bootstrap_intervals(outcomes)))
    return out


def markdown(results: list[PairResult]) -> str:
    lines = ["# Human preference study", "",
             f"Win / tie / lose of system A against system B, with bootstrap 95% intervals ({BOOTSTRAP} resamples "
             "of the votes).", "",
             "| model | A | B | win | tie | lose | votes | annotators |", "|---|---|---|---|---|---|---|---|"]
    cell = lambda r, o: f"{100 * r.rates[o]:.1f}% [{100 * r.intervals[o][0]:.1f}, {100 * r.intervals[o][1]:.1f}]"
    lines += [f"| {r.model} | {r.a} | {r.b} | {cell(r, 'win')} | {cell(r, 'tie')} | {cell(r, 'lose')} | {r.votes} "
              f"| {r.annotators} |" for r in results]
    return "\n".join(lines) + "\n"


def csv_text(results: list[PairResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", "system_a", "system_b", "votes", "annotators"]
                    + [f"{o}{s}" for o in OUTCOMES for s in ("", "_low", "_high")])
    for r in results:
        writer.writerow([r.model, r.a, r.b, r.votes, r.annotators]
                        + [f"{x:.6f}" for o in OUTCOMES for x in (r.rates[o], *r.intervals[o])])
    return buffer.getvalue()


def chart(results: list[PairResult], path: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(results) + 1.2))
    labels = [f"{r.a} vs {r.b}" + (f" ({r.model})" if len({x.model for x in results}) > 1 else "") for r in results]
    left = np.zeros(len(results))
    for o, color in zip(OUTCOMES, ("#4c9a5a", "#b8b8b8", "#c8553d")):
        widths = np.array([100 * r.rates[o] for r in results])
        ax.barh(labels, widths, left=left, color=color, label=o)
        for y, (x, w) in enumerate(zip(left, widths)):
            if w >= 6:
                ax.text(x + w / 2, y, f"{w:.0f}%", ha="center", va="center", fontsize=9)
        left += widths
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of votes (A's win, tie, A's lose)")
    ax.invert_yaxis()
    ax.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(eval_dir: str) -> list[PairResult]:
    votes = Votes(eval_dir).all()
    if not votes:
        from diffchat_jax.study.votes import StudyError  # pylint: disable=import-outside-toplevel
        raise StudyError(f"{eval_dir}/study.sqlite has no votes yet: collect some with `study serve` first")
    results = pair_results(votes)
    files.write_atomic(os.path.join(eval_dir, "study.md"), markdown(results))
    files.write_atomic(os.path.join(eval_dir, "study.csv"), csv_text(results))
    chart(results, os.path.join(eval_dir, "study.png"))
    return results
