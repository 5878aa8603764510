"""The chat's lines: `/command args` or text (the starting prompt when there is none yet, else an instruction).
One interpreter for the terminal, scripts and the browser app's command box.

    reply = execute(chat, "/seed 3")        # Reply(text="seed: 3 (from the next turn)", turn=None)
    reply = execute(chat, "make it snow", on_text=print)
"""
import dataclasses
import shlex

from diffchat_jax.chat.engine import Chat, ChatError, Listener
from diffchat_jax.chat.session import Turn

HELP = """\
The first line is the starting prompt (or /open FILE.png); every later line is an instruction that edits the
current prompt ("make it snow"). Commands:
  /undo, /redo       step back to the previous turn of this branch / forward again
  /history           the turns of this branch (* marks the current one; + n: other branches from a turn)
  /branch N          continue from turn N (the turns after it are kept as another branch)
  /seed N            the image seed from the next turn on
  /model NAME        render with another checkpoint from the next turn on (/model alone lists them)
  /steps N           denoising steps from the next turn on
  /open FILE.png     start again from an image this tool rendered (its prompt, seed and model)
  /new PROMPT        start again from a typed prompt (the session keeps the old turns)
  /save [DIR]        save the session (a copy in DIR when given)
  /load DIR          continue a saved session
  /help, /quit"""


class Quit(Exception):
    """/quit."""


@dataclasses.dataclass(frozen=True)
class Reply:
    text: str  # what to show
    turn: Turn | None = None  # the turn to show (its prompt and image), when the line made or moved to one


def describe(chat: Chat, turn: Turn) -> str:
    lines = [f"turn {turn.id}: {turn.prompt}"]
    lines += [f"  note: {note}" for note in turn.notes]
    lines.append(f"  image: {chat.image_path(turn)} (seed {turn.seed}, model {turn.model}, {turn.steps} steps)")
    return "\n".join(lines)


def history(chat: Chat) -> str:
    if chat.session.current is None:
        return "no turns yet"
    rows = []
    for turn in chat.session.path():
        others = len([c for c in chat.session.children(turn.id) if c not in
                      {t.id for t in chat.session.path()}])
        mark = "*" if turn.id == chat.session.head else " "
        what = f"{turn.instruction!r} -> " if turn.instruction is not None else "start: "
        rows.append(f"{mark} {turn.id:>3}  {what}{turn.prompt}" + (f"  (+{others} other branch)" if others else ""))
    return "\n".join(rows)


def _int(args: list[str], command: str) -> int:
    if len(args) != 1:
        raise ChatError(f"{command} takes one number, e.g. {command} 3")
    try:
        return int(args[0])
    except ValueError:
        raise ChatError(f"{command} takes a whole number, got {args[0]!r}") from None


def execute(chat: Chat, line: str, on_text: Listener | None = None) -> Reply:
    """Runs one line. Raises ChatError for input it refuses (nothing changed) and Quit for /quit."""
    stripped = line.strip()
    if not stripped.startswith("/"):
        if chat.session.current is None:
            return Reply("", chat.start(stripped))
        return Reply("", chat.instruct(stripped, on_text))
    name, _, rest = stripped.partition(" ")
    try:
        args = shlex.split(rest)
    except ValueError:
        args = rest.split()
    if name == "/help":
        return Reply(HELP)
    if name == "/quit":
        raise Quit()
    if name == "/undo":
        return Reply("undone", chat.undo())
    if name == "/redo":
        return Reply("redone", chat.redo())
    if name == "/history":
        return Reply(history(chat))
    if name == "/branch":
        turn = chat.branch(_int(args, "/branch"))
        return Reply(f"continuing from turn {turn.id}", turn)
    if name == "/seed":
        chat.set_seed(_int(args, "/seed"))
        return Reply(f"seed: {chat.settings.seed} (from the next turn)")
    if name == "/steps":
        chat.set_steps(_int(args, "/steps"))
        return Reply(f"steps: {chat.settings.steps} (from the next turn)")
    if name == "/model":
        if not args:
            return Reply("models: " + ", ".join(f"{n}{' (current)' if n == chat.settings.model else ''}"
                                                for n in chat.models))
        chat.set_model(" ".join(args))
        return Reply(f"model: {chat.settings.model} (from the next turn)")
    if name == "/open":
        if len(args) != 1:
            raise ChatError("/open takes one PNG file, e.g. /open renders/0000_0.png")
        return Reply("opened", chat.open_image(args[0]))
    if name == "/new":
        return Reply("", chat.start(rest))
    if name == "/save":
        if len(args) > 1:
            raise ChatError("/save takes at most one folder")
        return Reply(f"saved: {chat.save(args[0] if args else None)}")
    if name == "/load":
        if len(args) != 1:
            raise ChatError("/load takes one session folder")
        turn = chat.load(args[0])
        return Reply(f"loaded {args[0]} ({len(chat.session.turns)} turns)", turn)
    raise ChatError(f"unknown command {name}; /help lists them (a line that starts with / is a command)")
