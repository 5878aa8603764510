"""diffchat_jax/eval/results.py against numbers worked out by hand (means, stds, the average over models, ranks
with a tie both ways, the paper's table marks, the files)."""
import csv
import json
import math

import pytest

from diffchat_jax.errors import ConfigError
from diffchat_jax.eval import results

# (system, model) -> per-row (pickscore, ci); C is an image editor with no target prompt: no CI.
SCORES = {("A", "m1"): [(1, 50), (3, 70)], ("B", "m1"): [(2, 80), (2, 100)], ("C", "m1"): [(0, None), (1, None)],
          ("A", "m2"): [(4, 100), (4, 100)], ("B", "m2"): [(1, 40), (3, 60)], ("C", "m2"): [(5, None), (7, None)]}
ROWS = [{"system": s, "model": m, "row": r, "pickscore": p, "ci": c}
        for (s, m), values in SCORES.items() for r, (p, c) in enumerate(values)]
ROWS.append({"system": "A", "model": "m1", "row": 2, "pickscore": float("nan"), "ci": None})  # left out, not 0
METRICS = ("pickscore", "ci")


def cell(summaries, system, model, metric):
    (found,) = [c for c in summaries if (c.system, c.model, c.metric) == (system, model, metric)]
    return found


def test_means_stds_and_the_average_over_models():
    s = results.summarize(ROWS, METRICS)
    a = cell(s, "A", "m1", "pickscore")
    assert (a.mean, a.n) == (2.0, 2) and a.std == pytest.approx(math.sqrt(2.0))  # sample std of 1, 3
    assert cell(s, "B", "m1", "pickscore").std == 0.0 and cell(s, "B", "m2", "ci").mean == 50.0
    assert not [c for c in s if c.system == "C" and c.metric == "ci"]  # "-" in the table, not 0
    everything = cell(s, "A", "all", "pickscore")  # the mean of the model means 2 and 4; their std (ddof 0)
    assert (everything.mean, everything.std, everything.n) == (3.0, 1.0, 2)
    assert cell(s, "C", "all", "pickscore").mean == 3.25 and cell(s, "A", "all", "ci").mean == 80.0


def test_ranks_with_a_tie_both_ways():
    assert results.ranks({"A": 2.0, "B": 2.0, "C": 0.5}, "min") == {"A": 1, "B": 1, "C": 3}
    assert results.ranks({"A": 2.0, "B": 2.0, "C": 0.5}, "average") == {"A": 1.5, "B": 1.5, "C": 3}
    with pytest.raises(ConfigError, match="config.eval.rank_ties must be one of"):
        results.ranks({"A": 1.0}, "dense")
    s = results.summarize(ROWS, METRICS)
    # m1: pickscore A=B=2 > C; CI B > A. m2: pickscore C > A > B; CI A > B. all: pickscore C > A > B; CI A > B.
    assert results.average_ranks(s, "min", METRICS) == {
        ("A", "m1"): 1.5, ("B", "m1"): 1.0, ("C", "m1"): 3.0, ("A", "m2"): 1.5, ("B", "m2"): 2.5, ("C", "m2"): 1.0,
        ("A", "all"): 1.5, ("B", "all"): 2.5, ("C", "all"): 1.0}
    average = results.average_ranks(s, "average", METRICS)
    assert (average[("A", "m1")], average[("B", "m1")], average[("C", "m1")]) == (1.75, 1.25, 3.0)


def test_table_marks_best_and_second_and_files(tmp_path):
    s = results.summarize(ROWS, METRICS)
    avg = results.average_ranks(s, "min", METRICS)
    table = results.markdown_table(s, avg, "m1", metrics=METRICS).splitlines()
    assert table[0] == "| Method | PickScore ↑ | CI Score ↑ | Avg. Rank ↓ |"
    assert table[2:] == ["| A | **2.000** | <u>60.000</u> | <u>1.500</u> |",
                         "| B | **2.000** | **90.000** | **1.000** |",
                         "| C | <u>0.500</u> | - | 3.000 |"]
    results.write_results(str(tmp_path), s, avg, "min", {"score_text": "target"})
    rows = list(csv.DictReader(open(tmp_path / "results.csv", encoding="utf-8")))
    assert rows[0].keys() == {"system", "model", "metric", "mean", "std", "n"} and len(rows) == len(s)
    assert {(r["system"], r["model"], r["metric"]): float(r["mean"]) for r in rows}[("C", "all", "pickscore")] == 3.25
    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert saved["avg_rank"]["all"] == {"A": 1.5, "B": 2.5, "C": 1.0} and saved["rank_ties"] == "min"
    assert saved["settings"] == {"score_text": "target"} and not list(tmp_path.glob("*.tmp"))
