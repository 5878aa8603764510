"""Command-line plumbing shared by `main` and `memory`: finding `--config` files from any folder, checking every
`--config.a.b=v` override against the config before absl applies it (a typo is answered with the nearest names), and
`--print_config` (every resolved field with the comment its config file gives it).

    argv = cli.prepare_argv(sys.argv)      # before app.run: raises errors.ConfigError naming the flag
    cli.print_config(config, config_file)  # field = value  # comment
"""
import difflib
import importlib.util
import io
import os
import re
import sys
import tokenize

import ml_collections

from diffchat_jax import errors
from diffchat_jax.errors import ConfigError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def packaged_configs() -> list[str]:
    """The mode configs shipped in diffchat_jax/configs (base.py is their shared defaults, not a job)."""
    return sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f[0] != "_" and f != "base.py")


def resolve_config_arg(value: str) -> str:
    """`PATH[:variant]` as given when PATH is a file; else the packaged config of that name (diffchat_jax/configs/),
    so `--config=configs/ppo.py:tiny` (or `ppo:tiny`) works from any folder."""
    path, sep, variant = value.partition(":")
    if os.path.isfile(path):
        return value
    name = os.path.splitext(os.path.basename(path))[0]
    if name in packaged_configs():
        return os.path.join(CONFIG_DIR, f"{name}.py") + sep + variant
    raise ConfigError(f"--config: {path} is not a file and not a packaged config (one of {packaged_configs()}); "
                      f"pass configs/<name>.py[:variant] or a path to your own config file")


def load_config(value: str) -> ml_collections.ConfigDict:
    """The config of a resolved `PATH[:variant]`, as ml_collections' config_flags builds it."""
    path, _, variant = value.partition(":")
    spec = importlib.util.spec_from_file_location("_diffchat_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def flat_fields(config, prefix: str = "") -> dict[str, object]:
    """{"a.b": value} for every leaf of a (nested) ConfigDict, in its order."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flat_fields(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_override(config, field: str) -> None:
    """Raises ConfigError when `field` (dotted) is not a field of config, with the nearest names."""
    node, walked = config, []
    for part in field.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            break
        node, walked = node[part], walked + [part]
    else:
        return
    names = [*flat_fields(config)] + [k for k, v in _groups(config)]
    close = difflib.get_close_matches(field, names, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(f'config.{c}' for c in close)}?" if close else ""
    raise ConfigError(f"--config.{field}: config.{field} is not a config field{hint} "
                      f"(--print_config lists every field)")


def _groups(config, prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield f"{prefix}{key}", value
            yield from _groups(value, f"{prefix}{key}.")


_OVERRIDE = re.compile(r"^--(?:no)?config\.([\w.]+)")


def prepare_argv(argv: list[str]) -> list[str]:
    """argv with `--config=` resolved (resolve_config_arg), after checking every `--config.a.b` override names a
    field of that config. Raises ConfigError (also for a missing --config, unless help is asked for)."""
    argv = list(argv)
    for k, arg in enumerate(argv[:-1]):  # `--config PATH` -> `--config=PATH`
        if arg == "--config":
            argv[k:k + 2] = [f"--config={argv[k + 1]}"]
            break
    config_index = next((k for k, a in enumerate(argv) if a.startswith("--config=")), None)
    if config_index is None:
        if not any(a in ("--help", "-h", "--helpshort", "--helpfull") for a in argv[1:]):
            raise ConfigError(f"--config is required: --config=configs/<name>.py[:variant] (packaged: "
                              f"{packaged_configs()}) or your own config file")
        return argv
    value = resolve_config_arg(argv[config_index].split("=", 1)[1])
    argv[config_index] = f"--config={value}"
    config = load_config(value)  # an unknown variant fails here, as one line
    for field in [m.group(1) for m in map(_OVERRIDE.match, argv) if m]:
        check_override(config, field)
    return argv


def run_app(main, doc: str, argv: list[str] | None = None) -> None:
    """Runs an absl entry point that takes --config: argv checked first (prepare_argv), --help printing `doc` and
    the flags, and every error of `main(argv)` through errors.run_command (one line, an exit code)."""
    from absl import app, flags  # pylint: disable=import-outside-toplevel
    argv = errors.run_command(prepare_argv, sys.argv if argv is None else argv)
    if any(a in ("--help", "-h", "--helpshort") for a in argv[1:]):
        print(doc)
        flags.FLAGS(argv[:1])
        print(flags.FLAGS.main_module_help())
        sys.exit(0)
    flags.mark_flags_as_required(["config"])
    app.run(lambda args: errors.run_command(main, args), argv=argv)


# ----- --print_config ---------------------------------------------------------------------------------------------
_ASSIGN = re.compile(r"^    c\.([\w.]+)\s*=")  # `c.a.b = ...` at get_config's own level (not a variant's block)
_DICT_OPEN = re.compile(r"^    c\.([\w.]+)\s*=\s*ml_collections\.ConfigDict\(dict\(")
_DICT_KEY = re.compile(r"^\s+(\w+)\s*=")


def field_comments(path: str) -> dict[str, str]:
    """{"a.b": comment} from a config file: the comment on an assignment's line, else the comment lines above it
    (fields of `c.x = ml_collections.ConfigDict(dict(key=..., ...))` blocks too)."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    inline = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            inline[tok.start[0]] = tok.string.lstrip("#").strip()
    comments, above, block = {}, [], None
    for number, line in enumerate(source.splitlines(), start=1):
        code = line.split("#", 1)[0] if number in inline else line
        if not code.strip():
            above = above + [inline[number]] if number in inline else []
            continue
        name = None
        if block is not None and _DICT_KEY.match(code) and not code.startswith("    c."):
            name = f"{block}.{_DICT_KEY.match(code).group(1)}"
        elif _ASSIGN.match(code):
            name = _ASSIGN.match(code).group(1)
            opened = _DICT_OPEN.match(code)
            block = opened.group(1) if opened else None
        text = inline.get(number) or " ".join(above)
        if name and text:
            comments[name] = text
        if block is not None and code.rstrip().endswith("))"):
            block = None
        above = []
    return comments


def print_config(config, config_file: str) -> None:
    """Every field of the resolved config, `name = value  # comment` (comments from base.py and the mode file), each
    group under its own comment."""
    comments = field_comments(os.path.join(CONFIG_DIR, "base.py"))
    comments.update(field_comments(config_file))
    fields = flat_fields(config)
    width = min(60, max(len(f"{k} = {v!r}") for k, v in fields.items()))
    group = None
    for name, value in fields.items():
        head = name.split(".")[0] if "." in name else None
        if head != group and head in comments:
            print(f"# {head}: {comments[head]}")
        group = head
        text = f"{name} = {value!r}"
        print(f"{text:<{width}}  # {comments[name]}" if name in comments else text)
