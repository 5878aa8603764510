"""txt2img checks every argument before it loads a model: a bad one is one `error:` line and exit status 2
(issue 13)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffchat_jax import errors, txt2img
from diffchat_jax.diffusion import render

ROOT = Path(__file__).resolve().parents[1]


class ModelLoaded(Exception):
    """Raised by the stand-in for pipeline.load_pretrained: every check before it passed."""


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    def load_pretrained(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr(txt2img.pipeline, "load_pretrained", load_pretrained)
    monkeypatch.delenv("DIFFCHAT_TRACEBACK", raising=False)  # the one line, without the traceback under it


def run_error(capsys, tmp_path, *flags, prompt=True) -> str:
    """The one stderr line of `txt2img.main` with these flags (plus a model, an output folder and a prompt)."""
    argv = ["--model=no-model-is-loaded", f"--out={tmp_path / 'out'}", *(["--prompt=a fox"] if prompt else []),
            *flags]
    with pytest.raises(SystemExit) as e:
        txt2img.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.removeprefix("error: ").rstrip("\n")


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_steps_must_be_positive(capsys, tmp_path, steps):
    assert run_error(capsys, tmp_path, f"--steps={steps}") == (
        f"argument --steps: must be at least 1, got {steps}; see --help")


def test_steps_must_be_an_integer(capsys, tmp_path):
    assert run_error(capsys, tmp_path, "--steps=ten") == "argument --steps: must be an integer, got 'ten'; see --help"


@pytest.mark.parametrize("flag,value", [("height", "-16"), ("width", "-512"), ("height", "40"), ("width", "500")])
def test_image_size_must_be_a_multiple_of_16(capsys, tmp_path, flag, value):
    assert run_error(capsys, tmp_path, f"--{flag}={value}") == (
        f"argument --{flag}: must be 0 (the model's native size) or a positive multiple of 16, got {value}; "
        "see --help")


def test_batch_size_must_be_positive(capsys, tmp_path):
    assert run_error(capsys, tmp_path, "--batch_size=0") == (
        "argument --batch_size: must be at least 1, got 0; see --help")


@pytest.mark.parametrize("seeds,message", [
    ("1,two", "must be comma-separated integers, got '1,two'"),
    ("0,-1", "must be in [0, 2**32), got -1"),
    ("4294967296", "must be in [0, 2**32), got 4294967296"),
])
def test_seeds_must_be_uint32_integers(capsys, tmp_path, seeds, message):
    assert run_error(capsys, tmp_path, f"--seeds={seeds}") == f"argument --seeds: {message}; see --help"


def test_missing_flags_are_one_line(capsys, tmp_path):
    assert run_error(capsys, tmp_path, prompt=False).startswith(
        "one of the arguments --prompt --prompts is required; see --help")


def test_missing_prompts_file(capsys, tmp_path):
    path = tmp_path / "prompts.txt"
    assert run_error(capsys, tmp_path, f"--prompts={path}", prompt=False) == (
        f"--prompts {path}: no such file; check the path")


def test_non_utf8_prompts_file(capsys, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a fox\nun caf\u00e9\n".encode("latin-1"))
    assert run_error(capsys, tmp_path, f"--prompts={path}", prompt=False) == (
        f"--prompts {path}: not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8")


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_prompts_file(capsys, tmp_path, content):
    path = tmp_path / "prompts.txt"
    path.write_text(content)
    assert run_error(capsys, tmp_path, f"--prompts={path}", prompt=False) == (
        f"--prompts {path}: no prompts (the file is empty or blank); write one prompt per line")


def test_output_folder_must_be_writable(capsys, tmp_path):
    # A folder under a regular file cannot be made, even by root (for whom chmod stops no write).
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "renders"
    assert run_error(capsys, tmp_path, f"--out={out}") == (
        f"--out {out}: cannot write there (Not a directory); choose a folder you can write to")


def test_good_arguments_reach_the_model_with_the_output_folder_made(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n\na cat\n")
    out = tmp_path / "new" / "renders"
    with pytest.raises(ModelLoaded):
        txt2img.main(["--model=m", f"--prompts={prompts}", f"--out={out}", "--steps=1", "--height=0", "--width=16",
                      "--seeds=0,4294967295", "--batch_size=1"])
    assert out.is_dir() and not list(out.iterdir())  # made, and the probe file removed


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    env = dict(os.environ, DIFFCHAT_TRACEBACK="0")
    proc = subprocess.run([sys.executable, "-m", "diffchat_jax.txt2img", "--steps=0", "--model=m", "--prompt=a fox",
                           f"--out={tmp_path / 'out'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["error: argument --steps: must be at least 1, got 0; see --help"]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_render_settings_reject_impossible_values():
    # The same rules for every caller (PPO's config.render too), before a solver or model sees them.
    with pytest.raises(errors.ConfigError, match=re.escape("num_steps must be at least 1, got -3")):
        render.RenderSettings(num_steps=-3)
    with pytest.raises(errors.ConfigError, match=re.escape("height and width must be >= 0 (0 = native), got -16x0")):
        render.RenderSettings(height=-16)
