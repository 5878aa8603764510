"""Start-up config checks: an impossible value stops the run with one line naming the field."""
import os

import jax.numpy as jnp

# Config dtype names (model.compute_dtype, model.param_dtype, render.dtype, ...) -> jax dtypes.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field (`config.train.lr ...`)."""


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
