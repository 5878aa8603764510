"""Helpers for the notebooks in colabs/: run a command with its output streamed into the notebook, find the
repository, show files inline.

    from diffchat_jax import colab
    colab.sh("python -m diffchat_jax.main --config=configs/sft.py:tiny --workdir=work/sft")  # raises on failure
    colab.show_markdown("work/eval/report.md"); colab.show_image("work/eval/grids/0.png")
"""
import os
import shlex
import subprocess
import sys


class CommandFailed(RuntimeError):
    """A command of a notebook cell exited non-zero: the cell (and `pytest --nbmake`) fails with its last lines."""


def repo_root(start: str = ".") -> str:
    """The repository folder (the one with setup.py and experiments/) at or above `start`."""
    folder = os.path.abspath(start)
    while True:
        if os.path.isfile(os.path.join(folder, "setup.py")) and os.path.isdir(os.path.join(folder, "experiments")):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            raise FileNotFoundError(f"no diffchat-jax repository (setup.py + experiments/) at or above {start}")
        folder = parent


def sh(command: str, tail: int = 15, cwd: str | None = None) -> str:
    """Runs `command` ("python" is this kernel's interpreter), printing its output as it comes (progress-bar
    redraws folded into their last state); returns the output; raises CommandFailed with the last `tail` lines."""
    args = shlex.split(command)
    if args and args[0] == "python":
        args[0] = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    lines = []
    for line in proc.stdout:
        line = line.rstrip("\n").split("\r")[-1]  # tqdm redraws a line with \r: keep what it ends as
        lines.append(line)
        print(line, flush=True)
    if proc.wait() != 0:
        raise CommandFailed(f"exit code {proc.returncode}: {command}\n" + "\n".join(lines[-tail:]))
    return "\n".join(lines)


def show_markdown(path: str) -> None:
    """Renders a Markdown file (a report's tables) in the notebook; show its images with show_image."""
    from IPython.display import Markdown, display
    with open(path, encoding="utf-8") as f:
        display(Markdown(f.read()))


def show_image(path: str, width: int | None = None) -> None:
    from IPython.display import Image, display
    display(Image(filename=path, width=width))
