"""Keywords for content integrity (paper Listing 1, lines 4-22): words, POS tags, WordNet lemmas and synonyms.

A text becomes keywords in four steps. The paper leaves each step's details open; our decisions (knobs are fields
of `KeywordConfig`, set from `config.ci`):

1. Words: maximal runs of Unicode letters and digits (regex `[^\\W_]+`). Everything else separates words, so
   "woman's" is "woman" + "s", "snow-covered" is "snow" + "covered", "8k" is one word, and any script works.
2. POS tags (Penn Treebank), knob `tagger`: "perceptron" = nltk's averaged perceptron (the paper's `nltk.pos_tag`),
   "pattern" = TextBlob's PatternTagger (lexicon + suffix rules; offline; each word's tag depends only on the word
   and on whether it is the first word), "auto" (default) = perceptron where its data is installed, else pattern.
   The tagger in use is printed once per process. A text's words are tagged as one sequence.
3. Lemmas: the word lower-cased, then WordNet's morphy with the POS of its tag (NN* -> n, VB* -> v, JJ* -> a,
   RB* -> r). Words with other tags (DT, IN, CD, ...) are only lower-cased: morphy would turn "as" into "a".
4. Keywords: the distinct lemmas of the words whose tag is in `candidate_pos` (default CANDIDATE_POS: nouns NN*,
   incl. proper nouns such as artists' names, adjectives JJ*, verbs VB*), except
   - the auxiliaries be / have / do (tagged as verbs),
   - one-character lemmas (the "s" of "woman's", initials, stray letters),
   - with `stop_list` on (default): prompt boilerplate, BOILERPLATE below (quality, resolution and platform tags
     such as "highly detailed", "8k", "artstation"), matched on the lower-cased word and on its lemma. The
     paper's own beautification instruction (Figure 9) tells ChatGPT to ignore such words; without the list
     they dominate the keywords of beautified references (InstructPE has no y_o, so CI falls back to y).
   A keyword remembers the WordNet POS it was tagged with (a Penn tag WordNet lacks, e.g. CD when added to
   `candidate_pos`, stands for itself) and the forms it was written in, both in order of first occurrence.

Synonyms (`synonym_dict(word, pos)`): the word itself first, then the lemma names of its WordNet synsets in that
POS, in WordNet's order ("a" includes satellite adjectives), lower-cased and without repeats. A multi-word name
("adult_female", "cat-o'-nine-tails") is split into words like text and joined by single spaces ("adult female",
"cat o nine tails"): it matches a run of consecutive lemmas. One-letter names ("c", a sense of "snow") are left
out, as one-letter keywords are. The order matters: Listing 1 stops at the first synonym it finds. A word WordNet
does not know has itself as its only synonym.

WordNet comes from nltk's data folders (`python -m diffchat_jax.text.nltk_data` installs it, offline included).
Hot paths are cached: the tagger (built once), lemmas and synonyms (LRU caches).
"""
import dataclasses
import functools
import re
import warnings
from typing import Callable, NamedTuple

import nltk
from nltk.corpus.reader.wordnet import WordNetCorpusReader
from textblob import en as textblob_en

from diffchat_jax.utils.validate import names, one_of

WORD = re.compile(r"[^\W_]+")
CANDIDATE_POS = ("NN", "NNS", "NNP", "NNPS", "JJ", "JJR", "JJS", "VB", "VBD", "VBG", "VBN", "VBP", "VBZ")
# The Penn Treebank word tags both taggers emit (candidate_pos must name some of these).
PENN_TAGS = frozenset({"CC", "CD", "DT", "EX", "FW", "IN", "JJ", "JJR", "JJS", "LS", "MD", "NN", "NNS", "NNP", "NNPS",
                       "PDT", "POS", "PRP", "PRP$", "RB", "RBR", "RBS", "RP", "SYM", "TO", "UH", "VB", "VBD", "VBG",
                       "VBN", "VBP", "VBZ", "WDT", "WP", "WP$", "WRB"})
AUXILIARIES = frozenset({"be", "have", "do"})
BOILERPLATE = frozenset({
    # quality and detail
    "detailed", "hyperdetailed", "intricate", "masterpiece", "quality", "sharp", "focus",
    # resolution
    "hd", "uhd", "fhd", "hdr", "highres", "resolution", "4k", "8k", "16k", "1080p",
    # platforms, renderers, popularity
    "artstation", "cgsociety", "deviantart", "pixiv", "behance", "pinterest", "unsplash", "archdaily", "wallpaper",
    "octane", "unreal", "engine", "render", "rendered", "trending", "featured", "award", "winning",
})
WORDNET_POS = {"N": "n", "V": "v", "J": "a", "R": "r"}  # first letter of a Penn tag -> WordNet POS
TAGGERS = ("auto", "perceptron", "pattern")


@dataclasses.dataclass(frozen=True)
class KeywordConfig:
    """The keyword knobs (see the module docstring); hashable, so results can be cached per config."""
    candidate_pos: tuple[str, ...] = CANDIDATE_POS
    stop_list: bool = True
    tagger: str = "auto"


def from_config(ci) -> KeywordConfig:
    """The KeywordConfig of a `config.ci` ConfigDict."""
    one_of(ci.tagger, TAGGERS, "ci.tagger")
    return KeywordConfig(candidate_pos=names(ci.candidate_pos, "ci.candidate_pos", PENN_TAGS),
                         stop_list=bool(ci.stop_list), tagger=ci.tagger)


class EnglishWordNet(WordNetCorpusReader):
    """nltk's WordNet reader, English only: without the map of this WordNet onto WordNet 3.0 that it builds for the
    multilingual (OMW) data at load. nltk 3.9-3.10 compare the version "3.0" with the name "wordnet" there, so it
    always builds that map: 3 of the 5.5 s a load takes. Synsets, lemmas and morphy are nltk's own."""

    def map_wn(self, version="wordnet"):
        return None


@functools.cache
def get_wordnet() -> EnglishWordNet:
    """WordNet, loaded once per process (LookupError when nltk's data folders lack it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions")  # no OMW reader: English only
        return EnglishWordNet(nltk.data.find("corpora/wordnet"), None)


def wordnet_available() -> bool:
    try:
        get_wordnet()
    except LookupError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Tagging and lemmatising.
# ---------------------------------------------------------------------------------------------------------------
class Tagger(NamedTuple):
    name: str  # "perceptron" or "pattern": what "auto" resolved to
    tag: Callable[[list[str]], list[str]]  # [W] words -> [W] Penn tags


@functools.lru_cache(maxsize=None)
def get_tagger(name: str = "auto") -> Tagger:
    """The tagger for a `tagger` knob value, built once per process; prints which one is in use."""
    if name not in TAGGERS:
        raise ValueError(f"tagger must be one of {list(TAGGERS)}, got {name!r}")
    if name != "pattern":
        try:
            perceptron = nltk.tag.PerceptronTagger()
        except LookupError as e:
            if name == "perceptron":
                raise LookupError("tagger='perceptron' needs nltk's averaged_perceptron_tagger_eng data: "
                                  "nltk.download('averaged_perceptron_tagger_eng'), or use tagger='pattern'") from e
        else:
            print("content integrity: POS tagger = nltk averaged perceptron")
            return Tagger("perceptron", lambda words: [tag for _, tag in perceptron.tag(words)])
    reason = "" if name == "pattern" else " (nltk's averaged_perceptron_tagger_eng data is not installed)"
    print(f"content integrity: POS tagger = TextBlob PatternTagger{reason}")
    # PatternTagger.tag(text) tokenises, tags with this parser and formats a string; tagging our word list with
    # the same parser directly gives the same tags, about 7x faster.
    return Tagger("pattern", lambda words: [tag for _, tag in textblob_en.parser.find_tags(words)])


@functools.lru_cache(maxsize=1 << 18)
def lemmatize(word: str, tag: str) -> str:
    """WordNet lemma of a word with its Penn tag; words with a tag WordNet lacks are only lower-cased."""
    word = word.lower()
    pos = WORDNET_POS.get(tag[:1])
    if not pos:
        return word
    lemmas = get_wordnet()._morphy(word, pos)  # pylint: disable=protected-access  # as WordNetLemmatizer.lemmatize
    return min(lemmas, key=len) if lemmas else word


def split_words(text: str) -> list[str]:
    return WORD.findall(text)


@dataclasses.dataclass(frozen=True)
class TaggedText:
    """A text's words with their end offsets, Penn tags and lemmas, all [W]."""
    words: tuple[str, ...]  # as written
    ends: tuple[int, ...]  # character offset just past each word
    tags: tuple[str, ...]
    lemmas: tuple[str, ...]


def tag_text(text: str, tagger: str = "auto") -> TaggedText:
    """Splits a text into words and tags them as one sequence."""
    matches = list(WORD.finditer(text))
    words = [m.group() for m in matches]
    tags = get_tagger(tagger).tag(words) if words else []
    return TaggedText(words=tuple(words), ends=tuple(m.end() for m in matches), tags=tuple(tags),
                      lemmas=tuple(lemmatize(w, t) for w, t in zip(words, tags)))


# ---------------------------------------------------------------------------------------------------------------
# Keywords and synonyms.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Keyword:
    lemma: str
    pos: tuple[str, ...]  # WordNet POS ("n", "v", "a", "r"; else the Penn tag), in order of first occurrence
    forms: tuple[str, ...]  # the words as written, in order of first occurrence


def is_keyword(word: str, tag: str, lemma: str, config: KeywordConfig) -> bool:
    return (tag in config.candidate_pos and len(lemma) > 1
            and not (tag.startswith("VB") and lemma in AUXILIARIES)
            and not (config.stop_list and (lemma in BOILERPLATE or word.lower() in BOILERPLATE)))


def keywords(text: str, config: KeywordConfig = KeywordConfig()) -> tuple[Keyword, ...]:
    """The distinct keywords of a text, in order of first occurrence."""
    tagged = tag_text(text, config.tagger)
    found = {}  # lemma -> (pos, forms), both dicts used as ordered sets
    for word, tag, lemma in zip(tagged.words, tagged.tags, tagged.lemmas):
        if is_keyword(word, tag, lemma, config):
            pos, forms = found.setdefault(lemma, ({}, {}))
            pos[WORDNET_POS.get(tag[:1], tag)] = None
            forms[word] = None
    return tuple(Keyword(lemma, tuple(pos), tuple(forms)) for lemma, (pos, forms) in found.items())


@functools.lru_cache(maxsize=1 << 16)
def synonym_dict(word: str, pos: str) -> tuple[str, ...]:
    """The word, then the lemma names of its WordNet synsets in POS `pos` (multi-word names space-separated)."""
    names = [word]
    if pos in WORDNET_POS.values():
        names += [" ".join(split_words(name.lower())) for synset in get_wordnet().synsets(word, pos)
                  for name in synset.lemma_names()]
    # Like one-letter keywords, one-letter names ("c" for snow, "a" for ampere) would match initials and stray letters.
    return tuple(dict.fromkeys(name for name in names if len(name) > 1 or name == word))
