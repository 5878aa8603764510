"""The evaluation command end to end on configs/eval.py:tiny (tiny random SD and scorers, the sample's held-out
rows): its files, and a SIGKILL mid-render followed by a rerun that renders only what was missing and ends with the
results of an uninterrupted run."""
import csv
import json
import re
import time

import pytest

from diffchat_jax.text import keywords
from tests import helpers

pytestmark = pytest.mark.skipif(not keywords.wordnet_available(), reason="NLTK WordNet is not installed")


def finish(proc):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


@pytest.mark.slow
def test_tiny_eval_writes_the_tables_and_resumes_after_a_kill(tiny_models, tmp_path):
    # Three of the metrics (two scorer models fewer to compile; every metric per row: test_eval_metrics.py).
    flags = ["--config.eval.metrics=aesthetic,directional_clip,ci", *(f"--config.{k}={v}" for k, v in tiny_models.items())]
    full, killed = tmp_path / "full", tmp_path / "killed"
    reference = helpers.start_main("configs/eval.py:tiny", full, *flags)
    proc = helpers.start_main("configs/eval.py:tiny", killed, *flags)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and len(list(killed.glob("images/*/*/*.png"))) < 2:
        time.sleep(0.02)
    assert proc.poll() is None, "the eval finished before it could be killed"
    proc.kill()
    proc.wait()
    before = len(list(killed.glob("images/*/*/*.png")))
    out = finish(helpers.start_main("configs/eval.py:tiny", killed, *flags))
    total = 6 * 2 * (3 + 1)  # rows x images per prompt x (systems + raw)
    rendered = int(re.search(r"rendered (\d+) image\(s\)", out).group(1))
    assert rendered == total - before and 0 < rendered < total, (before, rendered)
    full_out = finish(reference)
    assert f"rendered {total} image(s), scored 3 (system, model) pair(s)" in full_out, full_out
    for name in ("results.csv", "results.json", "scores.jsonl", "report.md"):
        assert (killed / name).read_text() == (full / name).read_text(), name

    rows = list(csv.DictReader(open(full / "results.csv", encoding="utf-8")))
    assert {r["system"] for r in rows} == {"user", "append", "reference"}
    assert {r["metric"] for r in rows} == {"aesthetic", "directional_clip", "ci"}
    assert {r["model"] for r in rows} == {"tiny", "all"}
    scores = [json.loads(l) for l in (full / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 3 * 6
    assert all(s["directional_clip"] == 0.0 for s in scores if s["system"] == "user")  # no change, no direction
    ci = {r["system"]: float(r["mean"]) for r in rows if r["metric"] == "ci" and r["model"] == "tiny"}
    assert ci["reference"] == 100.0 and ci["user"] < 100.0  # the target keeps every keyword; x lacks the edit's
    report = (full / "report.md").read_text()
    assert "| Method | Aes. Score ↑ | D-CLIP-S ↑ | CI Score ↑ | Avg. Rank ↓ |" in report and "Avg. Rank ↓" in report and "say nothing about" in report
    assert sorted(p.name for p in (full / "grids").iterdir()) == ["00000.png", "00001.png"]
    assert finish(helpers.start_main("configs/eval.py:tiny", full, *flags)).count("rendered 0 image(s), scored 0")
