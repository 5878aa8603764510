"""The config a workdir's run was started with (`workdir/config.json`), compared on every resume: a change that
alters the run (epochs, learning rate, data, ...) is refused, naming the fields, unless it is allowed explicitly
(`--allow_config_change`, e.g. to extend a run); changes that only touch logging and checkpointing are accepted."""
import json
import os

import jax

from diffchat_jax.errors import ConfigError
from diffchat_jax.utils import files

# Fields whose change leaves the trained parameters and the logged values as they were.
HARMLESS = ("log_every", "eval_every", "sample_log_every", "samples_per_log", "checkpoint_every", "keep_checkpoints",
            "memory_limit_gib", "render.log_every", "render.log_images")
HARMLESS_PREFIXES = ("distributed.",)  # how many hosts run it: the same rows and samples (README "Many hosts")


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def as_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def has_checkpoint(workdir: str) -> bool:
    folder = os.path.join(workdir, "checkpoints")
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def check_resume(config, workdir: str, allow_change: bool) -> list[str]:
    """Raises ConfigError when `workdir` holds a checkpoint of a run whose saved config differs from `config` in a
    field outside HARMLESS (unless allow_change); returns the changed fields (empty for a fresh run)."""
    path = os.path.join(workdir, "config.json")
    if not (has_checkpoint(workdir) and os.path.exists(path)):
        return []
    with open(path, encoding="utf-8") as f:
        saved = flat(json.load(f))
    current = flat(as_json(config))
    missing = object()
    changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k, missing) != current.get(k, missing))
    altering = [k for k in changed if k not in HARMLESS and not k.startswith(HARMLESS_PREFIXES)]
    if altering and not allow_change:
        shown = "; ".join(f"config.{k}: {saved.get(k, '(absent)')!r} -> {current.get(k, '(absent)')!r}"
                          for k in altering[:5])
        more = f" (and {len(altering) - 5} more)" if len(altering) > 5 else ""
        raise ConfigError(f"{workdir} holds a run started with another config ({shown}{more}); resume it with the "
                          f"config of {path}, start afresh in another --workdir, or pass --allow_config_change to "
                          f"resume with these changes")
    return changed


def save(config, workdir: str, changed: list[str]) -> None:
    """Writes workdir/config.json (process 0; atomically) and says which fields a resume changed."""
    if changed:
        print(f"resuming with changed config fields: {', '.join(changed)}")
    if jax.process_index() != 0:
        return
    files.write_atomic(os.path.join(workdir, "config.json"), json.dumps(as_json(config), indent=2))
