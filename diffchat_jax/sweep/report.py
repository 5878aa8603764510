"""The sweep report: `python -m diffchat_jax.sweep report SPEC --root=DIR`.

    rows = collect(sweep, root)             # a RunResult per job: its state, final metrics and curves
    write_report(sweep, root)               # DIR/report.md, DIR/results.csv, DIR/curves/<group>-<metric>.png

A job's final value of a metric is the mean of the last `sweep.final_window` rows of its metrics.jsonl that have
the metric; its eval's results (results.json, model "all") join as eval_<metric> for the run's own system, and the
eval's other systems (the baselines) become rows "<system> (baseline)". Over the seeds of a run: mean and sample
standard deviation (ddof 1; 0 for one seed) of the finished seeds only; failed and unfinished ones are listed.
Curves: each seed's metric smoothed by an exponential moving average (sweep.smoothing), then the mean over seeds
with a band of ± one standard deviation, on the steps every seed logged.
"""
import csv
import dataclasses
import fnmatch
import io
import json
import math
import os

import numpy as np

from diffchat_jax.sweep.runner import job_state, read_status
from diffchat_jax.sweep.spec import Job, Sweep, jobs
from diffchat_jax.utils import files

BASELINE = " (baseline)"


@dataclasses.dataclass
class RunResult:
    job: Job
    state: str  # runner.job_state: finished / failed / unfinished / new
    error: str | None
    final: dict[str, float]  # metric -> final value (eval metrics as eval_<metric>)
    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # metric -> (steps, values)
    baselines: dict[str, dict[str, float]]  # eval system -> {eval_<metric>: mean}


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def final_values(rows: list[dict], window: int) -> dict[str, float]:
    """metric -> mean of its last `window` logged values."""
    names = dict.fromkeys(k for row in rows for k in row if k != "step")
    out = {}
    for name in names:
        values = [row[name] for row in rows if name in row and row[name] is not None]
        if values:
            out[name] = float(np.mean(values[-window:]))
    return out


def curves_of(rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    names = dict.fromkeys(k for row in rows for k in row if k != "step")
    return {name: (np.array([r["step"] for r in rows if name in r], np.int64),
                   np.array([r[name] for r in rows if name in r], np.float64)) for name in names}


def eval_results(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "eval", "results.json")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [r for r in json.load(f)["results"] if r["model"] == "all"]


def collect(sweep: Sweep, root: str) -> list[RunResult]:
    out = []
    for job in jobs(sweep):
        workdir = job.workdir(root)
        rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
        final = final_values(rows, sweep.final_window)
        baselines: dict[str, dict[str, float]] = {}
        for r in eval_results(workdir):
            if r["mean"] is None:
                continue
            if r["system"] == job.run.name:
                final[f"eval_{r['metric']}"] = float(r["mean"])
            else:
                baselines.setdefault(r["system"], {})[f"eval_{r['metric']}"] = float(r["mean"])
        out.append(RunResult(job, job_state(job, root), read_status(workdir).get("error"), final, curves_of(rows),
                             baselines))
    return out


def columns(sweep: Sweep, results: list[RunResult]) -> list[str]:
    """The metrics named by sweep.columns' patterns, in pattern order, that some finished run has."""
    have = dict.fromkeys(k for r in results if r.state == "finished" for k in list(r.final) + [
        m for b in r.baselines.values() for m in b])
    out = []
    for pattern in sweep.columns:
        out += [k for k in have if fnmatch.fnmatchcase(k, pattern) and k not in out]
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class Row:
    name: str  # a run's name, or "<system> (baseline)"
    metric: str
    mean: float
    std: float
    n: int  # seeds (or evals, for a baseline)
    seeds: tuple[int, ...]


def table_rows(sweep: Sweep, results: list[RunResult], metrics: list[str]) -> list[Row]:
    rows = []
    for run in sweep.runs:
        finished = [r for r in results if r.job.run.name == run.name and r.state == "finished"]
        for metric in metrics:
            have = [r for r in finished if metric in r.final]
            if have:
                rows.append(Row(run.name, metric, *mean_std([r.final[metric] for r in have]), len(have),
                                tuple(r.job.seed for r in have)))
    systems = dict.fromkeys(s for r in results if r.state == "finished" for s in r.baselines)
    for system in systems:
        for metric in metrics:
            have = [r for r in results if r.state == "finished" and metric in r.baselines.get(system, {})]
            if have:
                rows.append(Row(system + BASELINE, metric, *mean_std([r.baselines[system][metric] for r in have]),
                                len(have), tuple(r.job.seed for r in have)))
    return rows


def format_cell(row: Row | None, digits: int = 3) -> str:
    if row is None:
        return "-"
    std = 0.0 if row.std <= 1e-9 * abs(row.mean) else row.std  # equal values summed in another order
    return f"{row.mean:.{digits}g} ± {std:.2g} (n={row.n})" if row.n > 1 else f"{row.mean:.{digits}g}"


def markdown_table(rows: list[Row], names: list[str], metrics: list[str]) -> str:
    cells = {(r.name, r.metric): r for r in rows}
    lines = ["| run | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name in names:
        if any((name, m) in cells for m in metrics):
            lines.append(f"| {name} | " + " | ".join(format_cell(cells.get((name, m))) for m in metrics) + " |")
    return "\n".join(lines)


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's exponential moving average, debiased so that the first point is the first value."""
    out, last, norm = np.empty_like(values), 0.0, 0.0
    for k, v in enumerate(values):
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[k] = last / norm
    return out


def seed_band(curves: list[tuple[np.ndarray, np.ndarray]], weight: float):
    """(steps, mean, std) over seeds of the smoothed curves, on the steps all of them logged."""
    common = curves[0][0]
    for steps, _ in curves[1:]:
        common = np.intersect1d(common, steps)
    stacked = np.stack([smooth(v, weight)[np.isin(s, common)] for s, v in curves])
    std = stacked.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(common))
    return common, stacked.mean(0), std


def write_curves(folder: str, sweep: Sweep, results: list[RunResult]) -> list[str]:
    """curves/<group>-<metric>.png: a line (mean over finished seeds) and a ± std band per run of the group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = dict(sweep.groups) or {"all": tuple(r.name for r in sweep.runs)}
    os.makedirs(folder, exist_ok=True)
    paths = []
    for group, names in groups.items():
        for metric in sweep.curves:
            lines = []
            for name in names:
                have = [r.curves[metric] for r in results if r.job.run.name == name and r.state == "finished"
                        and metric in r.curves and len(r.curves[metric][0])]
                if have:
                    lines.append((name, len(have), *seed_band(have, sweep.smoothing)))
            if not lines:
                continue
            fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
            for name, n, steps, mean, std in lines:
                ax.plot(steps, mean, label=f"{name} (n={n})")
                ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
            ax.set_xlabel("iteration")
            ax.set_title(f"{metric} ({group}; smoothed {sweep.smoothing:g}; band ± 1 std over seeds)", fontsize=9)
            ax.legend(fontsize="small")
            fig.tight_layout()
            path = os.path.join(folder, f"{group}-{metric}.png")
            fig.savefig(f"{path}.tmp", format="png")  # atomically, as eval/charts.py
            plt.close(fig)
            os.replace(f"{path}.tmp", path)
            paths.append(path)
    return paths


def write_report(sweep: Sweep, root: str) -> str:
    """Writes root/report.md, root/results.csv and root/curves/; returns the report's path."""
    results = collect(sweep, root)
    metrics = columns(sweep, results)
    rows = table_rows(sweep, results, metrics)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "metric", "mean", "std", "n", "seeds"])
    for r in rows:
        writer.writerow([r.name, r.metric, repr(r.mean), repr(r.std), r.n, " ".join(map(str, r.seeds))])
    files.write_atomic(os.path.join(root, "results.csv"), buffer.getvalue())
    curves = write_curves(os.path.join(root, "curves"), sweep, results)

    names = [r.name for r in sweep.runs] + list(dict.fromkeys(r.name for r in rows if r.name.endswith(BASELINE)))
    lines = ["# Sweep report", "", f"Root: `{root}`. {sum(r.state == 'finished' for r in results)} of "
             f"{len(results)} runs finished. Final value = mean of the last {sweep.final_window} logged rows of a "
             f"run; over its finished seeds: mean ± sample std (n = seeds); eval_* from its eval (model \"all\").",
             "", "## All runs", "", markdown_table(rows, names, metrics)]
    for group, members in sweep.groups.items():
        lines += ["", f"## {group}", "", markdown_table(rows, list(members), metrics)]
    left_out = [r for r in results if r.state != "finished"]
    lines += ["", "## Not included", ""]
    lines += [f"- {r.job.id}: {r.state}" + (f" ({r.error})" if r.error else "") for r in left_out] or ["(none)"]
    if curves:
        lines += ["", "## Curves", ""] + [f"![{os.path.basename(p)}](curves/{os.path.basename(p)})" for p in curves]
    path = os.path.join(root, "report.md")
    files.write_atomic(path, "\n".join(lines) + "\n")
    print(f"report: {path} ({len(results) - len(left_out)} finished, {len(left_out)} left out); "
          f"results: {os.path.join(root, 'results.csv')}; curves: {len(curves)} in {os.path.join(root, 'curves')}")
    return path
