"""The evaluation's numbers (paper section 4.1, Table 1 and appendix Table 4): per-row scores -> mean, std and n per
(system, SD model, metric), the average over models, the Avg. Rank, and the files and tables that show them.

    summaries = summarize(score_rows)                  # rows: {"system", "model", "row", <metric>: value | None}
    avg = average_ranks(summaries, ties="min")         # (system, model) -> Avg. Rank, model "all" included
    write_results(workdir, summaries, avg, ties="min") # results.csv + results.json
    print(markdown_table(summaries, avg, model="all")) # the paper's layout: best bold, second underlined

Every metric is higher-is-better (the paper's arrows). A metric a system does not have (None: e.g. CI for an
image editor with no target prompt) is left out of its mean and of the ranking, shown as "-" as in the paper.
Conventions the paper does not state (chosen here, in README "Evaluation"):
- std is the sample standard deviation over rows (ddof 1; 0 for one row);
- model "all" (Table 1) is the mean over SD models of each model's mean; its std is the std across those model
  means (ddof 0) and its n the number of models;
- ranks: 1 = best; ties share the best rank of the tie ("min": 1, 1, 3) or their mean ("average": 1.5, 1.5, 3);
  Avg. Rank is the mean of a system's ranks over the metrics it has.
"""
import csv
import dataclasses
import io
import json
import math
import os
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

from diffchat_jax.errors import ConfigError
from diffchat_jax.utils import files

# The paper's columns, in its order.
METRICS = ("pickscore", "aesthetic", "hps", "clip_score", "directional_clip", "ci")
LABELS = {"pickscore": "PickScore", "aesthetic": "Aes. Score", "hps": "HPS", "clip_score": "CLIP-S",
          "directional_clip": "D-CLIP-S", "ci": "CI Score"}
ALL_MODELS = "all"
TIES = ("min", "average")


@dataclasses.dataclass(frozen=True)
class Summary:
    """One cell of the results: a metric of a system with an SD model (or "all") over n rows (or models)."""
    system: str
    model: str
    metric: str
    mean: float
    std: float
    n: int


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def _mean_std(values: Sequence[float], ddof: int) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n <= ddof:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - ddof))


def summarize(rows: Iterable[Mapping], metrics: Sequence[str] = METRICS) -> list[Summary]:
    """Per-row scores -> a Summary per (system, model, metric) with at least one finite value, then one per
    (system, metric) for model "all" over the models that have it; in the order first seen."""
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for row in rows:
        for metric in metrics:
            value = row.get(metric)
            if _finite(value):
                values[(row["system"], row["model"], metric)].append(float(value))
    out = [Summary(s, m, k, *_mean_std(v, ddof=1), len(v)) for (s, m, k), v in values.items()]
    per_system: dict[tuple[str, str], list[float]] = defaultdict(list)
    for cell in out:
        per_system[(cell.system, cell.metric)].append(cell.mean)
    out += [Summary(s, ALL_MODELS, k, *_mean_std(v, ddof=0), len(v)) for (s, k), v in per_system.items()]
    return out


def ranks(means: Mapping[str, float], ties: str = "min") -> dict[str, float]:
    """system -> rank of its mean (higher is better; 1 = best) among `means`, ties by `ties` ("min"/"average")."""
    if ties not in TIES:
        raise ConfigError(f"config.eval.rank_ties must be one of {list(TIES)}, got {ties!r}")
    ordered = sorted(means.values(), reverse=True)
    out = {}
    for system, value in means.items():
        better = sum(v > value for v in ordered)
        equal = sum(v == value for v in ordered)
        out[system] = better + 1 if ties == "min" else better + (equal + 1) / 2
    return out


def average_ranks(summaries: Sequence[Summary], ties: str = "min",
                  metrics: Sequence[str] = METRICS) -> dict[tuple[str, str], float]:
    """(system, model) -> the mean of the system's ranks over the metrics it has, ranked among the systems of that
    model (model "all" too)."""
    table: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)  # (model, metric) -> system -> mean
    for cell in summaries:
        if cell.metric in metrics:
            table[(cell.model, cell.metric)][cell.system] = cell.mean
    per: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (model, _), means in table.items():
        for system, rank in ranks(means, ties).items():
            per[(system, model)].append(rank)
    return {key: sum(r) / len(r) for key, r in per.items()}


def write_results(workdir: str, summaries: Sequence[Summary], avg_rank: Mapping[tuple[str, str], float],
                  ties: str, settings: Mapping | None = None) -> None:
    """results.csv (system, model, metric, mean, std, n) and results.json (the same rows, the Avg. Rank per model
    and system, how ties were ranked, and `settings`), each written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["system", "model", "metric", "mean", "std", "n"])
    for c in summaries:
        writer.writerow([c.system, c.model, c.metric, repr(c.mean), repr(c.std), c.n])
    files.write_atomic(os.path.join(workdir, "results.csv"), buffer.getvalue())
    by_model: dict[str, dict[str, float]] = defaultdict(dict)
    for (system, model), rank in avg_rank.items():
        by_model[model][system] = rank
    files.write_atomic(os.path.join(workdir, "results.json"), json.dumps({
        "results": [dataclasses.asdict(c) for c in summaries], "avg_rank": by_model, "rank_ties": ties,
        "settings": dict(settings or {})}, indent=2) + "\n")


def markdown_table(summaries: Sequence[Summary], avg_rank: Mapping[tuple[str, str], float], model: str,
                   systems: Sequence[str] | None = None, metrics: Sequence[str] = METRICS, digits: int = 3) -> str:
    """The paper's table for one model ("all" = Table 1): a row per system, a column per metric and Avg. Rank; per
    column the best value bold and the second underlined (every tied value marked alike); "-" where none."""
    cells = {(c.system, c.metric): c.mean for c in summaries if c.model == model}
    systems = list(systems) if systems is not None else list(dict.fromkeys(c.system for c in summaries
                                                                         if c.model == model))
    columns = {metric: {s: cells[(s, metric)] for s in systems if (s, metric) in cells} for metric in metrics}
    columns["avg_rank"] = {s: -avg_rank[(s, model)] for s in systems if (s, model) in avg_rank}  # lower is better

    def shown(column: str, system: str) -> str:
        values = columns[column]
        if system not in values:
            return "-"
        value = values[system]
        text = f"{abs(value) if column == 'avg_rank' else value:.{digits}f}"
        distinct = sorted(set(values.values()), reverse=True)
        if value == distinct[0]:
            return f"**{text}**"
        if len(distinct) > 1 and value == distinct[1]:
            return f"<u>{text}</u>"
        return text

    head = ["Method", *(f"{LABELS.get(m, m)} ↑" for m in metrics), "Avg. Rank ↓"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for system in systems:
        lines.append("| " + " | ".join([system, *(shown(m, system) for m in metrics), shown("avg_rank", system)])
                     + " |")
    return "\n".join(lines) + "\n"
