"""Start-up config checks: an impossible value stops the run with one line naming the field."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field (`config.train.lr ...`)."""


def require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field} {message}")


def one_of(config_value, choices, field: str) -> None:
    require(config_value in choices, field, f"must be one of {list(choices)}, got {config_value!r}")
