"""A chat session as data: the turns (a tree: every edit keeps its parent), the current turn, undo / redo, and the
session folder's session.json. No model here (chat/engine.py renders and rewrites).

A start turn holds a typed or opened prompt (instruction None); every other turn edits its parent's prompt with an
instruction. `head` is the turn the next instruction edits. Undo moves head to its parent (redo moves back);
`branch(n)` moves head to any turn: the next instruction starts a new branch from it, and the old one is kept.

session.json (written atomically after every change):
    {"version": 1, "head": 2, "redo": [], "turns": [{"id": 0, "parent": null, "prompt": "...", ...}, ...]}
"""
import dataclasses
import json
import os
from typing import Any

from diffchat_jax.utils import files

VERSION = 1
FILE = "session.json"


class ChatError(ValueError):
    """Input the chat refuses (nothing changes); the message says why and what to do."""


class SessionError(ChatError):
    """A bad session action or folder."""


@dataclasses.dataclass(frozen=True)
class Turn:
    """One step of the conversation. prompt: the prompt this turn renders (the rewritten prompt y, or a start's
    prompt); source: the prompt it edited (its parent's); image: the PNG's name in the session folder."""
    id: int
    parent: int | None
    prompt: str
    instruction: str | None = None
    source: str | None = None
    seed: int = 0
    model: str = ""  # the name of the SD checkpoint (chat's render.models)
    model_path: str = ""
    steps: int = 25
    render: dict = dataclasses.field(default_factory=dict)  # solver, guidance_scale, negative_prompt, height, width
    rewriter: str = ""  # the DiffChat model that wrote `prompt` (empty for a start)
    decoding: dict = dataclasses.field(default_factory=dict)
    image: str = ""
    time: str = ""  # ISO 8601, UTC
    notes: tuple[str, ...] = ()  # what the user was told about this turn (a truncated instruction, ...)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "notes": list(self.notes)}

    @classmethod
    def from_json(cls, row: dict, where: str) -> "Turn":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(row) - known)
        if unknown or "id" not in row or "prompt" not in row:
            raise SessionError(f"{where}: a turn needs id and prompt and has only the fields {sorted(known)}; "
                               f"got {sorted(row)}")
        return cls(**{**row, "notes": tuple(row.get("notes", ()))})


@dataclasses.dataclass
class Session:
    turns: list[Turn] = dataclasses.field(default_factory=list)
    head: int | None = None
    redo_stack: list[int] = dataclasses.field(default_factory=list)

    @property
    def current(self) -> Turn | None:
        return None if self.head is None else self.turns[self.head]

    def add(self, **fields) -> Turn:
        """A new turn whose parent is head (a start when `instruction` is None and there is no head); it becomes
        head, and the redo stack is cleared (as in an editor)."""
        parent = self.head if fields.get("instruction") is not None else None
        turn = Turn(id=len(self.turns), parent=parent, **fields)
        self.turns.append(turn)
        self.head, self.redo_stack = turn.id, []
        return turn

    def undo(self) -> Turn:
        turn = self.current
        if turn is None or turn.parent is None:
            raise SessionError("nothing to undo (this is the first turn of its branch)")
        self.redo_stack.append(turn.id)
        self.head = turn.parent
        return self.current

    def redo(self) -> Turn:
        if not self.redo_stack:
            raise SessionError("nothing to redo")
        self.head = self.redo_stack.pop()
        return self.current

    def branch(self, turn_id: int) -> Turn:
        if not 0 <= turn_id < len(self.turns):
            raise SessionError(f"no turn {turn_id}: turns are 0..{len(self.turns) - 1} (/history lists them)")
        self.head, self.redo_stack = turn_id, []
        return self.current

    def path(self, turn_id: int | None = None) -> list[Turn]:
        """The turns from the start of turn_id's branch (default head) to it."""
        turn_id = self.head if turn_id is None else turn_id
        out = []
        while turn_id is not None:
            out.append(self.turns[turn_id])
            turn_id = self.turns[turn_id].parent
        return out[::-1]

    def children(self, turn_id: int) -> list[int]:
        return [t.id for t in self.turns if t.parent == turn_id]

    # -----------------------------------------------------------------------------------------------------------
    # The folder.
    # -----------------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "head": self.head, "redo": list(self.redo_stack),
                "turns": [t.to_json() for t in self.turns]}

    def save(self, folder: str) -> str:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, FILE)
        files.write_atomic(path, json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, folder: str) -> "Session":
        """A session folder's session.json, checked: every turn's parent exists, every image is there."""
        path = os.path.join(folder, FILE)
        if not os.path.isfile(path):
            raise SessionError(f"{folder} is not a chat session folder: it has no {FILE}")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise SessionError(f"{path}: not readable JSON ({e})") from None
        if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("turns"), list):
            raise SessionError(f"{path}: not a version-{VERSION} session file (fields version, head, redo, turns)")
        turns = [Turn.from_json(row, f"{path} turn {n}") for n, row in enumerate(data["turns"])]
        for n, turn in enumerate(turns):
            if turn.id != n or (turn.parent is not None and not 0 <= turn.parent < n):
                raise SessionError(f"{path} turn {n}: id {turn.id} / parent {turn.parent} out of order")
            if turn.image and not os.path.isfile(os.path.join(folder, turn.image)):
                raise SessionError(f"{path} turn {n}: its image {turn.image} is missing from {folder}")
        head = data.get("head")
        if head is not None and not (isinstance(head, int) and 0 <= head < len(turns)):
            raise SessionError(f"{path}: head {head!r} is not a turn")
        return cls(turns, head, [int(t) for t in data.get("redo", [])])
