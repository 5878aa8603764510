"""The evaluation command end to end on configs/eval.py:tiny (tiny random SD and scorers, the sample's held-out
rows): its files, and a SIGKILL mid-render followed by a rerun that renders only what was missing and ends with the
results of an uninterrupted run."""
import csv
import json
import re
import time

import numpy as np
import pytest
from PIL import Image

from diffchat_jax.text import keywords
from tests import helpers

pytestmark = pytest.mark.skipif(not keywords.wordnet_available(), reason="NLTK WordNet is not installed")


def finish(proc):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


@pytest.mark.slow
def test_tiny_eval_on_two_processes_resumes_after_a_kill_and_gives_the_one_process_files(tiny_models, sft_dir,
                                                                                         tmp_path):
    """configs/eval.py:tiny with every kind of system it lists (identity, append, reference, two model: systems,
    ip2p:) on 2 processes x 1 device, SIGKILLed mid-render and rerun, gives the files of an uninterrupted
    1-process run; the rerun renders only what was missing, a third run nothing."""
    demo = tmp_path / "demo"  # the tiny demo's layout, both models the SFT one (PPO's export has the same format)
    demo.mkdir()
    for name in ("sft", "ppo"):
        (demo / name).symlink_to(sft_dir)
    # Three of the metrics (two scorer models fewer to compile; every metric per row: test_eval_metrics.py).
    flags = ["--config.eval.metrics=aesthetic,directional_clip,ci", f"--config.demo_workdir={demo}",
             *(f"--config.{k}={v}" for k, v in tiny_models.items())]
    full, killed = tmp_path / "full", tmp_path / "killed"
    reference = helpers.start_main("configs/eval.py:tiny", full, *flags)
    procs = helpers.start_processes("configs/eval.py:tiny", killed, *flags, devices=1)
    deadline = time.time() + 600
    while time.time() < deadline and procs[0].poll() is None and len(list(killed.glob("images/*/*/*.png"))) < 2:
        time.sleep(0.02)
    assert procs[0].poll() is None, "the eval finished before it could be killed"
    for proc in procs:
        proc.kill()
        proc.wait()
    before = len(list(killed.glob("images/*/*/*.png")))
    out = helpers.wait_all(helpers.start_processes("configs/eval.py:tiny", killed, *flags, devices=1))[0]
    total = 6 * 2 * (6 + 1)  # rows x images per prompt x (systems + raw)
    rendered = int(re.search(r"rendered (\d+) image\(s\)", out).group(1))
    assert rendered == total - before and 0 < rendered < total, (before, rendered)
    full_out = finish(reference)
    assert f"rendered {total} image(s), scored 6 (system, model) pair(s)" in full_out, full_out
    for name in ("results.csv", "results.json", "scores.jsonl", "report.md", "prompts/sft.jsonl"):
        assert (killed / name).read_text() == (full / name).read_text(), name
    pngs = sorted(p.relative_to(full) for p in full.glob("images/*/*/*.png"))
    assert pngs == sorted(p.relative_to(killed) for p in killed.glob("images/*/*/*.png")) and len(pngs) == total
    for png in pngs:  # one device per process and in the reference: bit for bit
        assert (np.asarray(Image.open(full / png)) == np.asarray(Image.open(killed / png))).all(), png

    rows = list(csv.DictReader(open(full / "results.csv", encoding="utf-8")))
    assert {r["system"] for r in rows} == {"user", "append", "reference", "sft", "ppo", "ip2p"}
    assert {r["metric"] for r in rows} == {"aesthetic", "directional_clip", "ci"}
    assert {r["model"] for r in rows} == {"tiny", "all"}
    assert not any(r["system"] == "ip2p" and r["metric"] == "ci" for r in rows)  # an editor has no target prompt
    scores = [json.loads(l) for l in (full / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 6 * 6
    assert all(s["directional_clip"] == 0.0 for s in scores if s["system"] == "user")  # no change, no direction
    ci = {r["system"]: float(r["mean"]) for r in rows if r["metric"] == "ci" and r["model"] == "tiny"}
    assert ci["reference"] == 100.0 and ci["user"] < 100.0  # the target keeps every keyword; x lacks the edit's
    sft = [json.loads(l)["target"] for l in (full / "prompts" / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == 6 and all(sft)  # greedy rewrites of the tiny SFT model
    report = (full / "report.md").read_text()
    assert "| Method | Aes. Score ↑ | D-CLIP-S ↑ | CI Score ↑ | Avg. Rank ↓ |" in report
    assert "| ip2p |" in report and "says nothing about prompt quality" in report
    assert sorted(p.name for p in (full / "grids").iterdir()) == ["00000.png", "00001.png"]
    assert sorted(p.name for p in (full / "charts").iterdir()) == ["aesthetic.png", "ci.png", "directional_clip.png"]
    assert "rendered 0 image(s), scored 0" in finish(helpers.start_main("configs/eval.py:tiny", full, *flags))
