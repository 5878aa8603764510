"""BLOOM causal LM in flax.linen, numerically matching transformers' `BloomForCausalLM`.

The param tree mirrors the HF state dict, so conversion is a renaming (Dense kernel = torch weight.T):

    word_embeddings/embedding                  <-> [transformer.]word_embeddings.weight
    word_embeddings_layernorm/{scale,bias}     <-> word_embeddings_layernorm.{weight,bias}
    h_{i}/input_layernorm/{scale,bias}         <-> h.{i}.input_layernorm.{weight,bias}
    h_{i}/self_attention/query_key_value/...   <-> h.{i}.self_attention.query_key_value.{weight,bias}
    h_{i}/self_attention/dense, h_{i}/post_attention_layernorm, h_{i}/mlp/{dense_h_to_4h,dense_4h_to_h}: same
    ln_f/{scale,bias}                          <-> ln_f.{weight,bias}
    value_head/{kernel,bias}                   <-> value_head.{weight,bias}  (ours, in value_head.safetensors)

Blocks are separate modules `h_0 ... h_{n-1}` (not a scan) so an optax mask can freeze blocks by name.
The LM head is tied to the word embeddings; `lm_head.weight` in a checkpoint is ignored.
"""
import dataclasses
import json
import math
import os
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from diffchat_jax.models import hf_io, known

# HF BloomConfig defaults, used for keys a config.json leaves out.
_HF_DEFAULTS = dict(vocab_size=250880, hidden_size=64, n_layer=2, n_head=8, layer_norm_epsilon=1e-5,
                    apply_residual_connection_post_layernorm=False)
# The config.json keys HF reads each field from, the first set one winning (`n_embed` over `hidden_size`).
_HF_KEYS = dict(vocab_size=("vocab_size",), hidden_size=("n_embed", "hidden_size"),
                n_layer=("n_layer", "num_hidden_layers"), n_head=("n_head", "num_attention_heads"),
                layer_norm_epsilon=("layer_norm_epsilon",),
                apply_residual_connection_post_layernorm=("apply_residual_connection_post_layernorm",))
# Fields no tensor shape confirms (the word embeddings give vocab_size and hidden_size, the blocks n_layer): left
# out of a config.json, they take HF's default and a model trained otherwise loads without error.
_UNCONFIRMED = ("n_head", "layer_norm_epsilon", "apply_residual_connection_post_layernorm")


@dataclasses.dataclass(frozen=True)
class BloomConfig:
    """Model sizes (HF field names) plus our knobs.

    dtype: compute dtype (activations, matmuls); params keep their own dtype. Softmax, logits and values are
        always float32.
    value_head: add a scalar value head `value_head` on the final (post-ln_f) hidden states.
    remat: rematerialise each block in the backward pass (a scan of jax.checkpoint over the blocks of a call
        without a KV cache; `_rematerialised_blocks`), for memory.
    """
    vocab_size: int = _HF_DEFAULTS["vocab_size"]
    hidden_size: int = _HF_DEFAULTS["hidden_size"]
    n_layer: int = _HF_DEFAULTS["n_layer"]
    n_head: int = _HF_DEFAULTS["n_head"]
    layer_norm_epsilon: float = _HF_DEFAULTS["layer_norm_epsilon"]
    apply_residual_connection_post_layernorm: bool = False
    value_head: bool = False
    dtype: Any = jnp.float32
    remat: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "BloomConfig":
        """From a config.json dict. Accepts HF's aliases: `n_embed` (wins over `hidden_size`, as in HF),
        `num_hidden_layers`, `num_attention_heads` (what bigscience/bloom-* config.json files use)."""
        if not hf.get("tie_word_embeddings", True):
            raise hf_io.BadModelFile("BLOOM with an untied lm_head is not supported (tie_word_embeddings=False)")

        def get(field):
            """The first of the field's keys set in hf, else HF's default for the field."""
            return next((hf[k] for k in _HF_KEYS[field] if hf.get(k) is not None), _HF_DEFAULTS[field])

        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            n_layer=get("n_layer"),
            n_head=get("n_head"),
            layer_norm_epsilon=get("layer_norm_epsilon"),
            apply_residual_connection_post_layernorm=bool(get("apply_residual_connection_post_layernorm")),
        )

    @staticmethod
    def unconfirmed_defaults(hf: Mapping[str, Any]) -> dict[str, Any]:
        """The fields a config.json dict leaves to HF's defaults (name -> default) that no tensor shape confirms."""
        return {field: _HF_DEFAULTS[field] for field in _UNCONFIRMED
                if all(hf.get(k) is None for k in _HF_KEYS[field])}

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that `transformers.BloomConfig` accepts (no dtype: save_pretrained adds the params')."""
        return dict(
            architectures=["BloomForCausalLM"],
            model_type="bloom",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            layer_norm_epsilon=self.layer_norm_epsilon,
            apply_residual_connection_post_layernorm=self.apply_residual_connection_post_layernorm,
            tie_word_embeddings=True,
        )


@flax.struct.dataclass
class KVCache:
    """Per-layer keys and values, each a tuple of n_layer arrays [B, n_head, S_max, head_dim].

    Separate arrays per layer (not one stacked array) so each decode step updates them in place without
    re-stacking the whole cache. Heads before slots: the layout the attention dots read as it is; with slots first,
    XLA transposes the whole cache of every layer at every decode step (2-3x slower steps on CPU).
    """
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]


@flax.struct.dataclass
class BloomOutput:
    """logits [B, T, V] float32 (None with head=False or a partial call); values [B, T] float32 or None;
    cache: the updated KVCache or None; hidden [B, T, H] in the compute dtype: the ln_f output (the LM head's
    input) for a call that runs the last block, else the residual stream after the last block it ran.

    `out[0]` is the logits (tuple-style access, like HF outputs).
    """
    logits: jax.Array | None
    values: jax.Array | None = None
    cache: KVCache | None = None
    hidden: jax.Array | None = None

    def __getitem__(self, i):
        return (self.logits, self.values, self.cache)[i]


def init_cache(config: BloomConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """Zeros of shape n_layer x [batch_size, n_head, max_length, head_dim] (dtype defaults to config.dtype)."""
    shape = (batch_size, config.n_head, max_length, config.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, dtype or config.dtype) for _ in range(config.n_layer))
    return KVCache(k=zeros(), v=zeros())


def alibi_slopes(n_head: int) -> np.ndarray:
    """[n_head] float32 ALiBi slopes exactly as HF: the geometric sequence for the largest power of two
    p <= n_head, then for the remaining heads the odd terms of the sequence for 2p."""
    p = 2 ** math.floor(math.log2(n_head))
    base = np.float32(2 ** (-(2 ** -(math.log2(p) - 3))))
    slopes = base ** np.arange(1, p + 1, dtype=np.float32)
    if p != n_head:
        extra_base = np.float32(2 ** (-(2 ** -(math.log2(2 * p) - 3))))
        extra = extra_base ** np.arange(1, 1 + 2 * min(p, n_head - p), 2, dtype=np.float32)
        slopes = np.concatenate([slopes, extra])
    return slopes.astype(np.float32)


def bloom_gelu(x: jax.Array) -> jax.Array:
    """BLOOM's tanh-approximate GELU, with its rounded sqrt(2/pi) constant."""
    return x * 0.5 * (1.0 + jnp.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


def _dense(config: BloomConfig, features: int, name: str) -> nn.Dense:
    # HF init: weights N(0, 0.02), zero biases.
    return nn.Dense(features, dtype=config.dtype, kernel_init=nn.initializers.normal(0.02), name=name)


def _layer_norm(config: BloomConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=config.dtype, name=name)


class Attention(nn.Module):
    """Self-attention with ALiBi and HF's fused, per-head interleaved [q, k, v] projection."""
    config: BloomConfig

    @nn.compact
    def __call__(self, x, alibi, mask, kv=None, cache_index=None):
        """x [B, T, H]; alibi [B, N, S] float32; mask [B, T, S] bool (True = may attend);
        kv: None (then S = T) or (k, v) each [B, N, S, D] to write the new keys/values into at cache_index.
        Returns ([B, T, H], updated kv or None)."""
        cfg = self.config
        batch, length, _ = x.shape
        qkv = _dense(cfg, 3 * cfg.hidden_size, "query_key_value")(x)
        qkv = qkv.reshape(batch, length, cfg.n_head, 3, cfg.head_dim)
        q, k, v = (qkv[..., i, :].transpose(0, 2, 1, 3) for i in range(3))  # [B, N, T, D]
        if kv is not None:
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, 0, cache_index, 0))
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, 0, cache_index, 0))
            kv = (k, v)
        scores = jnp.einsum("bntd,bnsd->bnts", q, k.astype(cfg.dtype), preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(cfg.head_dim) + alibi[:, :, None, :]
        # A finite fill, not -inf: fully masked rows (queries at left pads) get a uniform softmax instead of NaN.
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bnts,bnsd->btnd", probs, v.astype(cfg.dtype)).reshape(batch, length, cfg.hidden_size)
        return _dense(cfg, cfg.hidden_size, "dense")(out), kv


class MLP(nn.Module):
    config: BloomConfig

    @nn.compact
    def __call__(self, x):
        """[B, T, H] -> [B, T, H]."""
        h = bloom_gelu(_dense(self.config, 4 * self.config.hidden_size, "dense_h_to_4h")(x))
        return _dense(self.config, self.config.hidden_size, "dense_4h_to_h")(h)


class Block(nn.Module):
    """Pre-LN transformer block; the residual is the LN output when apply_residual_connection_post_layernorm."""
    config: BloomConfig

    @nn.compact
    def __call__(self, x, alibi, mask, kv=None, cache_index=None):
        """x [B, T, H] -> ([B, T, H], updated kv or None); see Attention for the other arguments."""
        post_ln_residual = self.config.apply_residual_connection_post_layernorm
        h = _layer_norm(self.config, "input_layernorm")(x)
        attn, kv = Attention(self.config, name="self_attention")(h, alibi, mask, kv, cache_index)
        x = (h if post_ln_residual else x) + attn
        h = _layer_norm(self.config, "post_attention_layernorm")(x)
        x = (h if post_ln_residual else x) + MLP(self.config, name="mlp")(h)
        return x, kv


class Bloom(nn.Module):
    """BLOOM causal LM (tied LM head) with an optional scalar value head. Deterministic: no dropout.

    Full sequence: `__call__(input_ids [B, T] int32, attention_mask [B, T] int/bool)`. Padding may be anywhere
    (typically on the left): pads are never attended and ALiBi positions are `cumsum(attention_mask) - 1` as in
    HF, so the logits at the real tokens of a left-padded row equal those of the unpadded sequence.

    Incremental decoding (KV cache), a fixed-shape protocol that a jitted lax.while_loop can carry:
        cache = init_cache(config, B, S_max); each call passes cache, cache_index (int32 scalar, may be traced)
        and new tokens input_ids [B, T]. The call writes their keys/values at slots [cache_index, cache_index + T)
        (cache_index + T <= S_max is the caller's duty: jax clamps out-of-range writes silently).
        attention_mask is then [B, S_max]: 1 at every slot written so far INCLUDING the new ones, 0 at pads and at
        slots not yet written. Slot s is attended by the new token at slot q iff s <= q and attention_mask[s] = 1;
        ALiBi positions are cumsum(attention_mask) - 1 over slots, so results equal the full-sequence call.
        Usage: prefill a left-padded prompt [B, P] at cache_index 0 with mask [prompt_mask, 0...]; then for
        slot i = P, P+1, ...: set mask[:, i] = 1 and call with input_ids [B, 1], cache_index i. The returned
        logits [B, 1, V] equal the full-sequence logits at position i; BloomOutput.cache is the updated cache.
        last_only=True returns logits [B, 1, V] for the last input position only (values still cover all of them).

    Partial calls (PPO caches the frozen lower blocks' output once per rollout batch; no KV cache):
        blocks=(start, stop) runs blocks h_start .. h_{stop-1} only. start > 0 takes `hidden` [B, T, H], the
        residual stream after block start - 1 (what a call with stop=start returns in BloomOutput.hidden), in place
        of embedding input_ids (which may then be None). A call with stop < n_layer returns only that hidden state;
        one that runs the last block applies ln_f, the value head and (unless head=False) the LM head.
        head=False skips the LM head: BloomOutput.hidden is then what `lm_logits` or the chunked log-probs of
        diffchat_jax.rl.logprobs take, so that [B, T, V] logits never exist at once.
    """
    config: BloomConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, cache: KVCache | None = None, cache_index=None,
                 last_only: bool = False, *, blocks: tuple[int, int] | None = None, hidden=None,
                 head: bool = True) -> BloomOutput:
        cfg = self.config
        if (cache is None) != (cache_index is None):
            raise ValueError("pass cache and cache_index together")
        start, stop = blocks or (0, cfg.n_layer)
        if not 0 <= start < stop <= cfg.n_layer:
            raise ValueError(f"blocks must satisfy 0 <= start < stop <= {cfg.n_layer}, got {blocks}")
        if (start > 0) != (hidden is not None):
            raise ValueError("pass hidden (the residual stream entering block `start`) exactly when start > 0")
        if cache is not None and (start, stop) != (0, cfg.n_layer):
            raise ValueError("a KV-cache call runs every block")
        batch, length = (input_ids if hidden is None else hidden).shape[:2]
        slots = length if cache is None else cache.k[0].shape[2]
        if attention_mask.shape != (batch, slots):
            raise ValueError(f"attention_mask must be [B, {slots}] (the cache length when decoding), "
                             f"got {attention_mask.shape}")

        # ALiBi as HF adds it: slope * (key position). The query's own position would add a constant per row,
        # which softmax ignores. Positions count real tokens only (a hole in the mask shifts later positions).
        key_mask = attention_mask.astype(jnp.int32)
        positions = (jnp.cumsum(key_mask, axis=-1) - 1) * key_mask  # [B, S]
        alibi = jnp.asarray(alibi_slopes(cfg.n_head))[None, :, None] * positions[:, None, :].astype(jnp.float32)
        query_slots = (0 if cache is None else cache_index) + jnp.arange(length)
        causal = jnp.arange(slots)[None, :] <= query_slots[:, None]  # [T, S]
        mask = causal[None] & (key_mask[:, None, :] > 0)  # [B, T, S]

        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                         embedding_init=nn.initializers.normal(0.02), name="word_embeddings")
        if hidden is None:
            x = _layer_norm(cfg, "word_embeddings_layernorm")(embed(input_ids))
        else:
            x = hidden.astype(cfg.dtype)
        new_k, new_v = [], []
        if cfg.remat and cache is None and not self.is_initializing():
            x = _rematerialised_blocks(cfg, self.variables["params"], x, alibi, mask, start, stop)
        else:
            for i in range(start, stop):
                kv = None if cache is None else (cache.k[i], cache.v[i])
                x, kv = Block(cfg, name=f"h_{i}")(x, alibi, mask, kv, cache_index)
                if kv is not None:
                    new_k.append(kv[0])
                    new_v.append(kv[1])
        if stop < cfg.n_layer:
            return BloomOutput(logits=None, hidden=x)
        x = _layer_norm(cfg, "ln_f")(x)

        # last_only: logits [B, 1, V] of the last position only (a sampler's prefill needs no more; the [B, T, V]
        # head would cost T times the FLOPs and memory).
        logits = None
        if head:
            logits = lm_logits(x[:, -1:] if last_only else x, embed.embedding, cfg.dtype)
        values = None
        if cfg.value_head:
            # Zero init: V = 0 everywhere at the start of PPO; the kernel still gets gradients.
            value_head = nn.Dense(1, dtype=jnp.float32, kernel_init=nn.initializers.zeros, name="value_head")
            values = value_head(x.astype(jnp.float32))[..., 0]
        new_cache = None if cache is None else KVCache(k=tuple(new_k), v=tuple(new_v))
        return BloomOutput(logits=logits, values=values, cache=new_cache, hidden=x)


def _rematerialised_blocks(config: BloomConfig, params, x, alibi, mask, start: int, stop: int):
    """Blocks h_start .. h_{stop-1} as a lax.scan of a rematerialised block over their stacked params: under a
    gradient only each block's input [B, T, H] is kept, and the block's activations are recomputed in the
    backward pass. A scan, not jax.checkpoint on each of the unrolled blocks: XLA may drop the optimisation
    barriers of unrolled remat and merge the recomputation back into the forward pass (XLA:CPU does), which
    keeps every block's activations after all; inside a scan's backward loop the recomputation cannot move."""
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(params[f"h_{i}"] for i in range(start, stop)))

    def body(x, block_params):
        return Block(config, parent=None).apply({"params": block_params}, x, alibi, mask)[0], None

    return jax.lax.scan(jax.checkpoint(body, prevent_cse=False), x, stacked)[0]


def lm_logits(hidden: jax.Array, embedding: jax.Array, dtype) -> jax.Array:
    """The tied LM head: hidden [..., H] (the ln_f output) x embedding [V, H] -> logits [..., V] float32, the
    matmul in `dtype` (the compute dtype) with float32 accumulation."""
    return jnp.einsum("...h,vh->...v", hidden.astype(dtype), embedding.astype(dtype),
                      preferred_element_type=jnp.float32)


def init_params(config: BloomConfig, rng: jax.Array, seq_len: int = 8):
    """Random params as HF initialises them (normal 0.02, zero biases, unit LN scales), float32."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return Bloom(config).init(rng, ids, jnp.ones_like(ids))["params"]


# ----------------------------------------------------------------------------------------------------------
# HF state dict <-> Flax params.
# ----------------------------------------------------------------------------------------------------------
# HF leaf name -> Flax leaf name, by module kind. Dense kernels are the transposed torch weights.
_LEAVES = {
    "embed": {"weight": "embedding"},
    "norm": {"weight": "scale", "bias": "bias"},
    "dense": {"weight": "kernel", "bias": "bias"},
}


def _kind(module: str) -> str:
    if module == "word_embeddings":
        return "embed"
    return "norm" if module.endswith("layernorm") or module == "ln_f" else "dense"


def _hf_key_to_path(key: str) -> tuple[str, ...]:
    """'transformer.h.3.mlp.dense_h_to_4h.weight' -> ('h_3', 'mlp', 'dense_h_to_4h', 'kernel')."""
    *modules, leaf = key.removeprefix("transformer.").split(".")
    if modules[:1] == ["h"] and len(modules) > 1:
        modules = [f"h_{modules[1]}"] + modules[2:]
    try:
        return (*modules, _LEAVES[_kind(modules[-1])][leaf])
    except (KeyError, IndexError):
        raise hf_io.BadModelFile(f"unexpected tensor {key!r} in a BLOOM checkpoint") from None


def _path_to_hf_key(path: tuple[str, ...]) -> str:
    """Inverse of _hf_key_to_path, with the `transformer.` prefix of BloomForCausalLM (not on value_head)."""
    *modules, leaf = path
    hf_leaf = {v: k for k, v in _LEAVES[_kind(modules[-1])].items()}[leaf]
    if modules[0].startswith("h_"):
        modules = ["h", modules[0][2:]] + modules[1:]
    prefix = "" if modules[0] == "value_head" else "transformer."
    return prefix + ".".join([*modules, hf_leaf])


def hf_to_params(state: Mapping[str, np.ndarray]) -> dict:
    """HF state dict (keys with or without `transformer.`; `lm_head.weight` ignored) -> nested Flax params."""
    flat = {}
    for key, x in state.items():
        if key == "lm_head.weight":
            continue  # tied to word_embeddings
        path = _hf_key_to_path(key)
        flat[path] = x.T if path[-1] == "kernel" else x
    return traverse_util.unflatten_dict(flat)


def params_to_hf(params) -> dict[str, np.ndarray]:
    """Nested Flax params -> HF state dict (`transformer.`-prefixed; `value_head.*` if present), numpy."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    return {_path_to_hf_key(path): np.ascontiguousarray(x.T if path[-1] == "kernel" else x)
            for path, x in flat.items()}


# ----------------------------------------------------------------------------------------------------------
# Checkpoint files.
# ----------------------------------------------------------------------------------------------------------
def resolve_model_dir(name_or_path: str) -> str:
    """An SFT or PPO workdir resolves to its export/ (the transformers folder its job writes at the end); a
    transformers folder or hub id is used as it is."""
    export = os.path.join(name_or_path, "export")
    return export if os.path.isfile(os.path.join(export, "config.json")) else name_or_path


def load_pretrained(path_or_id: str, dtype=jnp.float32, value_head: bool = False, compute_dtype=None,
                    abstract: bool = False):
    """Load a HF BLOOM checkpoint (local folder or hub id) -> (Bloom module, params).

    Reads config.json and model.safetensors (or sharded with model.safetensors.index.json). Params are cast to
    `dtype`, which is also the compute dtype unless `compute_dtype` is given (fp32 master weights with bf16
    compute). With value_head=True the head comes from value_head.safetensors when the folder has one, else
    it starts at zeros. abstract=True: shapes only (jax.ShapeDtypeStructs), from the local config.json or, for
    a hub id, the built-in table (models/known.py); no weights are read or downloaded.
    """
    if abstract:
        config = dataclasses.replace(BloomConfig.from_hf(known.config_json(path_or_id, known.BLOOM)),
                                     dtype=compute_dtype or dtype, value_head=value_head)
        return Bloom(config), hf_io.abstract_params(lambda: init_params(config, jax.random.key(0)), dtype)
    folder = hf_io.resolve_folder(path_or_id, ["config.json", "*.safetensors", "*.index.json"])
    config = dataclasses.replace(_read_config(os.path.join(folder, "config.json")), dtype=compute_dtype or dtype,
                                 value_head=value_head)
    state = hf_io.read_safetensors(folder)
    head_path = os.path.join(folder, "value_head.safetensors")
    if value_head and os.path.exists(head_path):
        state.update(hf_io.read_safetensors_file(head_path))
    with hf_io.naming(folder):
        params = hf_to_params(state)
        expected = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
        if value_head and "value_head" not in params:
            params["value_head"] = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), expected["value_head"])
        hf_io.check_params(params, expected, _path_to_hf_key, "BLOOM")
    return Bloom(config), jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def _read_config(path: str) -> BloomConfig:
    """A config.json file -> BloomConfig, warning about the fields it leaves to defaults that no shape checks."""
    hf = hf_io.read_json(path)
    hf_io.warn_defaults(path, BloomConfig.unconfirmed_defaults(hf))
    with hf_io.naming(path):
        return BloomConfig.from_hf(hf)


def save_pretrained(config: BloomConfig, params, out_dir: str) -> None:
    """Write config.json + model.safetensors (HF names, params' dtype) that
    `transformers.BloomForCausalLM.from_pretrained(out_dir)` loads; the value head, if any, goes to
    value_head.safetensors. Like transformers, the tied `lm_head.weight` is not written."""
    os.makedirs(out_dir, exist_ok=True)
    state = params_to_hf(params)
    head = {k: state.pop(k) for k in list(state) if k.startswith("value_head.")}
    hf_config = config.to_hf()
    # As transformers writes it (from_pretrained would also infer it from the tensors).
    hf_config["dtype"] = str(state["transformer.word_embeddings.weight"].dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if head:
        save_file(head, os.path.join(out_dir, "value_head.safetensors"), metadata={"format": "pt"})
