"""Start-up config checks: an impossible value stops the run with one line naming the field."""
import os

import jax.numpy as jnp

from diffchat_jax.errors import ConfigError  # noqa: F401 (the checks below raise it; callers import it from here)

# Config dtype names (model.compute_dtype, model.param_dtype, render.dtype, ...) -> jax dtypes.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field} {message}")


def one_of(config_value, choices, field: str) -> None:
    require(config_value in choices, field, f"must be one of {list(choices)}, got {config_value!r}")


def looks_local(path: str) -> bool:
    """A path rather than a hub id: it starts like one (., /, ~) or lies under workdirs/."""
    return path.startswith((".", "/", "~", "workdirs"))


def check_data_source(source: str, field: str) -> None:
    """A local file must exist; anything that is not a path-like string is taken as a hub dataset id."""
    local = source.endswith(DATA_SUFFIXES) or looks_local(source)
    require(not local or os.path.isfile(os.path.expanduser(source)), field, f"file not found: {source}")


def check_model_source(path: str, field: str, hint: str) -> None:
    """A local model path (file or folder) must exist; anything that is not path-like is taken as a hub id."""
    require(not looks_local(path) or os.path.exists(os.path.expanduser(path)), field, f"not found: {path} ({hint})")


def names(value, field: str, choices=None) -> tuple[str, ...]:
    """A list-valued field as a user types it: ("NN", "JJ"), ["NN", "JJ"], "NN,JJ" and ("NN,JJ",) (what
    `--config.ci.candidate_pos=NN,JJ` gives) all read as ("NN", "JJ"). Names outside `choices` (when given) raise
    ConfigError naming the field."""
    items = (value,) if isinstance(value, str) else tuple(value)
    out = tuple(part.strip() for item in items for part in str(item).split(",") if part.strip())
    require(bool(out), field, f"is empty, got {value!r}")
    if choices is not None:
        unknown = [name for name in out if name not in choices]
        require(not unknown, field, f"has unknown name(s) {unknown}; known: {sorted(choices)}")
    return out
