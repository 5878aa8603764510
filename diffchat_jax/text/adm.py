"""ADM pi- (paper section 3.3, eq. 4): per-sample plans that take keywords out of the action space or steer them to
other keywords, as fixed-shape token-id arrays for the jitted sampler.

Planning (host side, numpy, reproducible from `seed`):
1. Vocabulary (`build_vocab`): the keywords of the training set's target prompts by POS (WordNet POS of
   keywords.py: "n", "v", "a"; a keyword tagged with several POS counts under each), with counts = the number of
   texts each occurs in.
2. Each sample of a batch becomes a negative with probability `negative_fraction` (one draw per sample). A
   negative picks `keywords_per_negative` keywords of its reference (the CI reference: y_o, or y where the data
   has none, so the edits are exactly what CI checks), uniformly without repeats, and for each one draws:
   remove with probability `remove_prob`, else replace by a vocabulary keyword with the keyword's first POS that
   is neither in its synonym dictionary (over all its POS) nor a keyword of the same reference, drawn in proportion
   to its count (common words, as real replacement errors are). With no such candidate the keyword is removed.
   A reference without keywords gets no plan.
3. Spellings. A keyword is written several ways: its lemma and its forms in the reference, as written and
   lower-cased ("Cats" -> "cat", "Cats", "cats"), each with and without a leading space (byte-level BPE tokenises
   " cat" after a space and "cat" after punctuation or at the start differently). A replacement is spelled alike:
   the same leading space, capitalised or upper-cased like the form, as its lemma (not inflected). Spellings are
   encoded without special tokens, deduplicated by token ids (a tokenizer that adds a prefix space makes the two
   variants one), and kept when 1..max_tokens tokens long (both sides, for a replacement). This assumes a
   tokenizer in which a word's tokens depend only on the word and its leading space (byte-level BPE with a
   pre-tokenizer, as BLOOM's and GPT-2's), so the same ids appear wherever the model writes the word.

Plan format (`AdmPlan`; numpy; B = batch, K = max_sequences, L = max_tokens; shapes depend only on (B, K, L), so
a jitted sampler compiles once):
    negative    [B]        bool   the sample is a pi- negative: it has at least one ban or steer row (the others
                                  are sampled with pi+).
    ban         [B, K, L]  int32  token sequences taken out of the action space, one per row, left-aligned,
                                  padded with -1; unused rows are all -1.
    steer_from  [B, K, L]  int32  token sequences steered to another keyword, same layout.
    steer_to    [B, K, L]  int32  row k is what steer_from row k is steered to (same layout; a row is used in
                                  both arrays or in neither).
    edits       B tuples of `Edit` (the keyword, the replacement or None for a removal): the plan in words;
                empty where negative is False.
  Rows fill from k = 0 in edit order, then spelling order (lemma first, leading space first); spellings beyond K
  rows are dropped.
  The contract for the sampler, at every step of sample b (s, f, g = the entries >= 0 of a row):
    ban:   if the response so far ends with s[:-1] (always, when len(s) == 1), token s[-1] gets probability 0
           (transformers' bad_words_ids rule), so the keyword's tokens never complete.
    steer: if the sampler draws f[0], it emits g[0] instead, then g[1:] on the next len(g) - 1 steps (forced, no
           ban or steer applied to them); the lowest matching row wins. For a one-token keyword this is exactly
           "the keyword's token becomes the replacement's"; a longer f is steered at its first token, so words that
           start with the same token are replaced too, which only makes a negative more wrong. Steering at the
           first token is what a sampler can do without taking back tokens it has emitted.
  Rows apply at every step: a keyword is removed or replaced wherever the model would write it.
"""
import collections
import dataclasses
from typing import Iterable, Sequence

import numpy as np

from diffchat_jax.data.tokenize import encode
from diffchat_jax.text.keywords import Keyword, KeywordConfig, keywords, synonym_dict


@dataclasses.dataclass(frozen=True)
class KeywordVocab:
    config: KeywordConfig  # the keyword knobs it was built with; plans read references with the same
    lemmas: dict[str, tuple[str, ...]]  # POS -> [V_pos] keywords, sorted
    counts: dict[str, np.ndarray]  # POS -> [V_pos] int64 number of texts each keyword occurs in


@dataclasses.dataclass(frozen=True)
class Edit:
    keyword: Keyword
    replacement: str | None  # a vocabulary keyword, or None: remove


@dataclasses.dataclass(frozen=True)
class AdmPlan:
    """The pi- plans of a batch; the format and the sampler contract are in the module docstring."""
    negative: np.ndarray  # [B] bool
    ban: np.ndarray  # [B, K, L] int32, -1 padded
    steer_from: np.ndarray  # [B, K, L] int32, -1 padded
    steer_to: np.ndarray  # [B, K, L] int32, -1 padded
    edits: tuple[tuple[Edit, ...], ...]  # [B]


def build_vocab(texts: Iterable[str], config: KeywordConfig = KeywordConfig()) -> KeywordVocab:
    """The keyword vocabulary by POS of training texts (the target prompts y, and y_o where the data has it)."""
    counter = collections.Counter((pos, k.lemma) for text in texts for k in keywords(text, config) for pos in k.pos)
    lemmas, counts = collections.defaultdict(list), collections.defaultdict(list)
    for (pos, lemma), n in sorted(counter.items()):
        lemmas[pos].append(lemma)
        counts[pos].append(n)
    return KeywordVocab(config=config, lemmas={pos: tuple(v) for pos, v in lemmas.items()},
                        counts={pos: np.array(v, np.int64) for pos, v in counts.items()})


def pick_replacement(keyword: Keyword, vocab: KeywordVocab, exclude: set[str], rng: np.random.Generator) -> str | None:
    """A count-weighted vocabulary keyword of the keyword's first POS, no synonym of it, not in `exclude`."""
    pos = keyword.pos[0]
    candidates = vocab.lemmas.get(pos, ())
    synonyms = {s for p in keyword.pos for s in synonym_dict(keyword.lemma, p)}
    weights = np.array([n if c not in synonyms and c not in exclude else 0
                        for c, n in zip(candidates, vocab.counts.get(pos, ()))], np.float64)
    total = weights.sum()
    return candidates[rng.choice(len(candidates), p=weights / total)] if total > 0 else None


def plan_edits(reference: str, vocab: KeywordVocab, rng: np.random.Generator, keywords_per_negative: int,
               remove_prob: float) -> tuple[Edit, ...]:
    found = keywords(reference, vocab.config)
    own = {k.lemma for k in found}
    edits = []
    for j in rng.choice(len(found), size=min(keywords_per_negative, len(found)), replace=False):
        replacement = None if rng.random() < remove_prob else pick_replacement(found[j], vocab, own, rng)
        edits.append(Edit(found[j], replacement))
    return tuple(edits)


def like(word: str, form: str) -> str:
    """`word` cased like `form`: all caps like "CAT", capitalised like "Cat" (or "C"), else as it is."""
    if len(form) > 1 and form.isupper():
        return word.upper()
    return word[:1].upper() + word[1:] if form[:1].isupper() else word


def spellings(edit: Edit) -> list[tuple[str, str | None]]:
    """(keyword spelling, replacement spelled alike or None) for each way of writing the keyword."""
    k = edit.keyword
    forms = dict.fromkeys([k.lemma, *k.forms, *(f.lower() for f in k.forms)])
    return [(space + form, None if edit.replacement is None else space + like(edit.replacement, form))
            for form in forms for space in (" ", "")]


def token_rows(edits: Sequence[Edit], tokenizer,
               max_tokens: int) -> tuple[list[list[int]], list[tuple[list[int], list[int]]]]:
    """The ban rows and (from, to) steer rows of one sample's edits: deduplicated, 1..max_tokens tokens each."""
    pairs = [pair for edit in edits for pair in spellings(edit)]
    froms = encode(tokenizer, [f for f, _ in pairs])
    tos = encode(tokenizer, [t or "" for _, t in pairs])
    bans, steers, seen = [], [], set()
    for (_, to_text), f, t in zip(pairs, froms, tos):
        if tuple(f) in seen or not 0 < len(f) <= max_tokens or len(t) > max_tokens:
            continue
        seen.add(tuple(f))
        if to_text is None:
            bans.append(f)
        else:
            steers.append((f, t))
    return bans, steers


def fill(out: np.ndarray, rows: Sequence[list[int]]) -> None:
    """Writes rows left-aligned into out [K, L] (pre-filled with -1); rows beyond K are dropped."""
    for k, row in enumerate(rows[:len(out)]):
        out[k, :len(row)] = row


def make_plans(references: Sequence[str], vocab: KeywordVocab, tokenizer, *, seed, negative_fraction: float = 0.04,
               remove_prob: float = 0.5, keywords_per_negative: int = 1, max_sequences: int = 8,
               max_tokens: int = 8, positions: Sequence[int] | None = None) -> AdmPlan:
    """The pi- plans of a batch (see the module docstring); the keyword args are `config.adm`.

    Args:
        references: B CI references (y_o, or y where the data has none: `integrity.ci_reference(e)[2]`).
        vocab: from `build_vocab` on the training set.
        tokenizer: the policy's tokenizer.
        seed: an int or tuple of ints, e.g. (config.seed, step): the same seed, the same plans.
        positions: each reference's position in the whole batch (when a host plans its own rows); None = 0 .. B-1.
            Row b draws from its own generator, seeded by (seed, positions[b]), so its plan does not depend on
            the rows beside it.
    """
    batch = len(references)
    positions = range(batch) if positions is None else positions
    rngs = [np.random.default_rng([*np.ravel(seed).tolist(), int(p)]) for p in positions]
    chosen = np.array([rng.random() < negative_fraction for rng in rngs], bool)
    ban = np.full((batch, max_sequences, max_tokens), -1, np.int32)
    steer_from, steer_to = ban.copy(), ban.copy()
    edits = [()] * batch
    for b in np.flatnonzero(chosen):
        sample_edits = plan_edits(references[b], vocab, rngs[b], keywords_per_negative, remove_prob)
        bans, steers = token_rows(sample_edits, tokenizer, max_tokens)
        fill(ban[b], bans)
        fill(steer_from[b], [f for f, _ in steers])
        fill(steer_to[b], [t for _, t in steers])
        edits[b] = sample_edits if bans or steers else ()
    negative = (ban[:, :, 0] >= 0).any(1) | (steer_from[:, :, 0] >= 0).any(1)
    return AdmPlan(negative=negative, ban=ban, steer_from=steer_from, steer_to=steer_to, edits=tuple(edits))
