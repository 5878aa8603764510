"""The one error path of every command: bad input is one line, `error: <what>, <where>, <what to do>`, exit 2.

    from diffchat_jax import errors
    raise errors.DataError(f"{path}: row {n}: field 'edit' is empty")   # anywhere below an entry point
    errors.run_command(main_fn, *args)                                   # at the top of an entry point

`UserError` and its kinds are input the user can fix; their message already names the file, row or field. Errors of
the libraries we read input with (JSON, UTF-8, safetensors, OS) that arrive here unwrapped are printed the same way,
naming what they can. Anything else is a bug and keeps its traceback. `--verbosity=1` (absl commands) or
DIFFCHAT_TRACEBACK=1 shows the traceback under the line for every error.
"""
import json
import os
import sys
import traceback


class UserError(Exception):
    """Input the user can fix; the message names the file, row or field and, where it helps, what to do."""
    exit_code = 2
    label = "error"  # the printed line's first word


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the field (`config.train.lr ...`)."""


class DataError(UserError, ValueError):
    """A data file that cannot be read as the data it should be; the message names the file and row."""


class ModelFileError(UserError, OSError):
    """A model file or folder that cannot be loaded; the message names the file (and tensor)."""


def _library_errors() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [OSError, json.JSONDecodeError, UnicodeDecodeError]
    try:
        import safetensors
        kinds.append(safetensors.SafetensorError)
    except (ImportError, AttributeError):
        pass
    return tuple(kinds)


def describe(error: BaseException) -> str:
    """One line for a user or library error (the message; an OSError's file name when it has one)."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError) and error.filename and str(error.filename) not in str(error):
        return f"{error.filename}: {error.strerror or error}"
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def wants_traceback() -> bool:
    if os.environ.get("DIFFCHAT_TRACEBACK", "") not in ("", "0"):
        return True
    try:
        from absl import flags
        return flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1
    except Exception:  # absl not parsed (argparse commands)
        return False


def report(error: BaseException) -> int:
    """Prints `error: ...` (and the traceback when asked for) to stderr; returns the exit code."""
    if wants_traceback():
        traceback.print_exception(error)
    print(f"{getattr(error, 'label', 'error')}: {describe(error)}", file=sys.stderr)
    return getattr(error, "exit_code", 2)


def run_command(fn, *args, **kwargs):
    """Runs an entry point's body; user and known library errors become one line and their exit code."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        sys.exit(report(e))
    except _library_errors() as e:
        sys.exit(report(e))
    except KeyboardInterrupt as e:  # Ctrl-C outside a training loop (which saves a checkpoint and stops itself)
        if wants_traceback():
            traceback.print_exception(e)
        print("stopped: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
