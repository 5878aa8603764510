"""Loads InstructPE / InstructPix2Pix rows into validated `Example`s.

Two column formats, detected from the column names (other columns are ignored):
    InstructPE (released):  source_prompt (x_o), instruction (i), beautified_source_prompt (x),
                            beautified_target_prompt (y), and our optional target_prompt (y_o). The released
                            InstructPE has no target_prompt, so y_o is None there (CI then falls back to y).
    InstructPix2Pix:        input (x_o), edit (i), output (y_o). These raw triples have no beautified
                            versions, so x = x_o and y = y_o.

Bad rows are never dropped silently: `load_examples` either skips them and counts them per reason in a
`LoadReport`, or raises at the first one. A file that cannot be read at all is one `errors.DataError` line naming
the file and, where we can find it, the line (JSON) or byte (UTF-8) at fault.
"""
import collections
import contextlib
import dataclasses
import json
import logging
import os

import datasets
import huggingface_hub.errors
import numpy as np
import pyarrow

from diffchat_jax import errors

# Local file suffix -> `datasets` builder name.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
FILE_KINDS = "a .json/.jsonl/.csv/.parquet file"
ROW_AS_OBJECT = 'write each row as a JSON object {"column": "value", ...}'
MAX_REPORTED_ROWS = 5  # skipped rows listed by number in a LoadReport
# What `datasets` raises for a local file it cannot read (the JSON, CSV and parquet readers' own errors, wrapped).
READ_ERRORS = (datasets.exceptions.DatasetsError, pyarrow.ArrowException, ValueError, StopIteration)
# What it raises for a name that is no local dataset folder and cannot be had from the hub.
HUB_ERRORS = (FileNotFoundError, ConnectionError, huggingface_hub.errors.HFValidationError,
              huggingface_hub.errors.HfHubHTTPError)


class DataFileNotFoundError(errors.DataError, FileNotFoundError):
    """A data path that does not exist: one error line, and still a FileNotFoundError for callers that catch it."""


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
        # The counts carry each reason in full; the examples only its head ("missing", "too long").
        rows = ", ".join(f"row {s.row} '{s.field}' {s.reason.split(' (')[0]}" for s in self.skipped_rows)
        return f"{text}, skipped {sum(self.skipped.values())} ({counts}; e.g. {rows})"


def matches(fmt: ColumnFormat, columns) -> bool:
    return set(fmt.required.values()) <= set(columns)


def detect_format(columns, source: str) -> ColumnFormat:
    for fmt in FORMATS:
        if matches(fmt, columns):
            return fmt
    expected = "; ".join(f"{fmt.name}: {sorted(fmt.required.values())}" for fmt in FORMATS)
    raise errors.DataError(f"{source}: columns {sorted(columns)} match no known format; expected {expected}; "
                           "rename the columns to one of these layouts")


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


# --------------------------------------------------------------------------------------------------------------
# Reading a file or hub dataset, with one line for each way it can fail.
# --------------------------------------------------------------------------------------------------------------
def json_kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def json_structure_problem(document) -> str | None:
    """Why a parsed .json document is not rows of {column: value} objects, or None."""
    if isinstance(document, dict):
        return None  # {column: [values]}: `datasets` reads it as columns
    if not isinstance(document, list):
        return f"holds {json_kind(document)}, expected a list of rows; {ROW_AS_OBJECT}"
    if not document:
        return "no rows (an empty JSON list); add at least one row"
    for k, item in enumerate(document, 1):
        if not isinstance(item, dict):
            return f"item {k} of the JSON list is {json_kind(item)}, expected a row; {ROW_AS_OBJECT}"
    return None


def json_lines_problem(text: str) -> str | None:
    """The first line of JSON Lines text that is not a JSON object, or None."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {n} is not valid JSON ({e.msg}: column {e.colno}); fix or remove that line"
        if not isinstance(record, dict):
            return f"line {n} is {json_kind(record)}, expected a row; {ROW_AS_OBJECT}, one per line"
    return None


def json_problem(text: str, suffix: str) -> str | None:
    """Why JSON / JSON Lines text is not rows, found with the json module (pyarrow's errors name no line)."""
    if suffix == ".json":
        try:
            return json_structure_problem(json.loads(text))
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" after the first value: JSON Lines, which `datasets` reads too
                return f"not valid JSON ({e.msg}: line {e.lineno}, column {e.colno}); fix the file"
    return json_lines_problem(text)


def scan_problem(path: str, suffix: str) -> str | None:
    """One pass over a text data file for what its reader would choke on: bytes that are not UTF-8 (pyarrow reads
    them into the table and fails later, naming no line) and JSON whose first value is no object or list (pyarrow
    crashes on a leading `null`)."""
    first_value_seen = suffix not in (".json", ".jsonl")
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8").lstrip("\ufeff \t\r\n")
            except UnicodeDecodeError as e:
                return f"not UTF-8 text (byte 0x{line[e.start]:02x} on line {n}); save it as UTF-8"
            if text and not first_value_seen:
                first_value_seen = True
                if text[0] not in "{[":
                    return (f"line {n} starts with {text[0]!r}, expected a JSON object or a list of them; "
                            f"{ROW_AS_OBJECT}")
    return None


def file_problem(path: str, suffix: str) -> str | None:
    """What is wrong with a local UTF-8 data file, read by hand; None where we cannot tell (then the library's
    error is reported)."""
    if suffix == ".parquet":
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return "no rows (the file is blank); add at least one row"
    if suffix == ".csv":
        return "no rows (only a header line); add at least one row" if len(lines) == 1 else None
    return json_problem(text, suffix)


def library_reason(error: BaseException, suffix: str) -> str:
    """`datasets`' own error, without its generic wrapper ("An error occurred while generating the dataset")."""
    while isinstance(error, datasets.exceptions.DatasetsError) and (error.__cause__ or error.__context__):
        error = error.__cause__ or error.__context__
    return f"cannot be read as a {suffix} file ({errors.describe(error)}); check that it is one"


class _DropErrorRecords(logging.Filter):
    def filter(self, record):
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def quiet_local_load(builder: str):
    """A local file loads in seconds: no progress bar, and none of the builder's error records (it logs each read
    error before raising it, which we report as one line instead)."""
    logger, drop_errors = logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}"), _DropErrorRecords()
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    logger.addFilter(drop_errors)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.removeFilter(drop_errors)
        if bars_were_on:
            datasets.enable_progress_bars()


def load_local_file(path: str, suffix: str) -> datasets.Dataset:
    if suffix not in BUILDERS:
        raise errors.DataError(f"{path}: unsupported file type {suffix!r}; save it as one of "
                               f"{', '.join(BUILDERS)} (the suffix picks the reader)")
    if os.path.getsize(path) == 0:
        raise errors.DataError(f"{path}: no rows (the file is empty); add at least one row")
    problem = scan_problem(path, suffix) if suffix != ".parquet" else None
    if problem:
        raise errors.DataError(f"{path}: {problem}")
    try:
        with quiet_local_load(BUILDERS[suffix]):
            # A local file is one table, which `datasets` always calls "train".
            ds = datasets.load_dataset(BUILDERS[suffix], data_files=path, split="train")
    except READ_ERRORS as e:
        raise errors.DataError(f"{path}: {file_problem(path, suffix) or library_reason(e, suffix)}") from e
    if suffix in (".json", ".jsonl") and not any(matches(fmt, ds.column_names) for fmt in FORMATS):
        # `datasets` reads a list of lists or of numbers as one "text" column: say what the file holds instead.
        problem = file_problem(path, suffix)
        if problem:
            raise errors.DataError(f"{path}: {problem}")
    return ds


def why_not_on_hub(error: BaseException) -> str:
    if datasets.config.HF_HUB_OFFLINE:
        return "offline: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set, so the hub was not asked"
    return errors.describe(error)


def load_hub_dataset(source: str, split: str) -> datasets.Dataset:
    """A hub dataset id or a local dataset folder (data files inside, or a loading script)."""
    try:
        return datasets.load_dataset(source, split=split)
    except HUB_ERRORS as e:
        if os.path.isdir(source):
            raise errors.DataError(f"{source}: is a directory, expected {FILE_KINDS} (or a folder of such files); "
                                   "give the data file's path") from e
        raise errors.DataError(f"{source}: not a local file and not a dataset on the hub ({why_not_on_hub(e)}); "
                               f"give the path of {FILE_KINDS} or a hub dataset id") from e
    except ValueError as e:
        if not str(e).startswith("Unknown split"):
            raise
        raise errors.DataError(f"{source}: {str(e).rstrip('.')}; choose one of its splits") from e


def load_dataset(source: str, split: str) -> datasets.Dataset:
    """A local .json/.jsonl/.csv/.parquet file, else a hub dataset id (or a local dataset folder)."""
    suffix = os.path.splitext(source)[1].lower()
    if os.path.isfile(source):
        ds = load_local_file(source, suffix)
    elif os.path.isdir(source) and suffix in BUILDERS:
        raise errors.DataError(f"{source}: is a directory, expected {FILE_KINDS}; give the data file's path")
    elif not os.path.exists(source) and (suffix in BUILDERS or os.path.isabs(source) or source.startswith(".")):
        # A missing file must not fall through to the hub, where it would fail with a confusing message.
        raise DataFileNotFoundError(f"{source}: no such data file; check the path")
    else:
        ds = load_hub_dataset(source, split)
    if not len(ds):
        raise errors.DataError(f"{source}: no rows; add at least one row")
    return ds


# --------------------------------------------------------------------------------------------------------------
# Rows -> Examples.
# --------------------------------------------------------------------------------------------------------------
def other_layout_hint(columns: dict, index: int, others: list[ColumnFormat]) -> str:
    """For a row that lacks a field: whether it is a whole row of another layout (a file mixing two layouts)."""
    for other in others:
        names = list(other.required.values())
        if all(columns[name][index] is not None for name in names):
            return f" (the row has the columns of the {other.name} layout: {', '.join(names)}; a file holds one layout)"
    return ""


def check_row(columns: dict, index: int, fmt: ColumnFormat, fields: dict, others: list[ColumnFormat],
              max_chars: int) -> tuple[Example | None, SkippedRow | None]:
    """Row `index` as an Example, or the first bad field as a SkippedRow."""
    row = {}
    for field, column in fields.items():
        value = columns[column][index]
        if value is None and field in fmt.optional:
            row[field] = None
            continue
        row[field], reason = check_value(value, max_chars)
        if reason == "missing":
            reason += other_layout_hint(columns, index, others)
        if reason:
            return None, SkippedRow(row=index + 1, field=column, reason=reason)
    row.update({field: row[copied] for field, copied in fmt.derived.items()})
    return Example(**row), None


def load_examples(source: str | os.PathLike, *, split: str = "train", on_bad_row: str = "skip",
                  max_chars: int = 2000) -> tuple[list[Example], LoadReport]:
    """Loads and validates InstructPE or InstructPix2Pix rows (see the module docstring for the formats).

    Args:
        source: a local .json/.jsonl/.csv/.parquet file or, if it is not a path, a hub dataset id.
        split: the hub split; local files have one table and ignore it.
        on_bad_row: "skip" skips and counts a bad row; "error" raises errors.DataError at the first one. A row is
            bad when a required field is missing/None, not a string, empty after stripping whitespace, or
            longer than max_chars (an optional field may be missing/None, and is checked otherwise).
        max_chars: the longest field kept, in characters.
    Returns:
        the examples (fields stripped of surrounding whitespace, file order) and the LoadReport.
    Raises:
        errors.DataError (a ValueError; DataFileNotFoundError, also a FileNotFoundError, for a missing file): a
        source that cannot be read, has no rows, matches no layout, or (whatever on_bad_row) has no good row.
    """
    if on_bad_row not in ("skip", "error"):
        raise errors.ConfigError(f"data.on_bad_row must be 'skip' or 'error', got {on_bad_row!r}")
    source = os.path.expanduser(os.fspath(source))
    ds = load_dataset(source, split)
    fmt = detect_format(ds.column_names, source)
    fields = {**fmt.required, **{f: c for f, c in fmt.optional.items() if c in ds.column_names}}
    others = [other for other in FORMATS if other is not fmt and matches(other, ds.column_names)]
    wanted = set(fields.values()) | {c for other in others for c in other.required.values()}
    columns = ds.select_columns(sorted(wanted)).to_dict()
    report = LoadReport(source=source, format=fmt.name, n_read=len(ds))
    examples = []
    for index in range(len(ds)):
        example, bad = check_row(columns, index, fmt, fields, others, max_chars)
        if bad is None:
            examples.append(example)
            continue
        if on_bad_row == "error":
            raise errors.DataError(f"{source}: row {bad.row}: field '{bad.field}' is {bad.reason}; fix the row, "
                                   "or set data.on_bad_row=skip to skip bad rows")
        report.skipped[bad.reason] += 1
        if len(report.skipped_rows) < MAX_REPORTED_ROWS:
            report.skipped_rows.append(bad)
    report.n_kept = len(examples)
    if not examples:
        raise errors.DataError(f"{report.summary()}: no usable rows; fix the rows or check that this is the "
                               "right file")
    return examples, report


def split_examples(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic random split into (train, eval), each in the input order.

    eval gets round(len * eval_fraction) examples, but at least 1 (and train at least 1) when eval_fraction > 0
    and there are at least 2 examples.
    """
    if not 0 <= eval_fraction < 1:
        raise errors.ConfigError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(examples)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    is_eval = np.zeros(n, bool)
    is_eval[np.random.default_rng(seed).permutation(n)[:n_eval]] = True
    return ([e for e, ev in zip(examples, is_eval) if not ev], [e for e, ev in zip(examples, is_eval) if ev])
