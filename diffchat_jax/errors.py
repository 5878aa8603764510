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
    # True for errors that every process of a multi-host job raises at the same point (a coordinated stop): they
    # exit normally; any other error ends the other processes too (utils/distributed.py).
    on_every_process = False


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
    """Runs an entry point's body; user and known library errors become one line and their exit code. In a job of
    several processes (utils/distributed.py) every error also ends the other processes, with this line."""
    try:
        return fn(*args, **kwargs)
    except (UserError, *_library_errors()) as e:
        code = report(e)
        if getattr(e, "on_every_process", False):
            sys.exit(code)
        _exit(code, f"{getattr(e, 'label', 'error')}: {describe(e)}")
    except KeyboardInterrupt as e:  # Ctrl-C outside a training loop (which saves a checkpoint and stops itself)
        if wants_traceback():
            traceback.print_exception(e)
        print("stopped: interrupted (Ctrl-C)", file=sys.stderr)
        _exit(130, "stopped: interrupted (Ctrl-C)")
    except Exception as e:
        from diffchat_jax.utils import distributed
        if not distributed.active():
            raise
        import jax
        if isinstance(e, jax.errors.JaxRuntimeError):  # a collective with a process that is gone
            line = (f"error: a collective across the job's processes failed; another process has probably "
                    f"stopped or been killed (see its log): {describe(e)}")
            print(line, file=sys.stderr)
            _exit(2, line)
        traceback.print_exception(e)
        _exit(1, f"{describe(e)} (traceback above)")


def _exit(code: int, line: str):
    from diffchat_jax.utils import distributed
    if distributed.active():
        distributed.report_failure(line, code)
    sys.exit(code)
