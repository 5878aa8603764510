"""Loading a pretrained tokenizer, and training a small BLOOM-like byte-level BPE one for tiny configs."""
import os

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from diffchat_jax.data.examples import Example
from diffchat_jax.data.tokenize import render_prompt, response_text

# BLOOM's special tokens, in BLOOM's id order (0..3).
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"


def load_tokenizer(path_or_id: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """AutoTokenizer.from_pretrained, with an EOS token required and the pad token falling back to EOS."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(path_or_id))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{path_or_id}: the tokenizer has no EOS token, which ends every response; set eos_token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_bpe_tokenizer(texts: list[str], vocab_size: int,
                        out_dir: str | os.PathLike) -> transformers.PreTrainedTokenizerFast:
    """Trains a byte-level BPE like BLOOM's (no prefix space; specials <unk> <s> </s> <pad> = ids 0..3).

    Every byte is in the vocabulary, so any text round-trips: decode(encode(s)) == s. Deterministic for the same
    texts. Saved with save_pretrained to out_dir, so AutoTokenizer.from_pretrained(out_dir) reloads it.
    """
    n_reserved = len(pre_tokenizers.ByteLevel.alphabet()) + 4
    if vocab_size < n_reserved:
        raise ValueError(f"vocab_size must be at least {n_reserved} (256 bytes + 4 special tokens), got {vocab_size}")
    bpe = tokenizers.Tokenizer(models.BPE(unk_token=UNK))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token=UNK, bos_token=BOS,
                                                     eos_token=EOS, pad_token=PAD)
    tokenizer.save_pretrained(os.fspath(out_dir))
    return tokenizer


def sample_corpus(examples: list[Example]) -> list[str]:
    """Training texts for a tiny tokenizer: each example as the model sees it (T(x, i) + " " + y), plus x_o, y_o where new."""
    texts = []
    for e in examples:
        texts.append(render_prompt(e.x, e.i) + response_text(e.y))
        texts.extend(t for t in (e.x_o, e.y_o) if t is not None and t not in (e.x, e.y))
    return texts
