"""The systems of the evaluation: each gives a target prompt for every test row (paper Table 1's methods).

    specs = parse_systems({"user": "identity", "naive": "append", "ours": "model:workdirs/ppo"})
    targets = fixed_targets(specs["naive"], examples)       # [len(examples)] strings

Kinds (`eval.systems` values):
  identity      the input prompt x unchanged (what the user starts from)
  append        x + ", " + i, the naive hand edit
  reference     the row's y (the dataset's own target prompt)
  file:PATH     precomputed target prompts, JSONL lines {"row": <0-based test row>, "target": "..."}; every row
                once (any order), so another system's outputs are scored exactly like ours
  model:PATH    a DiffChat model (an SFT or PPO workdir, or its export): sampling/rewriter.py with eval.decoding
  openai:MODEL  an OpenAI-compatible chat endpoint (eval.llm), few-shot (diffchat_jax/llm/rewrite.py)
  ip2p:PATH     the InstructPix2Pix image editor (diffusion/ip2p.py): it edits the raw image with the instruction and
                has no target prompt, so no CI (the paper's "-"); its image-text metrics use the row's y
The first four are computed here; the job (eval/job.py) runs the others, which it caches.
"""
import dataclasses
import json
import os
from typing import Mapping, Sequence

from diffchat_jax.data.examples import Example
from diffchat_jax.errors import ConfigError, DataError
from diffchat_jax.text import integrity

FIXED = ("identity", "append", "reference")  # no argument
KINDS = (*FIXED, "file", "model", "openai", "ip2p")
ARGUMENT = {"file": "PATH", "model": "PATH", "openai": "MODEL", "ip2p": "PATH"}
NEEDS = {"PATH": "a path", "MODEL": "a model name"}


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed `eval.systems` entry: its name, kind and argument (a path or model name; empty for FIXED kinds)."""
    name: str
    kind: str
    arg: str = ""

    @property
    def edits_images(self) -> bool:
        """An image editor: no target prompt (targets are None), images edited from the raw ones."""
        return self.kind == "ip2p"


def parse_spec(name: str, text: str) -> Spec:
    kind, _, arg = str(text).partition(":")
    usage = ", ".join([*FIXED, *(f"{k}:{a}" for k, a in ARGUMENT.items())])
    if kind not in KINDS:
        raise ConfigError(f"config.eval.systems.{name}: {text!r} is not a system; use one of {usage}")
    if (kind in ARGUMENT) != bool(arg.strip()):
        raise ConfigError(f"config.eval.systems.{name}: {text!r}: " +
                          (f"{kind}: needs {NEEDS[ARGUMENT[kind]]} ({kind}:{ARGUMENT[kind]})" if kind in ARGUMENT
                           else f"{kind} takes no argument"))
    return Spec(name, kind, arg.strip())


def parse_systems(systems: Mapping[str, str]) -> dict[str, Spec]:
    """`eval.systems` (name -> spec string) -> name -> Spec, in order; ConfigError naming a bad entry."""
    if not systems:
        raise ConfigError("config.eval.systems is empty: name at least one system, e.g. {'user': 'identity'}")
    return {name: parse_spec(name, text) for name, text in systems.items()}


def fixed_targets(spec: Spec, examples: Sequence[Example]) -> list[str]:
    """The target prompt of an identity, append, reference or file: system for each example (row r =
    examples[r])."""
    if spec.kind == "identity":
        return [e.x for e in examples]
    if spec.kind == "append":
        return [f"{e.x}, {e.i}" for e in examples]
    if spec.kind == "reference":
        return [e.y for e in examples]
    if spec.kind == "file":
        return read_target_file(spec.arg, len(examples))
    raise ValueError(f"{spec.kind}: systems are run by the eval job")


def read_target_file(path: str, rows: int) -> list[str]:
    """A file: system's JSONL -> its targets for rows 0 .. rows-1; DataError naming the file, line and field."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (a file: system's target prompts, JSONL with row and target)")
    targets: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {number}: not JSON ({e.msg})") from e
            row, target = (item.get("row"), item.get("target")) if isinstance(item, dict) else (None, None)
            if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < rows:
                raise DataError(f"{path}: line {number}: field 'row' must be a test row number 0 .. {rows - 1}, "
                                f"got {row!r}")
            if not isinstance(target, str) or not target.strip():
                raise DataError(f"{path}: line {number}: field 'target' must be a non-empty string")
            if row in targets:
                raise DataError(f"{path}: line {number}: row {row} appears twice")
            targets[row] = target.strip()
    missing = [r for r in range(rows) if r not in targets]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise DataError(f"{path}: {len(missing)} of the {rows} test rows have no target (rows {shown})")
    return [targets[r] for r in range(rows)]


def ci_scores(examples: Sequence[Example], targets: Sequence[str], keyword_config) -> list[float]:
    """CI before thresholding, in the paper's units (0..100), of each target against its row's (x_o, i, y_o)."""
    return [100.0 * integrity.ci_score(*integrity.ci_reference(e), target, 0.0, keyword_config)
            for e, target in zip(examples, targets)]
