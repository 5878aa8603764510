"""The jitted decode loop: a left-padded prompt batch -> sampled responses, with ADM pi+ / pi- (paper section 3.3).

    rollout = generate(model, params, prompt_ids, prompt_mask, key, config, plan=None)

Prefill: the whole prompt in one forward pass into the KV cache (bloom.Bloom's protocol). Then a lax.while_loop, one
token per iteration for the whole batch: transforms -> draw -> ADM steering -> record -> one-token forward. It stops
when every sample has emitted EOS or after max_new_tokens; all in one jitted call, no host round trip per token.
Under a `data` mesh (inputs from mesh.shard_batch, params replicated) XLA splits the batch across devices.

Step t (the number of tokens generated so far, the same for every sample):
  1. Transforms in config.order, skipping the disabled ones:
       min_new_tokens  EOS removed while t < min_new_tokens
       ban             config.banned_ids, and the ADM pi- bans (below)
       temperature, top_k, top_p, typical: the warpers; skipped when greedy (as in transformers).
     typical is ADM pi+ (eq. 3): it applies to every sample that is not a pi- negative.
  2. Draw with the row's key fold_in(fold_in(key, position), t) (logits.sample_rows), or argmax when greedy: a
     row's tokens depend on its position in the global batch, not on how the batch is split into calls or hosts.
  3. ADM pi- (eq. 4), the contract of diffchat_jax/text/adm.py, per sample (only negatives have rows):
       ban:   a row s bans s[-1] while the response so far ends with s[:-1]; the last L - 1 response tokens are in
              the loop carry, so multi-token rows are a small state machine.
       steer: drawing the first token of a steer_from row (the lowest such row) emits the first token of its
              steer_to row instead and queues the rest, which the next steps emit with no transform, ban or steer.
  4. Record the token, its mask and log-probability; a sample is done after EOS.
"""
import dataclasses
import functools

import contextlib
import threading

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import io_callback

from diffchat_jax.models import bloom
from diffchat_jax.sampling import logits as logits_lib
from diffchat_jax.utils.validate import names, require

ORDER = ("min_new_tokens", "ban", "temperature", "top_k", "top_p", "typical")  # transformers' order
WARPERS = ("temperature", "top_k", "top_p", "typical")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampler settings (hashable: a jit static argument); `from_config(config.sampling, ...)` builds one."""
    max_new_tokens: int
    eos_id: int
    pad_id: int  # written after EOS
    min_new_tokens: int = 0
    greedy: bool = False  # argmax; the warpers are skipped
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    typical_mass: float = 1.0  # 1: off
    order: tuple[str, ...] = ORDER
    # Token ids never sampled, e.g. the tokenizer's special tokens other than EOS: a decoder drops them, so a
    # policy free to emit them can shorten its text without writing anything (reward hacking).
    banned_ids: tuple[int, ...] = ()
    # After every step, hand (step, tokens [B]) to the listener of `streaming()` from inside the jitted loop (an
    # ordered io_callback, so in step order): the chat shows a rewrite token by token. Off in training.
    stream: bool = False

    def __post_init__(self):
        require(self.max_new_tokens >= 1, "sampling.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(0 <= self.min_new_tokens <= self.max_new_tokens, "sampling.min_new_tokens",
                f"must be in [0, max_new_tokens], got {self.min_new_tokens}")
        require(self.temperature > 0, "sampling.temperature", f"must be > 0, got {self.temperature}")
        require(self.top_k >= 0, "sampling.top_k", f"must be >= 0, got {self.top_k}")
        require(0 < self.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        require(0 < self.typical_mass <= 1, "sampling.typical_mass", f"must be in (0, 1], got {self.typical_mass}")
        require(sorted(self.order) == sorted(ORDER), "sampling.order",
                f"must name each of {list(ORDER)} once, got {list(self.order)}")

    @classmethod
    def from_config(cls, sampling, eos_id: int, pad_id: int) -> "SamplingConfig":
        """From the `config.sampling` ConfigDict and the tokenizer's EOS / pad ids."""
        order = names(sampling.order, "sampling.order", ORDER)  # as typed: ("ban", ...), "ban,top_k,..."
        return cls(eos_id=eos_id, pad_id=pad_id, **{**sampling.to_dict(), "order": order})

    @property
    def active(self) -> tuple[str, ...]:
        """The transforms that change anything, in order."""
        on = dict(min_new_tokens=self.min_new_tokens > 0, ban=True, temperature=self.temperature != 1,
                  top_k=self.top_k > 0, top_p=self.top_p < 1, typical=self.typical_mass < 1)
        return tuple(name for name in self.order if on[name] and not (self.greedy and name in WARPERS))


def banned_special_ids(tokenizer) -> tuple[int, ...]:
    """The tokenizer's special ids other than EOS: SamplingConfig.banned_ids for any sampler of this project."""
    return tuple(sorted(set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}))


@flax.struct.dataclass
class Plan:
    """The arrays of an adm.AdmPlan (format and contract in diffchat_jax/text/adm.py); B = batch, K rows, L tokens."""
    negative: jax.Array  # [B] bool
    ban: jax.Array  # [B, K, L] int32, rows left-aligned, -1 padded
    steer_from: jax.Array  # [B, K, L] int32
    steer_to: jax.Array  # [B, K, L] int32

    @classmethod
    def from_adm(cls, plan) -> "Plan":
        return cls(negative=np.asarray(plan.negative, bool), ban=np.asarray(plan.ban, np.int32),
                   steer_from=np.asarray(plan.steer_from, np.int32), steer_to=np.asarray(plan.steer_to, np.int32))

    @classmethod
    def empty(cls, batch: int) -> "Plan":
        rows = jnp.full((batch, 1, 1), -1, jnp.int32)  # one unused row
        return cls(negative=jnp.zeros(batch, bool), ban=rows, steer_from=rows, steer_to=rows)


@flax.struct.dataclass
class Rollout:
    """Sampled responses, each [B, N] with N = config.max_new_tokens.

    tokens    int32    response ids; pad_id after EOS.
    mask      int32    1 on the generated tokens, up to and including EOS.
    logprobs  float32  log-probability of the token under the distribution it was drawn from: the log-softmax of the
                       transformed logits at the token. A steered token adds the probability of the token steered to
                       it (and has none of its own if it is itself steered); a forced continuation has 0, as has
                       every position where mask is 0.
    steered   bool     ADM pi- put the token there: a steered first token or a forced continuation.
    """
    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    steered: jax.Array


@flax.struct.dataclass
class Rules:
    """A Plan in the form the steps use."""
    negative: jax.Array  # [B] bool
    ban_token: jax.Array  # [B, K] int32: the last token of each ban row; -1 for unused rows
    ban_context: jax.Array  # [B, K, L - 1] int32: the row's tokens before it, right-aligned
    ban_care: jax.Array  # [B, K, L - 1] bool: where ban_context holds a row token
    steer_first: jax.Array  # [B, K] int32: first token of each steer_from row; -1 if unused or a lower row's
    steer_to: jax.Array  # [B, K, L] int32


@flax.struct.dataclass
class Carry:
    step: jax.Array  # int32 scalar: tokens generated so far
    out: Rollout
    done: jax.Array  # [B] bool: EOS emitted
    token: jax.Array  # [B] int32: the token just recorded, fed to the next forward pass
    attention: jax.Array  # [B, S] int32: the cache slots written so far (bloom's cache mask)
    cache: bloom.KVCache
    recent: jax.Array  # [B, L - 1] int32: the last L - 1 response tokens, right-aligned, -1 before the response
    queue: jax.Array  # [B, L] int32: forced tokens still to emit, left-aligned, -1 padded


def make_rules(plan: Plan) -> Rules:
    ban, length = plan.ban, plan.ban.shape[-1]
    n = jnp.sum(ban >= 0, -1)  # [B, K] row lengths
    ban_token = jnp.where(n > 0, jnp.take_along_axis(ban, jnp.maximum(n - 1, 0)[..., None], -1)[..., 0], -1)
    # Context slot i holds row token i - length + n, so the context ends right before the banned token.
    j = jnp.arange(length - 1) - length + n[..., None]
    first = plan.steer_from[..., 0]
    repeat = jnp.tril(first[..., :, None] == first[..., None, :], -1).any(-1)  # the lowest row wins
    return Rules(negative=plan.negative, ban_token=ban_token,
                 ban_context=jnp.take_along_axis(ban, jnp.maximum(j, 0), -1), ban_care=j >= 0,
                 steer_first=jnp.where((first >= 0) & ~repeat, first, -1), steer_to=plan.steer_to)


def banned_tokens(rules: Rules, recent: jax.Array) -> jax.Array:
    """[B, K] int32: the tokens the ban rows remove after `recent`; -1 where none."""
    match = jnp.all(~rules.ban_care | (rules.ban_context == recent[:, None, :]), -1)
    return jnp.where(match, rules.ban_token, -1)


def transform(logits: jax.Array, config: SamplingConfig, step, banned: jax.Array, negative: jax.Array) -> jax.Array:
    """The configured chain on one step's logits [B, V]; banned [B, K] (ADM bans, -1 = none) joins
    config.banned_ids; negative [B] bool."""
    chain = {
        "min_new_tokens": lambda x: logits_lib.suppress_eos(x, config.eos_id, step < config.min_new_tokens),
        "ban": lambda x: logits_lib.ban(x, banned).at[:, list(config.banned_ids)].set(-jnp.inf),
        "temperature": lambda x: logits_lib.temperature(x, config.temperature),
        "top_k": lambda x: logits_lib.top_k(x, config.top_k),
        "top_p": lambda x: logits_lib.top_p(x, config.top_p),
        # pi- negatives sample from the whole vocabulary less their bans (eq. 4), not from the typical set.
        "typical": lambda x: jnp.where(negative[:, None], x, logits_lib.typical(x, config.typical_mass)),
    }
    for name in config.active:
        logits = chain[name](logits)
    return logits


def emitted_logprob(logp: jax.Array, token: jax.Array, rules: Rules) -> jax.Array:
    """[B] log-probability of emitting token [B] when drawing from logp [B, V] and steering: its own probability
    unless it is itself steered away, plus that of every token steered to it."""
    own = jnp.take_along_axis(logp, token[:, None], -1)
    own = jnp.where((rules.steer_first == token[:, None]).any(-1, keepdims=True), -jnp.inf, own)
    into = (rules.steer_first >= 0) & (rules.steer_to[..., 0] == token[:, None])
    moved = jnp.where(into, jnp.take_along_axis(logp, jnp.maximum(rules.steer_first, 0), -1), -jnp.inf)
    return jax.nn.logsumexp(jnp.concatenate([own, moved], -1), -1)


_LISTENER = None  # the function `streaming()` installed; called on JAX's callback thread
_LISTENER_LOCK = threading.Lock()  # one streamed generation at a time


@contextlib.contextmanager
def streaming(listener):
    """Within the block, a `generate` whose config has stream=True calls listener(step: int, tokens: [B] int32
    numpy) after each step (tokens: the step's token of every row; pad once a row is done)."""
    global _LISTENER  # pylint: disable=global-statement
    with _LISTENER_LOCK:
        _LISTENER = listener
        try:
            yield
        finally:
            _LISTENER = None


def _emit(step, tokens) -> None:
    if _LISTENER is not None:
        _LISTENER(int(step), np.asarray(tokens))


def push(rows: jax.Array, column: jax.Array) -> jax.Array:
    """rows [B, W] shifted left by one with column [B] appended (W may be 0)."""
    return jnp.concatenate([rows, column[:, None]], 1)[:, 1:]


def step(carry: Carry, logits: jax.Array, row_keys: jax.Array, config: SamplingConfig, rules: Rules) -> Carry:
    """Chooses and records token carry.step of every sample from its model logits [B, V] float32; row_keys [B, 2]."""
    t = carry.step
    logits = transform(logits, config, t, banned_tokens(rules, carry.recent), rules.negative)
    drawn = (jnp.argmax(logits, -1) if config.greedy else
             logits_lib.sample_rows(jax.vmap(jax.random.fold_in, (0, None))(row_keys, t), logits))
    hit = rules.steer_first == drawn[:, None]  # [B, K], at most one True: first tokens are unique
    steer = hit.any(-1)
    target = jnp.take_along_axis(rules.steer_to, jnp.argmax(hit, -1)[:, None, None], 1)[:, 0]  # [B, L]
    free = jnp.where(steer, target[:, 0], drawn)

    forced = carry.queue[:, 0] >= 0
    none = jnp.full_like(free, -1)
    queue = jnp.where(forced[:, None], push(carry.queue, none), jnp.where(steer[:, None], push(target, none),
                                                                           carry.queue))
    live = ~carry.done
    token = jnp.where(live, jnp.where(forced, carry.queue[:, 0], free), config.pad_id)
    logprob = jnp.where(live & ~forced, emitted_logprob(jax.nn.log_softmax(logits), free, rules), 0.0)
    out = Rollout(tokens=carry.out.tokens.at[:, t].set(token), mask=carry.out.mask.at[:, t].set(live),
                  logprobs=carry.out.logprobs.at[:, t].set(logprob),
                  steered=carry.out.steered.at[:, t].set(live & (forced | steer)))
    if config.stream:
        io_callback(_emit, None, t, token, ordered=True)
    return carry.replace(step=t + 1, out=out, done=carry.done | (token == config.eos_id), token=token,
                         recent=push(carry.recent, token), queue=queue)


def forward(model: bloom.Bloom, params, ids: jax.Array, attention: jax.Array, cache: bloom.KVCache,
            index) -> tuple[jax.Array, bloom.KVCache]:
    """ids [B, T] into the cache at slots [index, index + T) -> (logits at the last position [B, V] float32, cache).

    Only the last position goes through the LM head (`last_only`): at prefill the full [B, T, V] logits would cost
    T times the head's FLOPs (a third of bloom-1b1's) and B x T x V float32 of memory.
    """
    out = model.apply({"params": params}, ids, attention, cache, index, last_only=True)
    return out.logits[:, -1], out.cache


@functools.partial(jax.jit, static_argnames=("model", "config"))
def generate(model: bloom.Bloom, params, prompt_ids: jax.Array, prompt_mask: jax.Array, key: jax.Array,
             config: SamplingConfig, plan: Plan | None = None, positions: jax.Array | None = None) -> Rollout:
    """Samples up to config.max_new_tokens tokens after each prompt (see the module docstring).

    Args:
        model, params: a bloom.Bloom (a value head is ignored) and its params.
        prompt_ids: [B, P] int32, LEFT-padded: every prompt ends at column P - 1.
        prompt_mask: [B, P] int, 1 on the prompt tokens.
        key: PRNG key; row b draws token t with fold_in(fold_in(key, positions[b]), t) (unused when greedy).
        config: static settings.
        plan: ADM pi- plans (Plan.from_adm); None = no sample is a negative.
        positions: [B] int32, each row's position in the whole batch (when it is sampled in several calls or on
            several hosts); None = 0 .. B - 1.
    Returns: Rollout, each field [B, config.max_new_tokens].
    """
    batch, prompt_len = prompt_ids.shape
    n = config.max_new_tokens
    rules = make_rules(Plan.empty(batch) if plan is None else plan)
    positions = jnp.arange(batch, dtype=jnp.int32) if positions is None else positions
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, positions)
    slots = prompt_len + n - 1  # the last token is never fed back
    attention = jnp.zeros((batch, slots), jnp.int32).at[:, :prompt_len].set(prompt_mask)
    cache = bloom.init_cache(model.config, batch, slots)
    logits, cache = forward(model, params, prompt_ids, attention, cache, 0)
    empty = Rollout(tokens=jnp.full((batch, n), config.pad_id, jnp.int32), mask=jnp.zeros((batch, n), jnp.int32),
                    logprobs=jnp.zeros((batch, n), jnp.float32), steered=jnp.zeros((batch, n), bool))
    carry = Carry(step=jnp.int32(0), out=empty, done=jnp.zeros(batch, bool), token=jnp.zeros(batch, jnp.int32),
                  attention=attention, cache=cache, recent=jnp.full(rules.ban_context.shape[::2], -1, jnp.int32),
                  queue=jnp.full(rules.steer_to.shape[::2], -1, jnp.int32))
    carry = step(carry, logits, row_keys, config, rules)

    def body(carry):
        slot = prompt_len + carry.step - 1  # where the token just recorded goes
        attention = carry.attention.at[:, slot].set(1)
        logits, cache = forward(model, params, carry.token[:, None], attention, carry.cache, slot)
        return step(carry.replace(attention=attention, cache=cache), logits, row_keys, config, rules)

    return lax.while_loop(lambda c: (c.step < n) & ~jnp.all(c.done), body, carry).out
