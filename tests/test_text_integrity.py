"""Tests for diffchat_jax.text.integrity: the CI score (paper Listing 1) and the prefix CI for VCI."""
import os
import re
from pathlib import Path

import numpy as np
import pytest

from diffchat_jax.data import SAMPLE_PATH
from diffchat_jax.data.examples import Example, load_examples
from diffchat_jax.data.tokenize import encode, response_text
from diffchat_jax.data.tokenizer import sample_corpus, train_bpe_tokenizer
from diffchat_jax.text import integrity as ci
from diffchat_jax.text import keywords as kw

if not kw.wordnet_available():
    pytest.skip("NLTK WordNet is not installed: run `python -m diffchat_jax.text.nltk_data`",
                allow_module_level=True)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data"
PATTERN = kw.KeywordConfig(tagger="pattern")  # pinned: the expected values must not depend on installed data

# (x_o, i, y_o) references. Keywords of y_o and the highlighted ones (not in x_o, in i) are worked out by hand.
HORSE = ("a horse in a field", "turn the horse into a zebra", "a zebra in a field")  # zebra*, field
BRIDGE = ("an old stone bridge over a quiet river", "add a small boat",  # old stone bridge quiet river small* boat*
          "an old stone bridge over a quiet river with a small boat")
CAR = ("a red car parked on a street", "make it night",  # red car park street night*
       "a red car parked on a street at night")
CAT_BIG = ("a cat sleeping on a soft red pillow near the window", "make the cat large and big",
           "a large big cat sleeping on a soft red pillow near the window")  # large* big* cat sleep soft red ...
CAT_LARGE = (CAT_BIG[0], "make the cat large", CAT_BIG[2])  # large* big cat sleep soft red pillow window
DOGS = ("two dogs running on a beach", "make it a photo", "two dogs running on a beach")  # dog run beach
FRUIT = ("red apples, green pears, yellow bananas, purple grapes, orange carrots", "make it a still life",
         "red apples, green pears, yellow bananas, purple grapes, orange carrots")  # 10 keywords, none highlighted
CASTLE = ("a castle on a hill", "add some fog", "a castle on a hill, highly detailed, 8k, trending on artstation")
SPANISH = ("un gato en la casa", "haz que sea de noche", "un gato en la casa de noche")

HAND_CHECKED = [  # (reference, y, threshold, expected CI), count / number of y_o keywords worked out by hand
    (HORSE, "a zebra in a field", 0.7, 1.0),  # all kept: 2 + 1 = 3 > 2, capped at 1
    (HORSE, "a zebra standing in a meadow", 0.7, 1.0),  # field dropped, but the highlighted zebra counts 2: 2/2
    (HORSE, "a horse in a field", 0.7, 0.0),  # highlighted zebra dropped: 1/2, under the threshold
    (HORSE, "a horse in a field", 0.0, 0.5),  # ... and the raw score
    (BRIDGE, BRIDGE[2] + ", golden hour, highly detailed", 0.7, 1.0),  # all kept, extra words: 9/7 -> 1
    (BRIDGE, "an old stone bridge over a quiet river", 0.7, 5 / 7),  # both highlighted dropped: just over 0.7
    (BRIDGE, "a stone bridge over a quiet stream", 0.0, 3 / 7),  # old dropped, river -> stream (no synonym)
    (CAR, "a red automobile on a road", 0.0, 2 / 5),  # car kept through its synonym automobile: counts 1
    (CAR, "a red car on a road", 0.0, 2 / 5),  # ... exactly as the word itself does
    (CAR, "a red car parked on a street", 0.7, 4 / 5),  # highlighted night dropped
    (CAR, "a car parked at night", 0.7, 4 / 5),  # red, street dropped; night counts 2
    (CAT_BIG, "a big cat", 0.0, 5 / 8),  # highlighted large kept through the highlighted synonym big: 2 + 2 + 1
    (CAT_LARGE, "a big cat", 0.0, 3 / 8),  # large through big, which is not highlighted: 1 (Listing 1, literal)
    (DOGS, "a dog runs along the beaches", 0.7, 1.0),  # plural and tense variants matched through lemmas: 3/3
    (DOGS, "a dog ran along the sand", 0.7, 0.0),  # ran -> run, beach dropped: 2/3, just under the threshold
    (DOGS, "a dog ran along the sand", 0.0, 2 / 3),
    (FRUIT, "red apples, green pears, yellow bananas, purple plums", 0.7, 0.7),  # 7/10: the threshold is kept
    (CASTLE, "a castle on a hill", 0.7, 1.0),  # boilerplate is no keyword (stop list on): 2/2
    (("a cat", "make it so", "it is on the ...."), "a dog", 0.7, 1.0),  # y_o without keywords: nothing to lose
    (HORSE, "", 0.0, 0.0),  # empty y
    (HORSE, "... , !", 0.0, 0.0),  # y without words
    (SPANISH, SPANISH[2], 0.7, 1.0),  # non-English: gato casa noche, all kept
    (SPANISH, "un perro en la casa", 0.0, 1 / 3),  # gato and noche dropped
    (HORSE, "a zebra in a field. " * 20000, 0.7, 1.0),  # very long text
]


@pytest.mark.parametrize("reference, y, threshold, expected", HAND_CHECKED)
def test_hand_checked_ci(reference, y, threshold, expected):
    assert ci.ci_score(*reference, y, threshold=threshold, config=PATTERN) == pytest.approx(expected)


def test_stop_list_off_counts_boilerplate():
    config = kw.KeywordConfig(tagger="pattern", stop_list=False)
    # castle hill detail 8k trend artstation: 2/6
    assert ci.ci_score(*CASTLE, "a castle on a hill", threshold=0, config=config) == pytest.approx(2 / 6)


def listing1(x_o, i, y_o, y, thres=0.7, config=PATTERN):
    """Paper Listing 1 transcribed line by line, with keywords.py's keywords, lemmas and synonyms."""
    y_words = " " + " ".join(kw.tag_text(y, config.tagger).lemmas) + " "  # multi-word synonyms: consecutive
    x_o_keywords = [k.lemma for k in kw.keywords(x_o, config)]
    i_keywords = [k.lemma for k in kw.keywords(i, config)]
    y_o_keywords = kw.keywords(y_o, config)
    highlighted = [q.lemma for q in y_o_keywords if q.lemma not in x_o_keywords and q.lemma in i_keywords]
    cnt = 0
    for keyword in y_o_keywords:
        for s in [s for pos in keyword.pos for s in kw.synonym_dict(keyword.lemma, pos)]:
            if f" {s} " in y_words:
                cnt += 2 if s in highlighted else 1
                break
    score = min(cnt / len(y_o_keywords), 1.0) if y_o_keywords else 1.0
    return score if score >= thres else 0


def perturbed(text: str, rng: np.random.Generator) -> str:
    """Drops and shuffles some space-separated pieces of a text."""
    pieces = [p for p in text.split(" ") if rng.random() < 0.75]
    order = rng.permutation(len(pieces)) if rng.random() < 0.3 else range(len(pieces))
    return " ".join(pieces[j] for j in order)


def sample_cases(n: int, seed: int = 0) -> list[tuple[tuple[str, str, str], str]]:
    """(reference, y) pairs from the shipped sample: y the target, a perturbed target, or another row's target."""
    examples, _ = load_examples(SAMPLE_PATH)
    rng = np.random.default_rng(seed)
    cases = []
    for index in rng.choice(len(examples), n, replace=False):
        e = examples[index]
        y = [e.y, perturbed(e.y, rng), examples[(index + 1) % len(examples)].y][rng.integers(3)]
        cases.append((ci.ci_reference(e), y))
    return cases


def test_ci_score_matches_listing1_transcription():
    for reference, y in sample_cases(120):
        for threshold in (0.0, 0.7):
            assert ci.ci_score(*reference, y, threshold, PATTERN) == pytest.approx(listing1(*reference, y, threshold))


def test_ci_reference_falls_back_to_x_and_y():
    full = Example(x="X", i="I", y="Y", x_o="XO", y_o="YO")
    assert ci.ci_reference(full) == ("XO", "I", "YO")
    assert ci.ci_reference(Example(x="X", i="I", y="Y")) == ("X", "I", "Y")


# ---------------------------------------------------------------------------------------------------------------
# Prefix CI.
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A BLOOM-like byte-level BPE small enough that most words are several tokens."""
    examples, _ = load_examples(SAMPLE_PATH)
    return train_bpe_tokenizer(sample_corpus(examples), 400, tmp_path_factory.mktemp("bpe"))


def response_ids(tokenizer, y: str) -> list[int]:
    """y's tokens as the sampler generates them: " " + y, then EOS."""
    return encode(tokenizer, [response_text(y)])[0] + [tokenizer.eos_token_id]


def padded(rows: list[list[int]], steps: int, pad: int) -> np.ndarray:
    """[B, steps] int32 rows, right-padded."""
    ids = np.full((len(rows), steps), pad, np.int32)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = row
    return ids


def brute_force_prefix_ci(reference, ids, tokenizer) -> list[float]:
    """CI of every prefix re-scored from scratch: the decoded prefix without a last word that may still grow."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    values = []
    for t in range(len(ids)):
        prefix = os.path.commonprefix([tokenizer.decode(ids[:t + 1], skip_special_tokens=True), text])
        if t < len(ids) - 1:
            prefix = re.sub(r"[^\W_]+$", "", prefix)
        values.append(ci.ci_score(*reference, prefix, threshold=0, config=PATTERN))
    return values


def test_prefix_ci_equals_brute_force(tokenizer):
    cases = sample_cases(25, seed=1)
    cases += [(CAR, "café crème, a red car naïve 🙂 über night"), (HORSE, "zebra"), (HORSE, "")]  # split bytes
    for reference, y in cases:
        ids = response_ids(tokenizer, y)
        values = ci.prefix_ci(*reference, ids, tokenizer, config=PATTERN)
        assert values.shape == (len(ids),) and values.dtype == np.float32
        np.testing.assert_allclose(values, brute_force_prefix_ci(reference, ids, tokenizer), atol=1e-6)


def test_prefix_ci_ends_at_ci_and_grows_when_keywords_are_added(tokenizer):
    examples, _ = load_examples(SAMPLE_PATH)
    for e in examples[:60]:
        ids = response_ids(tokenizer, e.y)
        values = ci.prefix_ci(*ci.ci_reference(e), ids, tokenizer, config=PATTERN)
        assert values[-1] == pytest.approx(ci.ci_score(*ci.ci_reference(e), e.y, threshold=0, config=PATTERN))
        assert np.all(np.diff(values) >= 0)


def test_prefix_ci_counts_a_word_once_complete(tokenizer):
    ids = response_ids(tokenizer, "a zebra, field")
    values = ci.prefix_ci(*HORSE, ids, tokenizer, config=PATTERN)
    pieces = [tokenizer.decode(ids[:t + 1]) for t in range(len(ids))]
    comma = pieces.index(" a zebra,")
    assert values[comma - 1] == 0 and values[comma] == 1.0  # "zebra" counts once the "," after it is generated
    without_eos = ci.prefix_ci(*HORSE, ids[:-1], tokenizer, config=PATTERN)
    assert without_eos[-1] == 1.0 and values[-1] == 1.0  # the last word counts at the last token


@pytest.mark.parametrize("reference, ours, without_vci", [
    (("study of fair hair beauty ..., full hd", "turn the woman into a cat", "study of fair hair cat ..., full hd"),
     "study of fair hair cat ..., full hd", "study of fair hair beauty ..., full hd, cat"),
    (("A wildflower ... in washington D. c, by Greg Rutkowski", "have it be in the snow",
      "A wildflower ... in washington D. c in the snow, by Greg Rutkowski"),
     "A wildflower ... in washington D. c, covered in snow, by Greg Rutkowski",
     "A wildflower ... in washington D. c, by Greg Rutkowski, in the snow"),
])
def test_table2_vci_cases_reach_their_final_value_earlier(tokenizer, reference, ours, without_vci):
    """Paper Table 2 (b): the edit written in place earns its CI earlier than the edit appended at the end."""
    def final_from(y):
        """(the first token position from which the prefix CI keeps its final value, the final value)"""
        values = ci.prefix_ci(*reference, response_ids(tokenizer, y), tokenizer, config=PATTERN)
        return np.flatnonzero(values != values[-1]).max(initial=-1) + 1, values[-1]
    (ours_at, ours_final), (other_at, other_final) = final_from(ours), final_from(without_vci)
    assert ours_final == other_final == 1.0
    assert ours_at < other_at


def test_prefix_ci_batch_aligns_with_tokens_and_pads(tokenizer):
    cases = sample_cases(6, seed=2) + [(HORSE, "")]
    rows = [response_ids(tokenizer, y) for _, y in cases]
    steps = max(map(len, rows)) + 3
    ids = padded(rows, steps, tokenizer.pad_token_id)
    values = ci.prefix_ci_batch([ref for ref, _ in cases], ids, tokenizer, lengths=[len(r) for r in rows],
                                config=PATTERN)
    assert values.shape == (len(rows), steps) and values.dtype == np.float32
    for b, ((reference, _), row) in enumerate(zip(cases, rows)):
        np.testing.assert_array_equal(values[b, :len(row)], ci.prefix_ci(*reference, row, tokenizer, PATTERN))
        assert np.all(values[b, len(row):] == values[b, len(row) - 1])  # padding repeats the final value


# ---------------------------------------------------------------------------------------------------------------
# Real data (skipped without ../shared).
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (SHARED_DATA / "ip2p-human-written.jsonl").exists(), reason="../shared/data is absent")
def test_every_ip2p_row(tokenizer):
    examples, report = load_examples(SHARED_DATA / "ip2p-human-written.jsonl")
    assert report.n_kept == 500
    references = [ci.ci_reference(e) for e in examples]
    for reference in references:
        x_o, _, y_o = reference
        assert ci.ci_score(*reference, y_o) == 1.0  # the reference keeps all its keywords
        assert 0.0 <= ci.ci_score(*reference, x_o, threshold=0) <= 1.0
    rows = [response_ids(tokenizer, y_o) for _, _, y_o in references]
    ids = padded(rows, max(map(len, rows)), tokenizer.pad_token_id)
    values = ci.prefix_ci_batch(references, ids, tokenizer, lengths=[len(r) for r in rows])
    np.testing.assert_array_equal(values[:, -1], 1.0)
