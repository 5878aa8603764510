"""The prompt template T, tokenisation of (x, i, y) examples for SFT, and deterministic batching.

A sequence is `prompt tokens ++ response tokens ++ padding`, where
    prompt   = tokenize(T(x, i))          (no special tokens)
    response = tokenize(" " + y) + [EOS]  (no special tokens)
The two parts are tokenised SEPARATELY and concatenated, because that is exactly what a sampler sees at inference
time (the prompt's tokens, then the generated ones); byte-level BPE would otherwise be free to merge across the
"Output:" / " y" boundary, and training and generation would disagree.

Labels: the label at position t is input_ids[t], and loss_mask[t] = 1 exactly for the y tokens and EOS. With a
causal LM the logits at position t-1 predict token t, so the SFT loss is
    cross_entropy(logits[:, :-1], input_ids[:, 1:]) weighted by loss_mask[:, 1:].
loss_mask[:, 0] is always 0 (the prompt is never empty).
"""
import dataclasses

import numpy as np

from diffchat_jax import errors
from diffchat_jax.data.examples import Example

TEMPLATE = ("Instruction: Give a description of the image and a modification to generate a drawing prompt.\n"
            "Input: {x}\nModification: {i}\nOutput:")
MAX_REPORTED_INDICES = 5  # truncated / over-long examples listed by index in a TokenizeReport


def render_prompt(x: str, i: str) -> str:
    """T(x, i): the prompt the model continues with " " + y."""
    return TEMPLATE.format(x=x, i=i)


def response_text(y: str) -> str:
    """The response text; its tokens are followed by EOS."""
    return " " + y


@dataclasses.dataclass(frozen=True)
class TokenizedData:
    """Right-padded token arrays, all int32; row n comes from examples[example_index[n]]."""
    input_ids: np.ndarray  # [N, L] prompt ++ response ++ pad ids
    attention_mask: np.ndarray  # [N, L] 1 on prompt and response tokens, 0 on padding
    loss_mask: np.ndarray  # [N, L] 1 on the response tokens (y and EOS): the tokens the model must predict
    prompt_lengths: np.ndarray  # [N] tokens in the (possibly truncated) prompt
    example_index: np.ndarray  # [N] index of the source example (over-long examples are skipped)

    def __len__(self) -> int:
        return len(self.input_ids)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


@dataclasses.dataclass
class TokenizeReport:
    n_in: int
    n_kept: int
    n_truncated: int  # x shortened so that prompt + response fit in max_length
    truncated_indices: list[int]  # the first MAX_REPORTED_INDICES, as indices into the examples
    n_overlong: int  # did not fit even with x empty; skipped
    overlong_indices: list[int]  # the first MAX_REPORTED_INDICES
    max_tokens: int  # longest kept sequence (prompt + response), before padding
    mean_tokens: float

    def summary(self) -> str:
        text = (f"tokenized {self.n_kept}/{self.n_in} examples; {self.n_truncated} with x truncated, "
                f"{self.n_overlong} over-long skipped; tokens per sequence: max {self.max_tokens}, "
                f"mean {self.mean_tokens:.1f}")
        if self.n_overlong:
            text += f" (over-long e.g. examples {self.overlong_indices})"
        return text


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens; one batched call (a fast tokenizer encodes the batch in parallel)."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # it fails on []


def fit_prompt(tokenizer, example: Example, budget: int) -> list[int] | None:
    """The longest prompt of at most `budget` tokens with x cut token-wise from its end; None if even x = "" is
    too long. Assumes the example does not fit whole."""
    x_ids = encode(tokenizer, [example.x])[0]

    def prompt_ids(keep):
        # A cut inside a multi-byte character decodes to U+FFFD: drop it rather than teach the model garbage.
        x = tokenizer.decode(x_ids[:keep], skip_special_tokens=True).rstrip("\ufffd").rstrip()
        return encode(tokenizer, [render_prompt(x, example.i)])[0]

    best = prompt_ids(0)
    if len(best) > budget:
        return None
    # Binary search for the largest fitting x prefix: the prompt length (nearly) grows with the prefix.
    lo, hi = 0, len(x_ids) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ids = prompt_ids(mid)
        if len(ids) <= budget:
            lo, best = mid, ids
        else:
            hi = mid - 1
    return best


def tokenize_examples(examples: list[Example], tokenizer, max_length: int, *,
                      on_overlong: str = "skip") -> tuple[TokenizedData, TokenizeReport]:
    """Tokenises examples into right-padded [N, max_length] arrays (see the module docstring for the layout).

    If prompt + response is longer than max_length, x is shortened (token-wise, from its end, re-rendering the
    template) until it fits, so that y stays whole; such examples count as truncated. An example that does not fit
    even with x empty is over-long: skipped and counted (on_overlong="skip") or an errors.DataError
    (on_overlong="error").
    The pad id is tokenizer.pad_token_id, or EOS where the tokenizer has none.
    """
    if on_overlong not in ("skip", "error"):
        raise errors.ConfigError(f"on_overlong (data.on_bad_row) must be 'skip' or 'error', got {on_overlong!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    prompts = encode(tokenizer, [render_prompt(e.x, e.i) for e in examples])
    responses = [ids + [eos] for ids in encode(tokenizer, [response_text(e.y) for e in examples])]

    kept, truncated, overlong = [], [], []
    for index, (prompt, response) in enumerate(zip(prompts, responses)):
        if len(prompt) + len(response) > max_length:
            # The slow path: only the examples that do not fit come here.
            prompt = fit_prompt(tokenizer, examples[index], max_length - len(response))
            if prompt is None:
                if on_overlong == "error":
                    raise errors.DataError(
                        f"example {index}: the response alone ({len(response)} tokens) and the prompt with x empty "
                        f"do not fit in max_length={max_length}; raise data.max_length, or set data.on_bad_row=skip")
                overlong.append(index)
                continue
            truncated.append(index)
        kept.append((index, prompt, response))

    n = len(kept)
    input_ids = np.full((n, max_length), pad, np.int32)
    attention_mask = np.zeros((n, max_length), np.int32)
    loss_mask = np.zeros((n, max_length), np.int32)
    prompt_lengths = np.zeros(n, np.int32)
    lengths = np.zeros(n, np.int32)
    for row, (_, prompt, response) in enumerate(kept):
        p, length = len(prompt), len(prompt) + len(response)
        input_ids[row, :length] = prompt + response
        attention_mask[row, :length] = 1
        loss_mask[row, p:length] = 1
        prompt_lengths[row], lengths[row] = p, length
    data = TokenizedData(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                         prompt_lengths=prompt_lengths,
                         example_index=np.array([index for index, _, _ in kept], np.int32))
    report = TokenizeReport(
        n_in=len(examples), n_kept=n,
        n_truncated=len(truncated), truncated_indices=truncated[:MAX_REPORTED_INDICES],
        n_overlong=len(overlong), overlong_indices=overlong[:MAX_REPORTED_INDICES],
        max_tokens=int(lengths.max(initial=0)), mean_tokens=float(lengths.mean()) if n else 0.0)
    return data, report


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Batches per epoch of `batches`."""
    return n // batch_size if drop_remainder else -(-n // batch_size)


def batches(data: TokenizedData, batch_size: int, *, seed: int, epoch: int, drop_remainder: bool = True,
            start: int = 0):
    """Yields one epoch of batches: dicts of the TokenizedData arrays, each [B, ...] with B = batch_size.

    The order is a permutation that depends only on (seed, epoch), so training resumes exactly at global step k
    with epoch = k // num_batches(...) and start = k % num_batches(...). With drop_remainder=False the last batch
    may be smaller.
    """
    arrays = data.as_dict()
    order = np.random.default_rng((seed, epoch)).permutation(len(data))
    for b in range(start, num_batches(len(data), batch_size, drop_remainder)):
        idx = order[b * batch_size:(b + 1) * batch_size]
        yield {name: array[idx] for name, array in arrays.items()}
