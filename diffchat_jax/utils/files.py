"""Files written atomically: a kill leaves the old file or the new one, never half of one."""
import os


def write_atomic(path: str, text: str) -> None:
    """Writes `text` (UTF-8) to `path` through a temporary file beside it, made parents included."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
