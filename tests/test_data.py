"""Tests for diffchat_jax.data: loading and validation, the template, tokenisation, batching, tokenizers."""
# pylint: disable=wrong-import-position
import dataclasses
import json
import os
import re
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: it reads this once

import numpy as np
import pandas as pd
import pytest
import transformers

from diffchat_jax.data import SAMPLE_PATH
from diffchat_jax.data import examples as ex
from diffchat_jax.data import tokenize as tk
from diffchat_jax.data import tokenizer as tz

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data"

INSTRUCTPE_ROWS = [
    {"source_prompt": "a horse in a field", "instruction": "turn the horse into a zebra",
     "target_prompt": "a zebra in a field", "beautified_source_prompt": "a horse in a field, golden hour, 8k",
     "beautified_target_prompt": "a zebra in a field, golden hour, 8k", "id": 7},
    {"source_prompt": "  a city street ", "instruction": "make it snow\n",
     "target_prompt": "a snowy city street", "beautified_source_prompt": "a city street, cinematic lighting",
     "beautified_target_prompt": "a snowy city street, cinematic lighting", "id": 8},
]
INSTRUCTPE_EXAMPLES = [
    ex.Example(x="a horse in a field, golden hour, 8k", i="turn the horse into a zebra",
               y="a zebra in a field, golden hour, 8k", x_o="a horse in a field", y_o="a zebra in a field"),
    ex.Example(x="a city street, cinematic lighting", i="make it snow", y="a snowy city street, cinematic lighting",
               x_o="a city street", y_o="a snowy city street"),
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Writes rows as .json (a list), .jsonl, .csv or .parquet, by suffix."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


# --------------------------------------------------------------------------------------------------------------
# Loading and validation.
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_instructpe_formats_load(tmp_path, suffix):
    path = write_rows(tmp_path / f"pe{suffix}", INSTRUCTPE_ROWS)
    examples, report = ex.load_examples(path)
    assert examples == INSTRUCTPE_EXAMPLES  # whitespace stripped, the unknown "id" column ignored
    assert (report.format, report.n_read, report.n_kept, dict(report.skipped)) == ("instructpe", 2, 2, {})
    assert report.summary() == f"{path} (instructpe): kept 2/2 rows, skipped 0"


def test_released_instructpe_columns_have_no_y_o(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "target_prompt"} for row in INSTRUCTPE_ROWS]
    examples, _ = ex.load_examples(write_rows(tmp_path / "released.json", rows))
    assert examples == [dataclasses.replace(e, y_o=None) for e in INSTRUCTPE_EXAMPLES]


def test_optional_target_prompt_may_be_none(tmp_path):
    rows = [dict(INSTRUCTPE_ROWS[0]), dict(INSTRUCTPE_ROWS[1], target_prompt=None)]
    examples, report = ex.load_examples(write_rows(tmp_path / "pe.jsonl", rows))
    assert report.n_kept == 2
    assert [e.y_o for e in examples] == ["a zebra in a field", None]


def test_ip2p_format_copies_raw_prompts(tmp_path):
    rows = [{"input": "a dog on a sofa", "edit": "make it a cat", "output": "a cat on a sofa"}]
    examples, report = ex.load_examples(write_rows(tmp_path / "ip2p.jsonl", rows))
    assert report.format == "instructpix2pix"
    assert examples == [ex.Example(x="a dog on a sofa", i="make it a cat", y="a cat on a sofa",
                                   x_o="a dog on a sofa", y_o="a cat on a sofa")]


def test_unknown_format_raises(tmp_path):
    path = write_rows(tmp_path / "other.jsonl", [{"prompt": "a dog", "caption": "a cat"}])
    with pytest.raises(ValueError, match=re.escape(f"{path}: columns ['caption', 'prompt'] match no known")) as e:
        ex.load_examples(path)
    assert "beautified_target_prompt" in str(e.value) and "'edit'" in str(e.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.jsonl"))):
        ex.load_examples(tmp_path / "nope.jsonl")


def test_shipped_sample_loads():
    if not os.path.exists(SAMPLE_PATH):
        pytest.skip(f"{SAMPLE_PATH} not written yet")
    examples, report = ex.load_examples(SAMPLE_PATH)
    assert report.format == "instructpe"
    assert report.n_kept == report.n_read == len(examples) and not report.skipped
    assert 200 <= len(examples) <= 300
    assert all(e.y_o is not None for e in examples)


def test_ip2p_reference_file_loads():
    path = SHARED_DATA / "ip2p-human-written.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    examples, report = ex.load_examples(path)
    assert (report.format, report.n_read, report.n_kept, len(examples)) == ("instructpix2pix", 500, 500, 500)


BAD_INSTRUCTIONS = [  # (how the row spells its instruction, the reason reported)
    ("<no key>", "missing"),
    (None, "missing"),
    ("", "empty"),
    ("  \n\t", "empty"),
    (5, "not a string"),
    ("x" * 51, "too long (> 50 chars)"),
]


def ip2p_row(edit) -> dict:
    row = {"input": "a dog", "output": "a cat"}
    if edit != "<no key>":
        row["edit"] = edit
    return row


def test_bad_rows_are_skipped_and_counted(tmp_path):
    edits = ["make it a cat"] + [edit for edit, _ in BAD_INSTRUCTIONS] + ["x" * 50]
    path = write_rows(tmp_path / "bad.jsonl", [ip2p_row(edit) for edit in edits])
    examples, report = ex.load_examples(path, max_chars=50)
    assert [e.i for e in examples] == ["make it a cat", "x" * 50]
    assert (report.n_read, report.n_kept) == (8, 2)
    assert dict(report.skipped) == {"missing": 2, "empty": 2, "not a string": 1, "too long (> 50 chars)": 1}
    # 1-based data row numbers; only the first 5 are listed.
    assert report.skipped_rows == [ex.SkippedRow(row=n, field="edit", reason=reason)
                                   for n, (_, reason) in zip(range(2, 7), BAD_INSTRUCTIONS)]
    assert "kept 2/8 rows, skipped 6 (empty=2, missing=2, not a string=1, too long (> 50 chars)=1;" in report.summary()


def test_bad_csv_cells_are_skipped(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("input,edit,output\na dog,make it a cat,a cat\na dog,,a cat\n")
    examples, report = ex.load_examples(path)
    assert len(examples) == 1
    assert report.skipped_rows == [ex.SkippedRow(row=2, field="edit", reason="missing")]


@pytest.mark.parametrize("edit,reason", BAD_INSTRUCTIONS)
def test_bad_row_raises_on_error(tmp_path, edit, reason):
    path = write_rows(tmp_path / "bad.jsonl", [ip2p_row("make it a cat"), ip2p_row(edit)])
    with pytest.raises(ValueError, match=re.escape(f"{path}: row 2: field 'edit' is {reason}")):
        ex.load_examples(path, on_bad_row="error", max_chars=50)


def test_split_examples_is_a_deterministic_partition():
    examples = [ex.Example(x=f"x{n}", i="i", y="y") for n in range(20)]
    train, held_out = ex.split_examples(examples, 0.25, seed=3)
    assert (len(train), len(held_out)) == (15, 5)
    assert sorted(train + held_out, key=examples.index) == examples
    assert (train, held_out) == ex.split_examples(examples, 0.25, seed=3)
    assert held_out != ex.split_examples(examples, 0.25, seed=4)[1]
    assert [len(part) for part in ex.split_examples(examples[:3], 0.01, seed=0)] == [2, 1]
    assert ex.split_examples(examples, 0.0, seed=0) == (examples, [])


# --------------------------------------------------------------------------------------------------------------
# Template and tokenisation.
# --------------------------------------------------------------------------------------------------------------
def test_template_is_the_papers():
    assert tk.TEMPLATE == ("Instruction: Give a description of the image and a modification to generate a drawing "
                           "prompt.\nInput: {x}\nModification: {i}\nOutput:")
    assert tk.render_prompt("a {dog}", "make it red") == (
        "Instruction: Give a description of the image and a modification to generate a drawing prompt.\n"
        "Input: a {dog}\nModification: make it red\nOutput:")


WORDS = "a the horse zebra dog cat city street field snowy red golden hour cinematic lighting painting detailed".split()


def make_examples(n: int, seed: int = 0) -> list[ex.Example]:
    rng = np.random.default_rng(seed)

    def words(k):
        return " ".join(rng.choice(WORDS, k))

    return [ex.Example(x=words(rng.integers(3, 12)), i="make it " + words(2), y=words(rng.integers(3, 12)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tokenizer")
    tz.train_bpe_tokenizer(tz.sample_corpus(make_examples(50) + INSTRUCTPE_EXAMPLES), 400, out_dir)
    return tz.load_tokenizer(out_dir)


def test_loss_mask_covers_exactly_the_response(tokenizer):
    examples = make_examples(10, seed=1)
    data, report = tk.tokenize_examples(examples, tokenizer, max_length=128)
    assert (report.n_kept, report.n_truncated, report.n_overlong) == (10, 0, 0)
    assert all(a.shape == (10, 128) and a.dtype == np.int32
               for a in (data.input_ids, data.attention_mask, data.loss_mask))
    np.testing.assert_array_equal(data.example_index, np.arange(10))
    for row, e in enumerate(examples):
        ids, p = data.input_ids[row], data.prompt_lengths[row]
        response = ids[data.loss_mask[row] == 1]
        assert tokenizer.decode(response[:-1]) == " " + e.y and response[-1] == tokenizer.eos_token_id
        # Prompt and response are tokenised separately: the prompt is exactly what a sampler would be given.
        assert list(ids[:p]) == tokenizer(tk.render_prompt(e.x, e.i), add_special_tokens=False)["input_ids"]
        assert data.loss_mask[row, :p].sum() == 0 and data.loss_mask[row, p] == 1
    assert report.max_tokens == data.attention_mask.sum(1).max()
    assert report.mean_tokens == pytest.approx(data.attention_mask.sum(1).mean())


def test_padding_is_on_the_right(tokenizer):
    data, _ = tk.tokenize_examples(make_examples(5), tokenizer, max_length=128)
    lengths = data.attention_mask.sum(1)
    for row, length in enumerate(lengths):
        assert data.attention_mask[row, :length].all() and not data.attention_mask[row, length:].any()
        assert (data.input_ids[row, length:] == tokenizer.pad_token_id).all()
        assert not data.loss_mask[row, length:].any()
    assert tokenizer.pad_token_id == 3 != tokenizer.eos_token_id


def test_truncation_shortens_x_and_keeps_y(tokenizer):
    long_x = " ".join(["a golden horse in a snowy field"] * 20)
    examples = [ex.Example(x="a dog", i="make it red", y="a red dog"),
                ex.Example(x=long_x, i="make it red", y="a red horse, cinematic lighting, highly detailed")]
    data, report = tk.tokenize_examples(examples, tokenizer, max_length=80)
    assert (report.n_kept, report.n_truncated, report.truncated_indices, report.n_overlong) == (2, 1, [1], 0)
    assert report.max_tokens <= 80 and data.attention_mask[1].sum() > 70  # x was cut no more than needed
    ids, p = data.input_ids[1], data.prompt_lengths[1]
    prompt = tokenizer.decode(ids[:p])
    x = re.search(r"Input: (.*)\nModification", prompt).group(1)
    assert 0 < len(x) < len(long_x) and long_x.startswith(x)
    assert prompt == tk.render_prompt(x, "make it red")
    assert tokenizer.decode(ids[data.loss_mask[1] == 1][:-1]) == " " + examples[1].y


def test_truncation_never_splits_a_character(tmp_path):
    # U+FFFD (what a cut inside a character decodes to) is one token here, as in big vocabularies: a cut x would be
    # shorter than the next whole character, so the search would pick it without the guard.
    tokenizer = tz.train_bpe_tokenizer(tz.sample_corpus(INSTRUCTPE_EXAMPLES) + ["\ufffd"] * 20, 300, tmp_path)
    example = ex.Example(x="ééééé ü", i="b", y="c")  # two byte-level tokens per accented character
    full = len(tokenizer(tk.render_prompt(example.x, example.i) + " c", add_special_tokens=False)["input_ids"]) + 1
    for max_length in range(full - 10, full):
        data, report = tk.tokenize_examples([example], tokenizer, max_length=max_length)
        x = re.search(r"Input: (.*)\nModification", tokenizer.decode(data.input_ids[0])).group(1)
        assert report.n_truncated == 1 and "ééééé ü".startswith(x) and "\ufffd" not in x


def test_overlong_examples_are_skipped_or_raise(tokenizer):
    examples = [ex.Example(x="a dog", i="make it red", y="a red dog"),
                ex.Example(x="a dog", i="make it red", y=" ".join(["a red dog"] * 40)),
                ex.Example(x="a cat", i="make it blue", y="a blue cat")]
    data, report = tk.tokenize_examples(examples, tokenizer, max_length=64)
    assert (report.n_kept, report.n_overlong, report.overlong_indices) == (2, 1, [1])
    np.testing.assert_array_equal(data.example_index, [0, 2])
    assert "1 over-long skipped" in report.summary()
    with pytest.raises(ValueError, match="example 1: .* max_length=64"):
        tk.tokenize_examples(examples, tokenizer, max_length=64, on_overlong="error")


def test_batches_are_deterministic_and_cover_each_example_once(tokenizer):
    data, _ = tk.tokenize_examples(make_examples(10), tokenizer, max_length=64)
    epoch0 = list(tk.batches(data, 4, seed=0, epoch=0, drop_remainder=False))
    assert [len(b["input_ids"]) for b in epoch0] == [4, 4, 2] and tk.num_batches(10, 4, drop_remainder=False) == 3
    assert sorted(np.concatenate([b["example_index"] for b in epoch0])) == list(range(10))
    for b in epoch0:  # the arrays of one example stay together
        np.testing.assert_array_equal(b["input_ids"], data.input_ids[b["example_index"]])
        np.testing.assert_array_equal(b["loss_mask"], data.loss_mask[b["example_index"]])
    again = list(tk.batches(data, 4, seed=0, epoch=0, drop_remainder=False))
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(epoch0, again))

    def order(**kw):
        return np.concatenate([b["example_index"] for b in tk.batches(data, 4, **kw)])

    assert not np.array_equal(order(seed=0, epoch=0), order(seed=0, epoch=1))
    assert not np.array_equal(order(seed=0, epoch=0), order(seed=1, epoch=0))
    full = list(tk.batches(data, 4, seed=0, epoch=0))
    assert len(full) == tk.num_batches(10, 4) == 2 and all(len(b["input_ids"]) == 4 for b in full)
    resumed = list(tk.batches(data, 4, seed=0, epoch=0, start=1))  # resume at step 1
    assert len(resumed) == 1 and np.array_equal(resumed[0]["input_ids"], full[1]["input_ids"])


# --------------------------------------------------------------------------------------------------------------
# Tokenizers.
# --------------------------------------------------------------------------------------------------------------
def test_trained_tokenizer_round_trips_and_reloads(tmp_path):
    corpus = tz.sample_corpus(INSTRUCTPE_EXAMPLES)
    assert corpus[0] == tk.render_prompt(INSTRUCTPE_EXAMPLES[0].x, INSTRUCTPE_EXAMPLES[0].i) + " " + \
        INSTRUCTPE_EXAMPLES[0].y and "a horse in a field" in corpus
    trained = tz.train_bpe_tokenizer(corpus, 300, tmp_path / "a")
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "a")
    assert [reloaded.convert_ids_to_tokens(n) for n in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (reloaded.eos_token, reloaded.pad_token, reloaded.bos_token, reloaded.unk_token) == (
        "</s>", "<pad>", "<s>", "<unk>")
    for text in ["Output: a zebra in a field, golden hour, 8k", "Ünïcode ☃ 🙂 and\nnew  lines", " leading space"]:
        ids = reloaded(text, add_special_tokens=False)["input_ids"]
        assert ids == trained(text, add_special_tokens=False)["input_ids"]
        assert reloaded.decode(ids) == text and reloaded.unk_token_id not in ids
    # Deterministic: the same texts give the same tokenizer.
    tz.train_bpe_tokenizer(corpus, 300, tmp_path / "b")
    assert (tmp_path / "a/tokenizer.json").read_text() == (tmp_path / "b/tokenizer.json").read_text()


def test_load_tokenizer_pads_with_eos_and_requires_eos(tmp_path):
    tz.train_bpe_tokenizer(["a dog", "a cat"], 270, tmp_path / "base")
    tokenizer_file = str(tmp_path / "base/tokenizer.json")
    transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, eos_token="</s>").save_pretrained(
        tmp_path / "no_pad")
    tokenizer = tz.load_tokenizer(tmp_path / "no_pad")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer_file).save_pretrained(tmp_path / "no_eos")
    with pytest.raises(ValueError, match="no EOS token"):
        tz.load_tokenizer(tmp_path / "no_eos")
