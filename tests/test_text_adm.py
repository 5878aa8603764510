"""Tests for diffchat_jax.text.adm: the keyword vocabulary and ADM pi- plans as token-id arrays."""
from pathlib import Path

import numpy as np
import pytest
from tokenizers import pre_tokenizers

from diffchat_jax.configs import base
from diffchat_jax.data import SAMPLE_PATH
from diffchat_jax.data.examples import load_examples
from diffchat_jax.data.tokenizer import sample_corpus, train_bpe_tokenizer
from diffchat_jax.text import adm
from diffchat_jax.text import integrity as ci
from diffchat_jax.text import keywords as kw

if not kw.wordnet_available():
    pytest.skip("NLTK WordNet is not installed: run `python -m diffchat_jax.text.nltk_data`",
                allow_module_level=True)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data"
PATTERN = kw.KeywordConfig(tagger="pattern")  # pinned: the expected values must not depend on installed data


@pytest.fixture(scope="module")
def references():
    examples, _ = load_examples(SAMPLE_PATH)
    return [ci.ci_reference(e)[2] for e in examples]


@pytest.fixture(scope="module")
def vocab():
    examples, _ = load_examples(SAMPLE_PATH)
    return adm.build_vocab([e.y for e in examples] + [e.y_o for e in examples if e.y_o], PATTERN)


@pytest.fixture(scope="module", params=["bloom_like", "gpt2_like"])
def tokenizer(request, tmp_path_factory):
    """bloom_like: byte-level BPE, no prefix space, small (most keywords are several tokens). gpt2_like: larger,
    with a prefix space added, so "cat" and " cat" are the same tokens."""
    examples, _ = load_examples(SAMPLE_PATH)
    vocab_size = 400 if request.param == "bloom_like" else 2000
    tokenizer = train_bpe_tokenizer(sample_corpus(examples), vocab_size, tmp_path_factory.mktemp(request.param))
    if request.param == "gpt2_like":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    return tokenizer


def rows_of(array: np.ndarray) -> list[list[int]]:
    """The used rows of a [K, L] plan array, without padding."""
    return [[int(t) for t in row if t >= 0] for row in array if row[0] >= 0]


def test_vocab_by_pos():
    vocab = adm.build_vocab(["a red car parked", "a red boat", "a painted fence and red paint"], PATTERN)
    assert vocab.lemmas["a"] == ("red",) and vocab.counts["a"].tolist() == [3]  # texts, not occurrences
    assert vocab.lemmas["n"] == ("boat", "car", "fence", "paint")
    assert vocab.lemmas["v"] == ("paint", "park")  # "paint" is a noun and a verb: counted under both
    assert vocab.config == PATTERN


def test_like_and_spellings():
    assert [adm.like("dog", form) for form in ("cat", "Cats", "CAT", "C")] == ["dog", "Dog", "DOG", "Dog"]
    cat = kw.Keyword("cat", ("n",), ("Cats",))
    assert adm.spellings(adm.Edit(cat, "dog")) == [
        (" cat", " dog"), ("cat", "dog"), (" Cats", " Dog"), ("Cats", "Dog"), (" cats", " dog"), ("cats", "dog")]
    assert adm.spellings(adm.Edit(cat, None))[:2] == [(" cat", None), ("cat", None)]


def test_negative_fraction_and_remove_share(references, vocab, tokenizer):
    many = references * 20  # 4800 samples, every one with keywords
    plan = adm.make_plans(many, vocab, tokenizer, seed=0, negative_fraction=0.04, remove_prob=0.5,
                          max_sequences=16, max_tokens=32)
    assert abs(plan.negative.mean() - 0.04) < 0.012  # binomial sd 0.003
    edits = [edit for sample in plan.edits for edit in sample]
    assert len(edits) == plan.negative.sum()  # one keyword per negative (keywords_per_negative=1)
    assert abs(np.mean([edit.replacement is None for edit in edits]) - 0.5) < 0.15  # about 190 edits: sd 0.036


def test_replacements_share_pos_and_are_not_synonyms(references, vocab, tokenizer):
    plan = adm.make_plans(references, vocab, tokenizer, seed=1, negative_fraction=1.0, remove_prob=0.0,
                          keywords_per_negative=2)
    assert plan.negative.all()
    for reference, sample in zip(references, plan.edits):
        own = {k.lemma for k in kw.keywords(reference, PATTERN)}
        assert len(sample) == 2 and len({edit.keyword.lemma for edit in sample}) == 2
        for edit in sample:
            k, r = edit.keyword, edit.replacement
            assert r in vocab.lemmas[k.pos[0]]
            assert all(r not in kw.synonym_dict(k.lemma, pos) for pos in k.pos) and r not in own


def test_rows_decode_to_the_planned_spellings(references, vocab, tokenizer):
    plan = adm.make_plans(references, vocab, tokenizer, seed=2, negative_fraction=1.0, remove_prob=0.5,
                          max_sequences=16, max_tokens=32)
    batch = len(references)
    for array in (plan.ban, plan.steer_from, plan.steer_to):
        assert array.shape == (batch, 16, 32) and array.dtype == np.int32
        padded = array < 0  # left-aligned: once -1, -1 to the end of the row
        assert np.array_equal(padded, np.maximum.accumulate(padded, axis=-1)) and array.min() >= -1
    np.testing.assert_array_equal(plan.steer_from[..., 0] >= 0, plan.steer_to[..., 0] >= 0)
    multi_token = 0
    for b in range(batch):
        bans, froms, tos = rows_of(plan.ban[b]), rows_of(plan.steer_from[b]), rows_of(plan.steer_to[b])
        assert plan.negative[b] == bool(bans or froms) == bool(plan.edits[b])
        pairs = {pair for edit in plan.edits[b] for pair in adm.spellings(edit)}
        assert {(tokenizer.decode(row), None) for row in bans} <= pairs
        assert {(tokenizer.decode(f), tokenizer.decode(t)) for f, t in zip(froms, tos)} <= pairs
        assert len({tuple(row) for row in bans + froms}) == len(bans + froms)  # no spelling twice
        multi_token += sum(len(row) > 1 for row in bans + froms + tos)
    assert multi_token > 0


def test_spellings_longer_than_max_tokens_are_dropped(references, vocab, tokenizer):
    plan = adm.make_plans(references, vocab, tokenizer, seed=3, negative_fraction=1.0, max_tokens=1)
    assert plan.ban.shape[-1] == 1
    assert not plan.negative.all()  # with one token per row, some keywords have no spelling left
    assert [bool(e) for e in plan.edits] == plan.negative.tolist()


def test_plans_are_seeded(references, vocab, tokenizer):
    def plan(seed):
        return adm.make_plans(references, vocab, tokenizer, seed=seed, negative_fraction=0.3)
    first, again, other = plan((7, 0)), plan((7, 0)), plan((7, 1))
    for name in ("negative", "ban", "steer_from", "steer_to"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert first.edits == again.edits
    assert not np.array_equal(first.negative, other.negative)
    # A host that plans only its own rows (their positions in the whole batch) gets those rows' plans.
    half = len(references) // 2
    part = adm.make_plans(references[half:], vocab, tokenizer, seed=(7, 0), negative_fraction=0.3,
                          positions=range(half, len(references)))
    for name in ("negative", "ban", "steer_from", "steer_to"):
        np.testing.assert_array_equal(getattr(part, name), getattr(first, name)[half:])
    assert part.edits == first.edits[half:] and first.negative[half:].any()


def test_references_without_keywords_get_no_plan(vocab, tokenizer):
    plan = adm.make_plans(["", "... !!!", "it is on the", "a castle"], vocab, tokenizer, seed=0,
                          negative_fraction=1.0, remove_prob=1.0)
    assert plan.negative.tolist() == [False, False, False, True]
    assert plan.edits[:3] == ((), (), ()) and plan.edits[3][0] == adm.Edit(kw.Keyword("castle", ("n",), ("castle",)),
                                                                             None)


def test_config_section_matches_make_plans(references, vocab, tokenizer):
    adm_config = base.get_config().adm
    plan = adm.make_plans(references, vocab, tokenizer, seed=0, **adm_config)
    assert plan.ban.shape == (len(references), adm_config.max_sequences, adm_config.max_tokens)


@pytest.mark.skipif(not (SHARED_DATA / "ip2p-human-written.jsonl").exists(), reason="../shared/data is absent")
def test_every_ip2p_row(tokenizer):
    examples, _ = load_examples(SHARED_DATA / "ip2p-human-written.jsonl")
    references = [ci.ci_reference(e)[2] for e in examples]
    vocab = adm.build_vocab(references)
    plan = adm.make_plans(references, vocab, tokenizer, seed=0, negative_fraction=1.0, max_tokens=64)
    has_keywords = np.array([bool(kw.keywords(r)) for r in references])
    np.testing.assert_array_equal(plan.negative, has_keywords)
