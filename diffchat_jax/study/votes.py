"""The human-preference study's items and votes (paper appendix A.6, Fig. 5 and 11), no web code here.

An item is (row, system A, system B) of an eval workdir, for one SD model: the row's raw image and instruction,
and the two systems' target images (image 0 of the row). Each annotator sees each item once, its two images in a
left/right order drawn from (annotator, item) alone, so a page reload shows the same order. Votes go to
<eval>/study.sqlite: one per (annotator, item); a second vote replaces the first.

    items = study_items(eval_dir, ["sft", "ppo"], model="sd15")
    db = Votes(eval_dir); db.vote("ann", items[0], left="ppo", choice="left")
"""
import dataclasses
import datetime
import hashlib
import itertools
import json
import os
import sqlite3

CHOICES = ("left", "tie", "right")
DB = "study.sqlite"
RAW = "raw"  # the eval's folder of raw images (rendered from x)


class StudyError(ValueError):
    """A bad eval folder, system, model or vote; the message names it."""


@dataclasses.dataclass(frozen=True)
class Item:
    row: int
    a: str  # the pair's systems in the order given
    b: str
    model: str
    instruction: str
    source: str  # x, the raw prompt
    raw_image: str  # paths
    images: tuple[str, str]  # a's, b's

    @property
    def key(self) -> str:
        return f"{self.model}/{self.row}/{self.a}/{self.b}"


def image_path(eval_dir: str, model: str, system: str, row: int) -> str:
    return os.path.join(eval_dir, "images", model, system, f"{row:05d}_0.png")


def read_prompts(eval_dir: str, system: str) -> dict[int, dict]:
    path = os.path.join(eval_dir, "prompts", f"{system}.jsonl")
    if not os.path.isfile(path):
        known = sorted(f[:-6] for f in os.listdir(os.path.join(eval_dir, "prompts")) if f.endswith(".jsonl")) \
            if os.path.isdir(os.path.join(eval_dir, "prompts")) else []
        raise StudyError(f"--systems: {system!r} has no prompts in {eval_dir}/prompts/ (the eval's systems: "
                         f"{known or 'none: is this an eval workdir?'})")
    with open(path, encoding="utf-8") as f:
        return {row["row"]: row for row in map(json.loads, filter(str.strip, f))}


def study_items(eval_dir: str, systems: list[str], model: str) -> list[Item]:
    """Every pair of `systems` on every row that has both images and the raw one, row by row."""
    if len(systems) < 2 or len(set(systems)) != len(systems):
        raise StudyError(f"--systems needs two or more different systems, got {systems}")
    models_dir = os.path.join(eval_dir, "images")
    if not os.path.isdir(os.path.join(models_dir, model)):
        known = sorted(os.listdir(models_dir)) if os.path.isdir(models_dir) else []
        raise StudyError(f"--model: {model!r} has no images in {eval_dir}/images/ (models: {known or 'none'})")
    prompts = {s: read_prompts(eval_dir, s) for s in systems}
    items = []
    for row in sorted(set.intersection(*(set(p) for p in prompts.values()))):
        raw = image_path(eval_dir, model, RAW, row)
        for a, b in itertools.combinations(systems, 2):
            images = (image_path(eval_dir, model, a, row), image_path(eval_dir, model, b, row))
            if os.path.isfile(raw) and all(map(os.path.isfile, images)):
                first = prompts[a][row]
                items.append(Item(row, a, b, model, first["i"], first["x"], raw, images))
    if not items:
        raise StudyError(f"no row of {eval_dir} has images of {systems} with model {model!r}: run the eval with "
                         "these systems and an image metric first")
    return items


def left_first(annotator: str, item: Item) -> bool:
    """Whether item.a is shown on the left to this annotator: a coin from (annotator, item) alone."""
    return hashlib.sha256(f"{annotator}\0{item.key}".encode()).digest()[0] % 2 == 0


class Votes:
    """The votes of one eval folder (SQLite; each call its own connection, so threads may share it)."""

    def __init__(self, eval_dir: str):
        self.path = os.path.join(eval_dir, DB)
        with self._connect() as db:
            db.execute("""CREATE TABLE IF NOT EXISTS votes (
                annotator TEXT NOT NULL, model TEXT NOT NULL, row INTEGER NOT NULL, system_a TEXT NOT NULL,
                system_b TEXT NOT NULL, left_system TEXT NOT NULL, choice TEXT NOT NULL, time TEXT NOT NULL,
                PRIMARY KEY (annotator, model, row, system_a, system_b))""")

    def _connect(self):
        return sqlite3.connect(self.path, timeout=30)

    def vote(self, annotator: str, item: Item, left: str, choice: str) -> None:
        annotator = annotator.strip()
        if not annotator:
            raise StudyError("an annotator name is needed before voting")
        if choice not in CHOICES:
            raise StudyError(f"a vote is one of {CHOICES}, got {choice!r}")
        if left not in (item.a, item.b):
            raise StudyError(f"left must be {item.a!r} or {item.b!r}, got {left!r}")
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO votes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (annotator, item.model, item.row, item.a, item.b, left, choice,
                        datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")))

    def voted(self, annotator: str) -> set[str]:
        """The keys of the items this annotator has voted on."""
        with self._connect() as db:
            rows = db.execute("SELECT model, row, system_a, system_b FROM votes WHERE annotator = ?",
                              (annotator.strip(),)).fetchall()
        return {f"{m}/{r}/{a}/{b}" for m, r, a, b in rows}

    def all(self) -> list[dict]:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM votes ORDER BY time, annotator")]


def outcome(vote: dict) -> str:
    """The vote from system_a's side: "win", "tie" or "lose"."""
    if vote["choice"] == "tie":
        return "tie"
    picked = vote["left_system"] if vote["choice"] == "left" else (
        vote["system_b"] if vote["left_system"] == vote["system_a"] else vote["system_a"])
    return "win" if picked == vote["system_a"] else "lose"
