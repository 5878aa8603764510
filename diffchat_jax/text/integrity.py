"""Content integrity (CI): the score of paper Listing 1 and, for VCI (eq. 7), the CI of every response prefix.

CI(x_o, i, y_o, y), Listing 1 (keywords, lemmas and synonyms as in keywords.py):
    highlighted = the keywords of y_o that are not keywords of x_o and are keywords of i (compared as lemmas);
    for each keyword k of y_o: walk its synonyms in order and stop at the first one found among the lemmas of ALL
        the words of y: count += 2 if that synonym is highlighted, else 1;
    CI = min(count / |keywords of y_o|, 1); returned if CI >= threshold, else 0 (threshold 0: the raw score,
        which evaluation reports).
Our readings of the details Listing 1 abbreviates:
- A keyword's synonyms are synonym_dict(k, pos) over the POS it was tagged with in y_o, joined in that order
  (Listing 1's keyword list forgets the POS, but WordNet synonyms need one).
- "2 if the synonym is highlighted" is literal: a highlighted keyword found through a synonym that is not itself
  highlighted counts 1; any keyword found through a synonym that is a highlighted keyword counts 2.
- A multi-word synonym ("adult female") is found where its words are consecutive lemmas of y.
Edge cases (never an exception; values before thresholding):
- y_o without keywords (empty, punctuation, only function words or boilerplate): 1.0, nothing can be lost.
- y without words (empty, punctuation only): 0.0 when y_o has keywords.
- non-English text: handled like English (words are Unicode letter/digit runs; unknown words are mostly tagged
  as nouns and, without a WordNet entry, match only themselves).
- very long text: no limit; the cost grows linearly with the number of words.
The released InstructPE has no y_o: `ci_reference` falls back to y (and to x for an example without x_o), as
DESIGN.md section 5 says.

Prefix CI (VCI). For a response of T tokens, prefix CI[t] is the CI (before thresholding) of the decoded prefix
y_<=t counting only its complete words: a word is complete once the character after it has been generated, or
at the last token of the response (EOS included), because until then the next token could still extend it
("cat" -> "catalog"). The decoded prefix is the longest common prefix of decode(ids[:t+1]) and decode(ids), so
a multi-byte character split across tokens appears once all its bytes are in. It is computed incrementally: the
response is decoded, tagged and lemmatised once; each keyword's Listing-1 count is a step function of the number
of complete words (`keyword_steps`); the steps are placed at the tokens that complete their words and summed, so a
response costs about one CI evaluation. Tags come from the whole response: with the pattern tagger (each word's
tag depends on the word only) this equals re-scoring every prefix from scratch; the perceptron tags a word with
its neighbours, so the last words of a prefix keep the tags they have in the whole response.
Properties: CI[T-1] equals ci_score(..., threshold=0) of the whole response. CI[t] never decreases, except when a
keyword is first found through a later synonym that is highlighted (weight 2) and then through an earlier one
that is not (weight 1): Listing 1 takes the earlier synonym, so the count drops from 2 to 1.
"""
import dataclasses
import functools
import os
from typing import Sequence

import numpy as np

from diffchat_jax.data.examples import Example
from diffchat_jax.text.keywords import KeywordConfig, keywords, synonym_dict, tag_text


@dataclasses.dataclass(frozen=True)
class Reference:
    """What Listing 1 needs of (x_o, i, y_o): per keyword of y_o, its synonyms in order and their weights."""
    synonyms: tuple[tuple[str, ...], ...]  # [n_keywords] synonyms (multi-word ones space-separated)
    weights: tuple[tuple[int, ...], ...]  # [n_keywords] per synonym: 2 if it is highlighted, else 1


@functools.lru_cache(maxsize=1 << 12)
def reference(x_o: str, i: str, y_o: str, config: KeywordConfig = KeywordConfig()) -> Reference:
    """Keywords, highlighted keywords and synonyms of a reference; cached (PPO scores each prompt many times)."""
    y_o_keywords = keywords(y_o, config)
    x_o_lemmas = {k.lemma for k in keywords(x_o, config)}
    i_lemmas = {k.lemma for k in keywords(i, config)}
    highlighted = {k.lemma for k in y_o_keywords if k.lemma not in x_o_lemmas and k.lemma in i_lemmas}
    synonyms = tuple(tuple(dict.fromkeys(s for pos in k.pos for s in synonym_dict(k.lemma, pos)))
                     for k in y_o_keywords)
    weights = tuple(tuple(2 if s in highlighted else 1 for s in syns) for syns in synonyms)
    return Reference(synonyms=synonyms, weights=weights)


def ci_reference(example: Example) -> tuple[str, str, str]:
    """(x_o, i, y_o) of an example, with x and y standing in where the data has no x_o / y_o."""
    return (example.x if example.x_o is None else example.x_o, example.i,
            example.y if example.y_o is None else example.y_o)


def phrase_end(phrase: str, joined: str) -> int | None:
    """Index of the last word of the first occurrence of `phrase` in `joined` = " " + " ".join(words) + " "."""
    start = joined.find(f" {phrase} ")
    return None if start < 0 else joined.count(" ", 0, start + 1 + len(phrase)) - 1


def keyword_steps(ref: Reference, lemmas: Sequence[str]) -> list[tuple[int, int]]:
    """Listing 1's count as steps over y's words: (w, dc) = the count changes by dc once words 0..w are known.

    For one keyword, the count is the weight of its first synonym (in synonym order) among the known words, so
    synonym j decides it from the word that completes j until an earlier synonym is complete too. The sum of all
    dc is the count of the whole text.
    """
    first = {}
    for w, lemma in enumerate(lemmas):
        first.setdefault(lemma, w)
    joined = " " + " ".join(lemmas) + " "
    steps = []
    for synonyms, weights in zip(ref.synonyms, ref.weights):
        earliest = None  # where the earliest complete synonym seen so far in the order completes
        for synonym, weight in zip(synonyms, weights):
            end = phrase_end(synonym, joined) if " " in synonym else first.get(synonym)
            if end is not None and (earliest is None or end < earliest):
                steps.append((end, weight))
                if earliest is not None:
                    steps.append((earliest, -weight))
                earliest = end
    return steps


def ci_score(x_o: str, i: str, y_o: str, y: str, threshold: float = 0.7,
             config: KeywordConfig = KeywordConfig()) -> float:
    """Listing 1: the content integrity of y against the reference (x_o, i, y_o); 0 below the threshold."""
    ref = reference(x_o, i, y_o, config)
    count = sum(dc for _, dc in keyword_steps(ref, tag_text(y, config.tagger).lemmas))
    score = min(count / len(ref.synonyms), 1.0) if ref.synonyms else 1.0
    return score if score >= threshold else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Prefix CI (VCI).
# ---------------------------------------------------------------------------------------------------------------
def prefix_lengths(row: list[int], text: str, pieces: dict[int, str], tokenizer) -> np.ndarray:
    """[T] characters of `text` that row[:t+1] decodes to (the common prefix of the two decodes)."""
    if "".join(pieces[t] for t in row) == text:  # the common case: the tokens decode one by one
        return np.cumsum([len(pieces[t]) for t in row])
    # Split multi-byte characters, decoders that merge or clean up across tokens: decode every prefix.
    prefixes = tokenizer.batch_decode([row[:t + 1] for t in range(len(row))], skip_special_tokens=True)
    return np.maximum.accumulate([len(os.path.commonprefix([p, text])) for p in prefixes])


def prefix_ci_batch(references: Sequence[tuple[str, str, str]], response_ids, tokenizer, lengths=None,
                    config: KeywordConfig = KeywordConfig()) -> np.ndarray:
    """The CI of every response prefix, for a rollout batch (see the module docstring).

    Args:
        references: B triples (x_o, i, y_o), e.g. from `ci_reference`.
        response_ids: [B, T] int token ids of the responses (EOS included where generated), padded after them.
        tokenizer: the tokenizer of the ids; decoded with skip_special_tokens=True.
        lengths: [B] tokens in each response; None = all T. Positions t >= lengths[b] repeat the final value.
    Returns:
        [B, T] float32 CI before thresholding; [b, t] is the CI of the prefix that ends with token t.
    """
    ids = np.asarray(response_ids)
    batch, steps = ids.shape
    if len(references) != batch:
        raise ValueError(f"{len(references)} references for {batch} responses")
    lengths = np.full(batch, steps) if lengths is None else np.asarray(lengths)
    rows = [row[:n].tolist() for row, n in zip(ids, lengths)]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    unique = sorted({t for row in rows for t in row})
    pieces = dict(zip(unique, tokenizer.batch_decode([[t] for t in unique], skip_special_tokens=True)))
    out = np.empty((batch, steps), np.float32)
    for b, (triple, row, text) in enumerate(zip(references, rows, texts)):
        ref = reference(*triple, config)
        tagged = tag_text(text, config.tagger)
        deltas = np.zeros(steps)
        if row:
            # The token at which each word is complete: the next character is in, or the response has ended.
            ends = np.searchsorted(prefix_lengths(row, text, pieces, tokenizer), tagged.ends, side="right")
            done = np.minimum(ends, len(row) - 1)
            for w, dc in keyword_steps(ref, tagged.lemmas):
                deltas[done[w]] += dc
        counts = np.cumsum(deltas)
        out[b] = np.minimum(counts / len(ref.synonyms), 1.0) if ref.synonyms else 1.0
    return out


def prefix_ci(x_o: str, i: str, y_o: str, response_ids, tokenizer,
              config: KeywordConfig = KeywordConfig()) -> np.ndarray:
    """[T] prefix CI of one response of token ids [T] (see prefix_ci_batch)."""
    return prefix_ci_batch([(x_o, i, y_o)], np.asarray(response_ids)[None], tokenizer, config=config)[0]
