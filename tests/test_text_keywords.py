"""Tests for diffchat_jax.text.keywords: words, taggers, POS-aware lemmas, keywords and their knobs, synonyms."""
import nltk
import pytest

from diffchat_jax.configs import base
from diffchat_jax.text import keywords as kw

if not kw.wordnet_available():
    pytest.skip("NLTK WordNet is not installed: run `python -m diffchat_jax.text.nltk_data`",
                allow_module_level=True)

PATTERN = kw.KeywordConfig(tagger="pattern")  # pinned: the expected values must not depend on installed data


@pytest.fixture
def fresh_taggers():
    """Lets a test build taggers under monkeypatched nltk; the process keeps its usual taggers afterwards."""
    kw.get_tagger.cache_clear()
    yield
    kw.get_tagger.cache_clear()


def test_split_words():
    assert kw.split_words("A woman's face, awe-inspiring; 8k_hd (3 5 mm)!") == [
        "A", "woman", "s", "face", "awe", "inspiring", "8k", "hd", "3", "5", "mm"]
    assert kw.split_words("elefante verde, 女の子 🙂") == ["elefante", "verde", "女の子"]
    assert kw.split_words(" ... ,, ") == []


@pytest.mark.parametrize("word, tag, lemma", [
    ("Cats", "NNS", "cat"), ("leaves", "NNS", "leaf"), ("running", "VBG", "run"), ("ran", "VBD", "run"),
    ("better", "JJR", "good"), ("covered", "VBN", "cover"), ("drawing", "NN", "drawing"),
    ("as", "IN", "as"),  # not a WordNet POS: only lower-cased (WordNet's noun morphy would give "a")
    ("Rutkowski", "NNP", "rutkowski"),
])
def test_lemmatize_is_pos_aware(word, tag, lemma):
    assert kw.lemmatize(word, tag) == lemma


def test_tag_text_aligns_words_ends_tags_lemmas():
    text = "Two dogs running, on the beach"
    tagged = kw.tag_text(text, "pattern")
    assert tagged.words == ("Two", "dogs", "running", "on", "the", "beach")
    assert [text[:end].split()[-1].strip(",") for end in tagged.ends] == list(tagged.words)
    assert tagged.tags == ("CD", "NNS", "VBG", "IN", "DT", "NN")
    assert tagged.lemmas == ("two", "dog", "run", "on", "the", "beach")
    assert kw.tag_text("", "pattern") == kw.TaggedText((), (), (), ())


def test_keywords_default_candidates_auxiliaries_and_forms():
    found = kw.keywords("A dog is running; the dogs have red Collars, a dog's toy and the Dog ran", PATTERN)
    assert [k.lemma for k in found] == ["dog", "run", "red", "collar", "toy"]  # no "be"/"have", no one-letter "s"
    dog = found[0]
    assert dog.pos == ("n",) and dog.forms == ("dog", "dogs", "Dog")
    assert found[1].pos == ("v",) and found[1].forms == ("running", "ran")


def test_keyword_remembers_every_pos_in_order():
    (paint,) = [k for k in kw.keywords("a painted fence and red paint", PATTERN) if k.lemma == "paint"]
    assert paint.pos == ("v", "n") and paint.forms == ("painted", "paint")


def test_stop_list_knob():
    text = "a castle on a hill, highly detailed, 8k, trending on artstation"
    assert [k.lemma for k in kw.keywords(text, PATTERN)] == ["castle", "hill"]
    no_stop_list = kw.KeywordConfig(tagger="pattern", stop_list=False)
    # "detailed" is tagged VBN here, so its lemma is "detail"; the stop list matches the word as written too.
    assert [k.lemma for k in kw.keywords(text, no_stop_list)] == ["castle", "hill", "detail", "8k", "trend",
                                                                  "artstation"]


def test_candidate_pos_knob():
    text = "a small red boat near the quiet river"
    nouns = kw.KeywordConfig(candidate_pos=("NN", "NNS"), tagger="pattern")
    assert [k.lemma for k in kw.keywords(text, nouns)] == ["boat", "river"]
    assert [k.lemma for k in kw.keywords(text, PATTERN)] == ["small", "red", "boat", "quiet", "river"]


def test_keywords_of_odd_text_do_not_raise():
    assert kw.keywords("", PATTERN) == ()
    assert kw.keywords("... !!! 42", PATTERN) == ()
    assert [k.lemma for k in kw.keywords("un gato en la casa de noche, 女の子", PATTERN)] == [
        "gato", "casa", "noche", "女の子"]
    long_text = "a red fox jumps over the lazy dog, " * 5000
    assert [k.lemma for k in kw.keywords(long_text, PATTERN)] == ["red", "fox", "jump", "lazy", "dog"]


def test_synonym_dict():
    woman = kw.synonym_dict("woman", "n")
    assert woman[0] == "woman" and "adult female" in woman  # the word first; multi-word names space-separated
    assert len(set(woman)) == len(woman) and all(s == s.lower() for s in woman)
    assert kw.synonym_dict("large", "a")[:2] == ("large", "big")  # WordNet's order; "a" includes satellites
    assert "automobile" in kw.synonym_dict("car", "n") and "automobile" not in kw.synonym_dict("car", "v")
    assert "c" not in kw.synonym_dict("snow", "n")  # one-letter names left out (WordNet: "c" = cocaine = snow)
    assert kw.synonym_dict("rutkowski", "n") == ("rutkowski",)  # unknown to WordNet: only itself
    assert kw.synonym_dict("8k", "CD") == ("8k",)  # a POS WordNet lacks
    assert kw.synonym_dict("woman", "n") is woman  # cached


def test_config_defaults_match_keyword_config():
    assert kw.from_config(base.get_config().ci) == kw.KeywordConfig()
    ci = base.get_config().ci
    ci.tagger = "spacy"
    with pytest.raises(ValueError, match="ci.tagger"):
        kw.from_config(ci)


def test_pattern_tagger_is_offline(fresh_taggers, capsys):
    tagger = kw.get_tagger("pattern")
    assert tagger.name == "pattern" and "PatternTagger" in capsys.readouterr().out
    assert tagger.tag(["a", "cat", "sleeps"])[:2] == ["DT", "NN"]


def test_auto_falls_back_to_pattern_without_perceptron_data(fresh_taggers, monkeypatch, capsys):
    def missing():
        raise LookupError("averaged_perceptron_tagger_eng not found")
    monkeypatch.setattr(nltk.tag, "PerceptronTagger", missing)
    assert kw.get_tagger("auto").name == "pattern"
    assert "not installed" in capsys.readouterr().out
    with pytest.raises(LookupError, match="tagger='pattern'"):
        kw.get_tagger("perceptron")


def test_auto_uses_the_perceptron_when_its_data_loads(fresh_taggers, monkeypatch, capsys):
    perceptron = nltk.tag.PerceptronTagger(load=False)  # a tiny one trained here stands in for the real data
    perceptron.train([[("a", "DT"), ("cat", "NN"), ("runs", "VBZ")]] * 5, nr_iter=2)
    monkeypatch.setattr(nltk.tag, "PerceptronTagger", lambda: perceptron)
    tagger = kw.get_tagger("auto")
    assert tagger.name == "perceptron" and "perceptron" in capsys.readouterr().out
    assert tagger.tag(["a", "cat", "runs"]) == ["DT", "NN", "VBZ"]
    assert kw.get_tagger("auto") is tagger  # built once


def test_unknown_tagger():
    with pytest.raises(ValueError, match="tagger must be one of"):
        kw.get_tagger("spacy")


def test_english_wordnet_matches_nltks_reader():
    """Our loader skips nltk's OMW mapping; lemmas and synsets must be exactly nltk's (its lemmatizer and its
    stock `nltk.corpus.wordnet` reader) on a few hundred words of every POS."""
    from nltk.corpus import wordnet as stock
    from nltk.stem import WordNetLemmatizer
    lemmatizer = WordNetLemmatizer()
    words = sorted({w for line in open(kw.__file__, encoding="utf-8") for w in kw.split_words(line.lower())})
    words += ["churches", "aardwolves", "abaci", "geese", "ran", "better", "snowing", "us", "leaves", "women"]
    assert len(words) > 300
    for pos in ("n", "v", "a", "r"):
        for word in words:
            assert kw.lemmatize(word, {"n": "NN", "v": "VB", "a": "JJ", "r": "RB"}[pos]) == \
                lemmatizer.lemmatize(word, pos), (word, pos)
            assert kw.get_wordnet().synsets(word, pos) == stock.synsets(word, pos), (word, pos)
    assert kw.lemmatize("geese", "NNS") == "goose" and kw.lemmatize("ran", "VBD") == "run"
