"""The chat in a terminal, or a script of lines (`--script FILE`, or a pipe on stdin).

Interactive: a refused line prints `error: ...` and the chat goes on. A script: blank lines and lines starting with
'#' are skipped, and the first refused line stops it with `error: line N: ...` and exit status 2.
"""
import sys
from typing import Iterable, TextIO

from diffchat_jax.chat.commands import HELP, Quit, describe, execute
from diffchat_jax.chat.engine import Chat, ChatError
from diffchat_jax.errors import ConfigError


class StreamPrinter:
    """Prints a rewrite as it grows: `y: ` then the new text of each update."""

    def __init__(self, out: TextIO):
        self.out, self.shown = out, None

    def __call__(self, text: str) -> None:
        if self.shown is None:
            self.out.write("y: ")
            self.shown = ""
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
        else:  # a re-tokenisation changed earlier text: show the whole
            self.out.write("\ny: " + text)
        self.shown = text
        self.out.flush()

    def end(self) -> None:
        if self.shown is not None:
            self.out.write("\n")
            self.shown = None


def interactive_lines(prompt: str = "> ") -> Iterable[str]:
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return


def line_source(script: str | None, stdin) -> tuple:
    """(the lines, whether they are a script): --script FILE, --script=- or a pipe on stdin, else the terminal."""
    if script is None and not stdin.isatty():
        script = "-"
    if script is None:
        return interactive_lines(), False
    if script == "-":
        return stdin, True
    try:
        with open(script, encoding="utf-8") as f:
            return f.read().splitlines(), True
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--script: cannot read {script} ({e})") from None


def run(chat: Chat, lines: Iterable[str], script: bool, out: TextIO = sys.stdout) -> int:
    """Runs lines until they end or /quit; returns the exit status."""
    if not script:
        out.write(f"DiffChat: session folder {chat.folder}. Type a starting prompt (or /open FILE.png); /help\n")
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if script and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if script:
            out.write(f"> {line}\n")
        printer = StreamPrinter(out)
        try:
            reply = execute(chat, line, on_text=printer)
        except Quit:
            return 0
        except ChatError as e:
            printer.end()
            if script:
                out.write(f"error: line {number}: {e}\n")
                return 2
            out.write(f"error: {e}\n")
            continue
        printer.end()
        if reply.text:
            out.write(reply.text + "\n")
        if reply.turn is not None:
            out.write(describe(chat, reply.turn) + "\n")
        out.flush()
    return 0


__all__ = ["HELP", "StreamPrinter", "interactive_lines", "line_source", "run"]
