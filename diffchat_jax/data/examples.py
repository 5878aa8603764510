"""Loads InstructPE / InstructPix2Pix rows into validated `Example`s.

Two column formats, detected from the column names (other columns are ignored):
    InstructPE (released):  source_prompt (x_o), instruction (i), beautified_source_prompt (x),
                            beautified_target_prompt (y), and our optional target_prompt (y_o). The released
                            InstructPE has no target_prompt, so y_o is None there (CI then falls back to y).
    InstructPix2Pix:        input (x_o), edit (i), output (y_o). These raw triples have no beautified
                            versions, so x = x_o and y = y_o.

Bad rows are never dropped silently: `load_examples` either skips them and counts them per reason in a
`LoadReport`, or raises at the first one.
"""
import collections
import dataclasses
import os

import datasets
import numpy as np

# Local file suffix -> `datasets` builder name.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
MAX_REPORTED_ROWS = 5  # skipped rows listed by number in a LoadReport


@dataclasses.dataclass(frozen=True)
class Example:
    """One (x, i, y) triple; x_o / y_o are the raw prompts behind x / y where the source has them."""
    x: str
    i: str
    y: str
    x_o: str | None = None
    y_o: str | None = None


@dataclasses.dataclass(frozen=True)
class ColumnFormat:
    """Maps Example fields to column names; `derived` fields are copies of other fields."""
    name: str
    required: dict[str, str]  # Example field -> column
    optional: dict[str, str]  # Example field -> column; a missing/None value becomes None
    derived: dict[str, str]  # Example field -> Example field it copies


INSTRUCTPE = ColumnFormat(
    name="instructpe",
    required={"x_o": "source_prompt", "i": "instruction", "x": "beautified_source_prompt",
              "y": "beautified_target_prompt"},
    optional={"y_o": "target_prompt"},
    derived={},
)
IP2P = ColumnFormat(
    name="instructpix2pix",
    required={"x_o": "input", "i": "edit", "y_o": "output"},
    optional={},
    derived={"x": "x_o", "y": "y_o"},
)
FORMATS = (INSTRUCTPE, IP2P)


@dataclasses.dataclass(frozen=True)
class SkippedRow:
    row: int  # 1-based data row number: the n-th record of the file (a CSV header does not count)
    field: str  # column name
    reason: str


@dataclasses.dataclass
class LoadReport:
    """What `load_examples` read, kept and skipped. A row is counted once, under its first bad field."""
    source: str
    format: str
    n_read: int = 0
    n_kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # reason -> rows
    skipped_rows: list[SkippedRow] = dataclasses.field(default_factory=list)  # the first MAX_REPORTED_ROWS

    def summary(self) -> str:
        text = f"{self.source} ({self.format}): kept {self.n_kept}/{self.n_read} rows"
        if not self.skipped:
            return text + ", skipped 0"
        counts = ", ".join(f"{reason}={n}" for reason, n in sorted(self.skipped.items()))
        rows = ", ".join(f"row {s.row} '{s.field}' {s.reason}" for s in self.skipped_rows)
        return f"{text}, skipped {sum(self.skipped.values())} ({counts}; e.g. {rows})"


def detect_format(columns, source: str) -> ColumnFormat:
    for fmt in FORMATS:
        if set(fmt.required.values()) <= set(columns):
            return fmt
    expected = "; ".join(f"{fmt.name}: {sorted(fmt.required.values())}" for fmt in FORMATS)
    raise ValueError(f"{source}: columns {sorted(columns)} match no known format; expected {expected}")


def check_value(value, max_chars: int) -> tuple[str | None, str | None]:
    """Returns (stripped value, None) for a good value, else (None, reason)."""
    if value is None:
        return None, "missing"
    if not isinstance(value, str):
        return None, "not a string"
    value = value.strip()
    if not value:
        return None, "empty"
    if len(value) > max_chars:
        return None, f"too long (> {max_chars} chars)"
    return value, None


def load_dataset(source: str, split: str) -> datasets.Dataset:
    """A local .json/.jsonl/.csv/.parquet file, else a hub dataset id (or a local dataset folder)."""
    suffix = os.path.splitext(source)[1].lower()
    if os.path.isfile(source):
        if suffix not in BUILDERS:
            raise ValueError(f"{source}: unsupported file type {suffix!r}; expected one of {sorted(BUILDERS)}")
        # A local file is one table, which `datasets` always calls "train".
        return datasets.load_dataset(BUILDERS[suffix], data_files=source, split="train")
    # A missing file must not fall through to the hub, where it would fail with a confusing message.
    if not os.path.exists(source) and (suffix in BUILDERS or os.path.isabs(source) or source.startswith(".")):
        raise FileNotFoundError(f"{source}: no such data file")
    return datasets.load_dataset(source, split=split)


def load_examples(source: str | os.PathLike, *, split: str = "train", on_bad_row: str = "skip",
                  max_chars: int = 2000) -> tuple[list[Example], LoadReport]:
    """Loads and validates InstructPE or InstructPix2Pix rows (see the module docstring for the formats).

    Args:
        source: a local .json/.jsonl/.csv/.parquet file or, if it is not a path, a hub dataset id.
        split: the hub split; local files have one table and ignore it.
        on_bad_row: "skip" skips and counts a bad row; "error" raises ValueError at the first one. A row is
            bad when a required field is missing/None, not a string, empty after stripping whitespace, or
            longer than max_chars (an optional field may be missing/None, and is checked otherwise).
        max_chars: the longest field kept, in characters.
    Returns:
        the examples (fields stripped of surrounding whitespace, file order) and the LoadReport.
    """
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"on_bad_row must be 'skip' or 'error', got {on_bad_row!r}")
    source = os.path.expanduser(os.fspath(source))
    ds = load_dataset(source, split)
    fmt = detect_format(ds.column_names, source)
    fields = {**fmt.required, **{f: c for f, c in fmt.optional.items() if c in ds.column_names}}
    columns = ds.select_columns(list(fields.values())).to_dict()
    report = LoadReport(source=source, format=fmt.name, n_read=len(ds))
    examples = []
    for index in range(len(ds)):
        row, bad = {}, None
        for field, column in fields.items():
            value = columns[column][index]
            if value is None and field in fmt.optional:
                row[field] = None
                continue
            row[field], reason = check_value(value, max_chars)
            if reason:
                bad = SkippedRow(row=index + 1, field=column, reason=reason)
                break
        if bad is None:
            row.update({field: row[copied] for field, copied in fmt.derived.items()})
            examples.append(Example(**row))
            continue
        if on_bad_row == "error":
            raise ValueError(f"{source}: row {bad.row}: field '{bad.field}' is {bad.reason}")
        report.skipped[bad.reason] += 1
        if len(report.skipped_rows) < MAX_REPORTED_ROWS:
            report.skipped_rows.append(bad)
    report.n_kept = len(examples)
    return examples, report


def split_examples(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic random split into (train, eval), each in the input order.

    eval gets round(len * eval_fraction) examples, but at least 1 (and train at least 1) when eval_fraction > 0
    and there are at least 2 examples.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(examples)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    is_eval = np.zeros(n, bool)
    is_eval[np.random.default_rng(seed).permutation(n)[:n_eval]] = True
    return ([e for e, ev in zip(examples, is_eval) if not ev], [e for e, ev in zip(examples, is_eval) if ev])
