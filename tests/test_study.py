"""The human-preference study (diffchat_jax/study/): items of an eval folder, blind left/right order, votes in
SQLite (one per annotator and item), win/tie/lose with bootstrap intervals, and the voting page in Debian's
chromium (Playwright): vote, reload, come back under the same name and resume."""
import csv
import json
import os
import socket

import numpy as np
import pytest
from PIL import Image

from diffchat_jax.study import report, votes as votes_lib
from diffchat_jax.study.votes import StudyError

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def make_eval_folder(root, systems=("sft", "ppo", "user"), rows=3, model="tiny", missing=()):
    """The files `study` reads from an eval workdir: prompts/<system>.jsonl and images/<model>/<system>/ PNGs
    (solid colours, so the test can tell which system's image the page shows)."""
    for k, system in enumerate(("raw",) + tuple(systems)):
        if system != "raw":
            (root / "prompts").mkdir(parents=True, exist_ok=True)
            (root / "prompts" / f"{system}.jsonl").write_text("".join(
                json.dumps({"row": r, "x": f"a cat {r}", "i": f"make it snow {r}", "target": f"{system} {r}"}) + "\n"
                for r in range(rows)), encoding="utf-8")
        folder = root / "images" / model / system
        folder.mkdir(parents=True, exist_ok=True)
        for r in range(rows):
            if (system, r) not in missing:
                Image.new("RGB", (16, 16), (40 * k, 200 - 40 * k, 30 * r)).save(folder / f"{r:05d}_0.png")
    return str(root)


def test_items_pairs_every_row_and_skips_missing_images(tmp_path):
    folder = make_eval_folder(tmp_path, missing={("ppo", 1)})
    items = votes_lib.study_items(folder, ["sft", "ppo", "user"], "tiny")
    keys = [item.key for item in items]
    assert keys == ["tiny/0/sft/ppo", "tiny/0/sft/user", "tiny/0/ppo/user", "tiny/1/sft/user",
                    "tiny/2/sft/ppo", "tiny/2/sft/user", "tiny/2/ppo/user"]
    assert items[0].instruction == "make it snow 0" and items[0].images[1].endswith("images/tiny/ppo/00000_0.png")
    for systems, model, message in ((["sft", "nope"], "tiny", r"'nope' has no prompts .*\['ppo', 'sft', 'user'\]"),
                                    (["sft", "ppo"], "sd15", r"'sd15' has no images .*\['tiny'\]"),
                                    (["sft"], "tiny", "two or more different systems"),
                                    (["sft", "sft"], "tiny", "two or more different systems")):
        with pytest.raises(StudyError, match=message):
            votes_lib.study_items(folder, systems, model)


def test_left_right_order_is_per_annotator_stable_and_balanced(tmp_path):
    items = votes_lib.study_items(make_eval_folder(tmp_path, rows=40), ["sft", "ppo"], "tiny")
    firsts = [votes_lib.left_first("ann", item) for item in items]
    assert firsts == [votes_lib.left_first("ann", item) for item in items]  # the same on every reload
    assert 10 <= sum(firsts) <= 30  # a coin per item, not one side always
    assert firsts != [votes_lib.left_first("bob", item) for item in items]


def test_votes_replace_and_outcomes(tmp_path):
    folder = make_eval_folder(tmp_path)
    item = votes_lib.study_items(folder, ["sft", "ppo"], "tiny")[0]
    db = votes_lib.Votes(folder)
    db.vote("ann", item, left="ppo", choice="left")  # ppo was on the left and picked: sft (a) loses
    assert votes_lib.outcome(db.all()[0]) == "lose"
    db.vote("ann", item, left="ppo", choice="right")  # a second vote replaces the first
    assert len(db.all()) == 1 and votes_lib.outcome(db.all()[0]) == "win"
    db.vote(" bob ", item, left="sft", choice="tie")
    assert votes_lib.Votes(folder).voted("bob") == {item.key} and len(db.all()) == 2  # on disk, names stripped
    for kwargs, message in ((dict(annotator=" ", left="sft", choice="left"), "annotator name"),
                            (dict(annotator="ann", left="sft", choice="best"), "one of"),
                            (dict(annotator="ann", left="user", choice="left"), "left must be")):
        with pytest.raises(StudyError, match=message):
            db.vote(item=item, **kwargs)
    cases = {("sft", "left"): "win", ("sft", "right"): "lose", ("ppo", "left"): "lose", ("ppo", "right"): "win"}
    for (left, choice), expected in cases.items():
        assert votes_lib.outcome({"system_a": "sft", "system_b": "ppo", "left_system": left,
                                  "choice": choice}) == expected


def test_rates_and_bootstrap_intervals():
    rows = [{"model": "m", "system_a": "a", "system_b": "b", "annotator": f"n{k % 3}", "left_system": "a",
             "choice": c} for k, c in enumerate(["left"] * 60 + ["tie"] * 25 + ["right"] * 15)]
    (result,) = report.pair_results(rows)
    assert (result.votes, result.annotators) == (100, 3)
    assert result.rates == {"win": 0.6, "tie": 0.25, "lose": 0.15}
    for o, p in result.rates.items():  # the bootstrap interval ~ the normal approximation's p +- 1.96 se
        low, high = result.intervals[o]
        half = 1.96 * np.sqrt(p * (1 - p) / 100)
        assert low < p < high and abs((high - low) / 2 - half) < 0.2 * half, (o, low, high, half)
    (unanimous,) = report.pair_results(rows[:10])
    assert unanimous.rates["win"] == 1 and unanimous.intervals["win"] == (1.0, 1.0)


def test_report_files(tmp_path):
    folder = make_eval_folder(tmp_path)
    with pytest.raises(StudyError, match="no votes yet"):
        report.write_report(folder)
    items = votes_lib.study_items(folder, ["sft", "ppo"], "tiny")
    db = votes_lib.Votes(folder)
    for annotator, choices in (("ann", "left left tie"), ("bob", "right tie right")):
        for item, choice in zip(items, choices.split()):
            db.vote(annotator, item, left="sft", choice=choice)
    report.write_report(folder)
    with open(tmp_path / "study.csv", encoding="utf-8") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["votes"], row["annotators"]) == ("6", "2")
    assert [float(row[o]) for o in ("win", "tie", "lose")] == pytest.approx([2 / 6, 2 / 6, 2 / 6])
    assert "| tiny | sft | ppo | 33.3% [" in (tmp_path / "study.md").read_text(encoding="utf-8")
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_voting_page_in_a_browser(tmp_path):
    from playwright.sync_api import sync_playwright
    from diffchat_jax.study import web
    assert os.path.exists(CHROMIUM), "Debian's chromium is missing: `make install` installs it (apt-get install chromium)"
    folder = make_eval_folder(tmp_path, systems=("sft", "ppo"), rows=3)
    items = votes_lib.study_items(folder, ["sft", "ppo"], "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app, url = web.serve(folder, items, port=port, block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context()
            page = context.new_page()
            page.goto(url)
            progress = lambda text: page.wait_for_function(
                "t => (document.querySelector('#progress') || {innerText: ''}).innerText.includes(t)", arg=text, timeout=60_000)
            page.locator("#annotator input, #annotator textarea").first.fill("ann")
            page.locator("#start").click()
            progress("ann: item 1 of 3")
            assert "make it snow 0" in page.locator("#instruction").inner_text()
            assert "sft" not in page.content().split("<body")[1].lower()  # blind: no system name on the page
            page.locator("#vote-left").click()
            progress("ann: item 2 of 3")
            (vote,) = votes_lib.Votes(folder).all()
            assert vote["choice"] == "left" and vote["left_system"] == ("sft" if votes_lib.left_first(
                "ann", items[0]) else "ppo")

            page.reload()  # the name is remembered in the browser: straight back to the next item
            progress("ann: item 2 of 3")
            context.close()
            page = browser.new_context().new_page()  # another browser: the same name resumes from the votes
            page.goto(url)
            progress("Type your name")
            page.locator("#annotator input, #annotator textarea").first.fill("ann")
            page.locator("#start").click()
            progress("ann: item 2 of 3")
            page.locator("#vote-tie").click()
            progress("ann: item 3 of 3")
            page.locator("#vote-right").click()
            progress("all 3 items voted")
            browser.close()
    finally:
        app.close()
    assert [v["choice"] for v in votes_lib.Votes(folder).all()] == ["left", "tie", "right"]


def test_command_line(tmp_path, capsys):
    from diffchat_jax import errors
    from diffchat_jax.study import __main__ as study_cli
    folder = make_eval_folder(tmp_path)
    for argv, message in ((["report", f"--eval={tmp_path / 'nope'}"], "is not a folder"),
                          (["serve", f"--eval={folder}", "--systems=sft,nope", "--model=tiny"], "'nope' has no prompts"),
                          (["serve", f"--eval={folder}", "--systems=sft,ppo"], "--model"),
                          (["report", f"--eval={folder}"], "no votes yet")):
        with pytest.raises(errors.ConfigError, match=message):
            study_cli.run(argv)
    item = votes_lib.study_items(folder, ["sft", "ppo"], "tiny")[0]
    votes_lib.Votes(folder).vote("ann", item, left="ppo", choice="left")
    study_cli.run(["report", f"--eval={folder}"])
    assert "| tiny | sft | ppo | 0.0% [0.0, 0.0] | 0.0% [0.0, 0.0] | 100.0% [100.0, 100.0] | 1 | 1 |" in \
        capsys.readouterr().out
