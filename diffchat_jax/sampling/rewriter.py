"""A trained DiffChat model as a prompt rewriter: (x, i) -> the target prompt y, with the jitted sampler.

    rewriter = Rewriter.load("workdirs/demo/ppo", Decoding(greedy=True))   # an SFT/PPO workdir or its export
    ys = rewriter.rewrite(["a cat on a sofa"], ["make it snow"]).texts

The evaluation's `model:PATH` system and the chat use it. A row's tokens depend on (its prompt, decoding.seed, its
position) only: rows are sampled in jitted chunks of `decoding.batch_size` split over the `data` mesh, prompts
left-padded to a multiple of PROMPT_BUCKET tokens (few compiled shapes, however long the prompts), and row r draws
with fold_in(key(seed), position r) (rollout.generate), so the split into chunks changes nothing.
A prompt longer than `decoding.max_prompt_tokens` keeps the longest start of x that fits (tokenize.fit_prompt),
and the result says which rows were cut.
"""
import dataclasses
import functools
from typing import Callable, Sequence

import jax
import numpy as np

from diffchat_jax.data import tokenize as tokenize_lib, tokenizer as tokenizer_lib
from diffchat_jax.data.examples import Example
from diffchat_jax.models import bloom
from diffchat_jax.sampling import rollout
from diffchat_jax.utils import mesh as mesh_lib
from diffchat_jax.utils.validate import DTYPES, one_of, require

PROMPT_BUCKET = 32  # prompts are left-padded to a multiple of this many tokens


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How a rewriter decodes. greedy: argmax (deterministic; the default of the eval); else a draw with
    `temperature` and locally typical sampling of `typical_mass` (ADM pi+, eq. 3; 1 = off), keyed by `seed`."""
    greedy: bool = True
    typical_mass: float = 0.97
    temperature: float = 1.0
    seed: int = 0
    max_new_tokens: int = 128
    max_prompt_tokens: int = 384
    batch_size: int = 16  # rows per jitted call
    dtype: str = "float32"  # the model's compute dtype

    def __post_init__(self):
        require(self.max_prompt_tokens >= 16, "decoding.max_prompt_tokens",
                f"must be >= 16, got {self.max_prompt_tokens}")
        require(self.batch_size >= 1, "decoding.batch_size", f"must be >= 1, got {self.batch_size}")
        one_of(self.dtype, DTYPES, "decoding.dtype")

    @classmethod
    def from_config(cls, c) -> "Decoding":
        return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls) if f.name in c})

    def sampling(self, tokenizer) -> rollout.SamplingConfig:
        return rollout.SamplingConfig(
            max_new_tokens=self.max_new_tokens, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
            greedy=self.greedy, temperature=self.temperature, typical_mass=self.typical_mass,
            banned_ids=rollout.banned_special_ids(tokenizer))


@dataclasses.dataclass(frozen=True)
class Rewrites:
    texts: list[str]  # [R] the target prompts
    truncated: list[bool]  # [R] x was cut to fit decoding.max_prompt_tokens
    lengths: list[int]  # [R] response tokens (EOS included)


@functools.lru_cache(maxsize=8)
def jitted_generate(model_config: bloom.BloomConfig, sampling: rollout.SamplingConfig):
    """One jitted sampler per (architecture, sampling settings): rewriters of models of the same shape (the SFT and
    PPO models of one run) share its compilations."""
    return jax.jit(functools.partial(rollout.generate, bloom.Bloom(model_config), config=sampling))


class Rewriter:
    """See the module docstring. `module`, `params`: a bloom.Bloom and its params; `tokenizer`: the model's."""

    def __init__(self, module: bloom.Bloom, params, tokenizer, decoding: Decoding = Decoding(), mesh=None):
        self.module, self.tokenizer, self.decoding = module, tokenizer, decoding
        self.mesh = mesh or mesh_lib.make_mesh(jax.local_devices())
        self.params = mesh_lib.replicate(params, self.mesh)
        self.key = mesh_lib.replicate(jax.random.PRNGKey(decoding.seed), self.mesh)
        self._generate = jitted_generate(module.config, decoding.sampling(tokenizer))
        self._generate_streamed = jitted_generate(module.config,
                                                  dataclasses.replace(decoding.sampling(tokenizer), stream=True))

    @classmethod
    def load(cls, path: str, decoding: Decoding = Decoding(), mesh=None) -> "Rewriter":
        """From an SFT / PPO workdir (its export/), a transformers BLOOM folder with its tokenizer, or a hub id."""
        folder = bloom.resolve_model_dir(path)
        module, params = bloom.load_pretrained(folder, dtype=DTYPES[decoding.dtype])
        return cls(module, params, tokenizer_lib.load_tokenizer(folder), decoding, mesh)

    def prompt_ids(self, x: str, i: str) -> tuple[list[int], bool]:
        """Template T(x, i) as token ids, and whether x was cut to fit decoding.max_prompt_tokens."""
        ids = tokenize_lib.encode(self.tokenizer, [tokenize_lib.render_prompt(x, i)])[0]
        budget = self.decoding.max_prompt_tokens
        if len(ids) <= budget:
            return ids, False
        fitted = tokenize_lib.fit_prompt(self.tokenizer, Example(x=x, i=i, y=""), budget)
        require(fitted is not None, "decoding.max_prompt_tokens",
                f"is {budget} tokens, but the instruction alone needs more: {i[:80]!r}")
        return fitted, True

    def rewrite_streamed(self, x: str, instruction: str, on_text: Callable[[str], None]) -> Rewrites:
        """rewrite([x], [instruction]), calling on_text(the target prompt so far) each time the drawn tokens add
        text (a character split over tokens waits for its last one). The same tokens as `rewrite`: only a
        callback is added to the jitted loop. on_text runs on JAX's callback thread, in token order."""
        eos, tokens, shown = self.tokenizer.eos_token_id, [], [""]

        def listen(step, row_tokens):
            token = int(row_tokens[0])
            if step != len(tokens) or (tokens and tokens[-1] == eos):
                return  # after EOS (the loop runs on while other rows draw; there are none here)
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            if text != shown[0] and not text.endswith("\ufffd"):
                shown[0] = text
                on_text(text)

        with rollout.streaming(listen):
            return self._rewrite([x], [instruction], None, self._generate_streamed)

    def rewrite(self, xs: Sequence[str], instructions: Sequence[str],
                positions: Sequence[int] | None = None) -> Rewrites:
        """Target prompts of rows (xs[r], instructions[r]); positions: each row's place in the whole set (row r's
        draws use it; default 0 .. R-1), so a subset rewrites as it would in the whole set."""
        return self._rewrite(xs, instructions, positions, self._generate)

    def _rewrite(self, xs, instructions, positions, generate_fn) -> Rewrites:
        if len(xs) != len(instructions):
            raise ValueError(f"{len(xs)} prompts but {len(instructions)} instructions")
        if not len(xs):
            return Rewrites([], [], [])
        encoded = [self.prompt_ids(x, i) for x, i in zip(xs, instructions)]
        width = -(-max(len(ids) for ids, _ in encoded) // PROMPT_BUCKET) * PROMPT_BUCKET
        pad = self.tokenizer.pad_token_id
        ids = np.full((len(xs), width), pad, np.int32)
        mask = np.zeros((len(xs), width), np.int32)
        for r, (row, _) in enumerate(encoded):  # left-padded: every prompt ends at column width - 1
            ids[r, width - len(row):], mask[r, width - len(row):] = row, 1
        positions = np.arange(len(xs)) if positions is None else np.asarray(positions)

        def generate(ids, mask, positions):
            out = generate_fn(self.params, ids, mask, self.key, positions=positions)
            return np.concatenate([np.asarray(out.tokens), np.asarray(out.mask).sum(1, keepdims=True)], axis=1)

        out = mesh_lib.map_in_chunks(generate, [ids, mask, positions.astype(np.int32)], self.decoding.batch_size,
                                     self.mesh)
        tokens, lengths = out[:, :-1], out[:, -1]  # lengths: generated tokens, EOS included
        texts = [s.strip() for s in self.tokenizer.batch_decode(
            [t[:n] for t, n in zip(tokens, lengths)], skip_special_tokens=True)]
        return Rewrites(texts, [cut for _, cut in encoded], [int(n) for n in lengths])
