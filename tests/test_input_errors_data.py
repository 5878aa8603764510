"""Bad data files are one errors.DataError line naming the file (and line, row or field), never a traceback from
inside `datasets` (issue 13)."""
# pylint: disable=wrong-import-position
import json
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: it reads this once

import numpy as np
import pandas as pd
import pytest

from diffchat_jax import errors
from diffchat_jax.data import examples as ex
from diffchat_jax.data import tokenize as tk

IP2P_ROW = {"input": "a dog on a sofa", "edit": "make it a cat", "output": "a cat on a sofa"}
PE_ROW = {"source_prompt": "a horse in a field", "instruction": "turn the horse into a zebra",
          "beautified_source_prompt": "a horse in a field, golden hour, 8k",
          "beautified_target_prompt": "a zebra in a field, golden hour, 8k"}


def jsonl(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def load_error(path, **kwargs) -> str:
    """The message of the errors.DataError that loading `path` raises."""
    with pytest.raises(errors.DataError) as e:
        ex.load_examples(path, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(jsonl([IP2P_ROW]) + '{"input": "a dog", "edit"\n' + jsonl([IP2P_ROW]))
    assert load_error(path) == (f"{path}: line 2 is not valid JSON (Expecting ':' delimiter: column 26); "
                                "fix or remove that line")


def test_truncated_json_document_names_line_and_column(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([IP2P_ROW, IP2P_ROW], indent=1)[:-20])
    assert re.fullmatch(re.escape(f"{path}: not valid JSON (") + r".*: line \d+, column \d+\); fix the file",
                        load_error(path))


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv"])
def test_empty_file_has_no_rows(tmp_path, name):
    path = tmp_path / name
    path.write_text("")
    assert load_error(path) == f"{path}: no rows (the file is empty); add at least one row"


def test_csv_with_only_a_header_has_no_rows(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("input,edit,output\n")
    assert load_error(path) == f"{path}: no rows (only a header line); add at least one row"


def test_csv_with_unknown_columns_names_found_and_expected(tmp_path):
    path = tmp_path / "other.csv"
    pd.DataFrame([{"prompt": "a dog", "caption": "a cat"}]).to_csv(path, index=False)
    message = load_error(path)
    assert message.startswith(f"{path}: columns ['caption', 'prompt'] match no known format; expected instructpe: [")
    assert "instructpix2pix: ['edit', 'input', 'output']" in message
    assert message.endswith("rename the columns to one of these layouts")


def test_unsupported_suffix_names_the_supported_ones(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text(jsonl([IP2P_ROW]))
    assert load_error(path) == (f"{path}: unsupported file type '.txt'; save it as one of .json, .jsonl, .csv, "
                                ".parquet (the suffix picks the reader)")


def test_unknown_name_is_neither_a_file_nor_a_hub_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file or folder of that name here
    assert load_error("nosuchdataset") == (
        "nosuchdataset: not a local file and not a dataset on the hub (offline: HF_HUB_OFFLINE or "
        "HF_DATASETS_OFFLINE is set, so the hub was not asked); give the path of a .json/.jsonl/.csv/.parquet "
        "file or a hub dataset id")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_file_names_file_and_line(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    text = (f"{json.dumps(IP2P_ROW)}\n{json.dumps(dict(IP2P_ROW, input='un café'), ensure_ascii=False)}\n"
            if suffix == ".jsonl" else "input,edit,output\nun café,make it a cat,a cat\n")
    path.write_bytes(text.encode("latin-1"))
    assert load_error(path) == f"{path}: not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"


@pytest.mark.parametrize("name", ["data.jsonl", "folder"])
def test_directory_is_not_a_data_file(tmp_path, name):
    path = tmp_path / name
    path.mkdir()
    (path / "notes.md").write_text("not data")
    assert load_error(path).startswith(f"{path}: is a directory, expected a .json/.jsonl/.csv/.parquet file")


def test_dataset_folder_without_the_split_names_it(tmp_path):
    (tmp_path / "train.jsonl").write_text(jsonl([IP2P_ROW]))
    assert len(ex.load_examples(tmp_path)[0]) == 1  # a folder of data files is a dataset
    assert load_error(tmp_path, split="validation") == (
        f"{tmp_path}: Unknown split \"validation\". Should be one of ['train']; choose one of its splits")


def test_missing_file_is_a_data_error_and_still_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        ex.load_examples(tmp_path / "nope.jsonl")
    assert isinstance(e.value, errors.DataError)
    assert str(e.value) == f"{tmp_path / 'nope.jsonl'}: no such data file; check the path"


def test_bad_row_with_on_bad_row_error_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DIFFCHAT_TRACEBACK", raising=False)
    path = tmp_path / "bad.jsonl"
    path.write_text(jsonl([IP2P_ROW, dict(IP2P_ROW, edit="  ")]))
    with pytest.raises(SystemExit) as e:
        errors.run_command(ex.load_examples, path, on_bad_row="error")
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: {path}: row 2: field 'edit' is empty; fix the row, or set "
                                       "data.on_bad_row=skip to skip bad rows\n")


def test_file_with_no_usable_row_raises(tmp_path):
    path = tmp_path / "numbers.jsonl"
    path.write_text(jsonl([{"input": 1, "edit": 2, "output": 3}] * 2))
    assert load_error(path) == (f"{path} (instructpix2pix): kept 0/2 rows, skipped 2 (not a string=2; e.g. row 1 "
                                "'input' not a string, row 2 'input' not a string): no usable rows; fix the rows "
                                "or check that this is the right file")


MIXED_HINT = ("missing (the row has the columns of the instructpix2pix layout: input, edit, output; "
              "a file holds one layout)")


def test_rows_of_the_other_layout_are_named(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(jsonl([PE_ROW, PE_ROW, IP2P_ROW, dict(IP2P_ROW, input=None)]))
    examples, report = ex.load_examples(path)
    assert (report.format, len(examples)) == ("instructpe", 2)
    # Row 4 lacks its own 'input' too, so it is a plain missing row, not a whole row of the other layout.
    assert dict(report.skipped) == {MIXED_HINT: 1, "missing": 1}
    assert report.skipped_rows == [ex.SkippedRow(row=3, field="source_prompt", reason=MIXED_HINT),
                                   ex.SkippedRow(row=4, field="source_prompt", reason="missing")]
    assert f"skipped 2 (missing=1, {MIXED_HINT}=1; e.g. row 3 'source_prompt' missing, row 4" in report.summary()
    assert load_error(path, on_bad_row="error") == (
        f"{path}: row 3: field 'source_prompt' is {MIXED_HINT}; fix the row, or set data.on_bad_row=skip to skip "
        "bad rows")


def test_bad_on_bad_row_value_is_a_config_error(tmp_path):
    with pytest.raises(errors.ConfigError, match="data.on_bad_row must be 'skip' or 'error', got 'drop'"):
        ex.load_examples(tmp_path / "x.jsonl", on_bad_row="drop")
    with pytest.raises(errors.ConfigError, match=re.escape("on_overlong (data.on_bad_row) must be 'skip' or 'error'")):
        tk.tokenize_examples([], None, 8, on_overlong="drop")


# --------------------------------------------------------------------------------------------------------------
# Fuzz-style: many broken files, each one errors.UserError naming the file, never another exception type.
# --------------------------------------------------------------------------------------------------------------
def random_bytes(seed: int, n: int = 300) -> bytes:
    return np.random.default_rng(seed).bytes(n)


GOOD_JSON = json.dumps([IP2P_ROW, IP2P_ROW, IP2P_ROW])
GOOD_JSONL = jsonl([IP2P_ROW, IP2P_ROW])
BROKEN_FILES = {  # file name -> its bytes (None: a directory)
    **{f"truncated_{cut}.json": GOOD_JSON[:cut].encode() for cut in (1, 2, 17, 60, len(GOOD_JSON) - 1)},
    **{f"truncated_{cut}.jsonl": GOOD_JSONL[:len(GOOD_JSONL) - cut].encode() for cut in (2, 10, 40)},
    **{f"random_{seed}{suffix}": random_bytes(seed) for seed in range(3) for suffix in ex.BUILDERS},
    "empty.json": b"", "empty.parquet": b"", "blank.jsonl": b"\n \n\t\n", "blank.csv": b"\n\n",
    "empty_list.json": b"[]", "null.json": b"null", "number.json": b"42", "string.json": b'"a dog"',
    "list_of_lists.json": json.dumps([list(IP2P_ROW.values())] * 2).encode(),
    "list_of_lists.jsonl": jsonl([list(IP2P_ROW.values())] * 2).encode(),
    "list_of_numbers.json": b"[1, 2, 3]",
    "objects_then_a_number.json": json.dumps([IP2P_ROW, 5]).encode(),
    "numbers_for_strings.jsonl": jsonl([{"input": 1, "edit": 2.5, "output": 3}]).encode(),
    "lists_for_strings.json": json.dumps([{"input": ["a"], "edit": ["b"], "output": ["c"]}]).encode(),
    "booleans_for_strings.jsonl": jsonl([{"input": True, "edit": False, "output": None}]).encode(),
    "wrong_columns.jsonl": jsonl([{"prompt": "a dog", "caption": "a cat"}]).encode(),
    "wrong_columns.csv": b"prompt,caption\na dog,a cat\n",
    "numbers_for_strings.csv": b"input,edit,output\n1,2,3\n",
    "nul_bytes.jsonl": b"\x00" * 50,
    "latin1.json": json.dumps([dict(IP2P_ROW, input="caf\u00e9")], ensure_ascii=False).encode("latin-1"),
    "not_a_file.jsonl": None,
    "not_a_file.csv": None,
}


@pytest.mark.parametrize("name", sorted(BROKEN_FILES))
def test_broken_file_is_a_user_error_naming_it(tmp_path, name):
    path = tmp_path / name
    content = BROKEN_FILES[name]
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(errors.UserError) as e:  # any other exception type fails the test
        ex.load_examples(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
