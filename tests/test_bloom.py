"""Flax BLOOM vs transformers' BloomForCausalLM on tiny random checkpoints built here."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from numpy.testing import assert_allclose, assert_array_equal
from safetensors.numpy import load_file, save_file
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

from diffchat_jax.models import bloom

# Two shapes: power-of-two heads, and 6 heads (ALiBi's non-power-of-two branch) with an odd layer count.
CONFIGS = {
    "4heads": dict(vocab_size=100, hidden_size=64, n_layer=2, n_head=4),
    "6heads": dict(vocab_size=100, hidden_size=48, n_layer=3, n_head=6),
}
PAD = 3  # any id: padded positions must not matter


def random_hf_model(seed=0, **sizes) -> transformers.BloomForCausalLM:
    torch.manual_seed(seed)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(**sizes)).eval()
    # HF init leaves biases at 0 and LN scales at 1: randomise every tensor so every mapping is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = name.endswith("layernorm.weight") or name.endswith("ln_f.weight")
            p.copy_(float(is_scale) + 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(torch model, folder written by transformers' save_pretrained)."""
    model = random_hf_model(**CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return model, str(folder)


def left_padded(rng, vocab, lengths, total):
    """Random rows of the given real lengths, left-padded to `total`: ids, mask [B, total] int32."""
    ids = np.full((len(lengths), total), PAD, np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for row, n in enumerate(lengths):
        ids[row, total - n:] = rng.integers(0, vocab, n)
        mask[row, total - n:] = 1
    return ids, mask


def torch_logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    return out.logits.float().numpy()


def flax_out(module, params, ids, mask):
    return jax.jit(module.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))


def test_alibi_slopes_match_hf():
    for n_head in [*range(1, 21), 112]:  # 112: bloom-176b
        assert_allclose(bloom.alibi_slopes(n_head), _get_alibi_slopes(n_head, "cpu").numpy(), rtol=1e-6)


def test_config_from_real_bloom_config_json_and_back():
    # The fields of bigscience/bloom-1b1's config.json that matter (it spells hidden_size "n_embed").
    hf = {"n_embed": 1536, "n_layer": 24, "num_attention_heads": 16, "vocab_size": 250880,
          "layer_norm_epsilon": 1e-05, "apply_residual_connection_post_layernorm": False, "model_type": "bloom"}
    config = bloom.BloomConfig.from_hf(hf)
    assert (config.hidden_size, config.n_layer, config.n_head, config.vocab_size) == (1536, 24, 16, 250880)
    theirs = transformers.BloomConfig(**hf)
    assert (theirs.hidden_size, theirs.n_layer, theirs.n_head) == (1536, 24, 16)
    back = transformers.BloomConfig(**config.to_hf())
    assert (back.hidden_size, back.n_layer, back.n_head, back.vocab_size) == (1536, 24, 16, 250880)
    assert bloom.BloomConfig.from_hf(config.to_hf()) == config
    with pytest.raises(ValueError, match="untied"):
        bloom.BloomConfig.from_hf({**hf, "tie_word_embeddings": False})


def test_param_tree_is_named_like_hf(checkpoint):
    _, folder = checkpoint
    module, params = bloom.load_pretrained(folder)
    assert set(params) == {"word_embeddings", "word_embeddings_layernorm", "ln_f",
                           *(f"h_{i}" for i in range(module.config.n_layer))}
    assert set(params["h_0"]) == {"input_layernorm", "self_attention", "post_attention_layernorm", "mlp"}


def test_logits_match_torch_unpadded_and_left_padded(checkpoint):
    model, folder = checkpoint
    module, params = bloom.load_pretrained(folder)
    rng = np.random.default_rng(0)
    ids, mask = left_padded(rng, module.config.vocab_size, [9, 9], 9)
    assert_allclose(flax_out(module, params, ids, mask).logits, torch_logits(model, ids, mask), atol=1e-4, rtol=0)
    ids, mask = left_padded(rng, module.config.vocab_size, [9, 5, 1], 9)
    real = mask.astype(bool)
    ours, theirs = np.asarray(flax_out(module, params, ids, mask).logits), torch_logits(model, ids, mask)
    assert np.abs(ours[real]).max() > 0.1  # not a degenerate model
    assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
    assert np.isfinite(ours).all()  # pad rows too: masked rows must not produce NaN
    # A hole in the mask: HF's ALiBi positions count real tokens only (cumsum), so the hole shifts them.
    mask[0, 3:5] = 0
    real = mask.astype(bool)
    ours, theirs = np.asarray(flax_out(module, params, ids, mask).logits), torch_logits(model, ids, mask)
    assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)


def test_left_padding_does_not_change_real_token_logits(checkpoint):
    _, folder = checkpoint
    module, params = bloom.load_pretrained(folder)
    lengths = [8, 5, 2]
    ids, mask = left_padded(np.random.default_rng(1), module.config.vocab_size, lengths, 8)
    padded = np.asarray(flax_out(module, params, ids, mask).logits)
    for row, n in enumerate(lengths):
        alone = flax_out(module, params, ids[row:row + 1, 8 - n:], mask[row:row + 1, 8 - n:]).logits[0]
        assert_allclose(padded[row, 8 - n:], alone, atol=1e-5, rtol=0)


def test_kv_cache_prefill_then_decode_equals_full_sequence(checkpoint):
    _, folder = checkpoint
    module, params = bloom.load_pretrained(folder)
    rng = np.random.default_rng(2)
    prompt, prompt_mask = left_padded(rng, module.config.vocab_size, [6, 3, 1], 6)
    new = rng.integers(0, module.config.vocab_size, (3, 4)).astype(np.int32)
    ids = np.concatenate([prompt, new], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(new)], axis=1)
    full = np.asarray(flax_out(module, params, ids, mask).logits)

    max_length = ids.shape[1] + 2  # slack: slots never written must not matter
    step = jax.jit(lambda p, ids, mask, cache, i: module.apply({"params": p}, ids, mask, cache, i))
    cache = bloom.init_cache(module.config, 3, max_length)
    cache_mask = np.zeros((3, max_length), np.int32)
    cache_mask[:, :6] = prompt_mask
    out = step(params, prompt, cache_mask, cache, jnp.int32(0))
    real = prompt_mask.astype(bool)
    assert_allclose(np.asarray(out.logits)[real], full[:, :6][real], atol=1e-4, rtol=0)
    last = module.apply({"params": params}, prompt, cache_mask, cache, jnp.int32(0), last_only=True)
    assert last.logits.shape == (3, 1, module.config.vocab_size)  # the prefill a sampler needs: last position only
    assert_allclose(last.logits[:, 0], full[:, 5], atol=1e-4, rtol=0)
    for i in range(6, ids.shape[1]):
        cache_mask[:, i] = 1
        out = step(params, ids[:, i:i + 1], cache_mask, out.cache, jnp.int32(i))
        assert out.logits.shape == (3, 1, module.config.vocab_size)
        assert_allclose(out.logits[:, 0], full[:, i], atol=1e-4, rtol=0)
    assert jax.tree.map(jnp.shape, out.cache) == jax.tree.map(jnp.shape, cache)


def test_greedy_decode_in_fori_loop_matches_hf_generate(checkpoint):
    """The cache as a loop carry: greedy decoding inside lax.fori_loop gives transformers' greedy tokens."""
    model, folder = checkpoint
    module, params = bloom.load_pretrained(folder)
    prompt, prompt_mask = left_padded(np.random.default_rng(3), module.config.vocab_size, [5, 2], 5)
    n_new = 6
    with torch.no_grad():
        expected = model.generate(torch.tensor(prompt, dtype=torch.long), attention_mask=torch.tensor(prompt_mask),
                                  max_new_tokens=n_new, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    expected = expected[:, 5:].numpy()

    @jax.jit
    def greedy(params, prompt, prompt_mask):
        batch, length = prompt.shape
        mask = jnp.zeros((batch, length + n_new), jnp.int32).at[:, :length].set(prompt_mask)
        cache = bloom.init_cache(module.config, batch, length + n_new)
        out = module.apply({"params": params}, prompt, mask, cache, 0)
        tokens = jnp.zeros((batch, n_new), jnp.int32).at[:, 0].set(jnp.argmax(out.logits[:, -1], -1))

        def body(t, carry):
            tokens, mask, cache = carry
            i = length + t - 1  # slot of token t - 1, whose logits give token t
            mask = mask.at[:, i].set(1)
            previous = jax.lax.dynamic_slice_in_dim(tokens, t - 1, 1, axis=1)  # [B, 1]
            out = module.apply({"params": params}, previous, mask, cache, i)
            return tokens.at[:, t].set(jnp.argmax(out.logits[:, 0], -1)), mask, out.cache

        return jax.lax.fori_loop(1, n_new, body, (tokens, mask, cache))[0]

    assert_array_equal(greedy(params, prompt, prompt_mask), expected)


def test_save_pretrained_round_trips_through_transformers(checkpoint, tmp_path):
    model, folder = checkpoint
    module, params = bloom.load_pretrained(folder)
    bloom.save_pretrained(module.config, params, tmp_path)
    reloaded = transformers.BloomForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.dtype == torch.float32
    ids, mask = left_padded(np.random.default_rng(4), module.config.vocab_size, [7, 4], 7)
    assert_array_equal(torch_logits(reloaded, ids, mask), torch_logits(model, ids, mask))
    _, params_again = bloom.load_pretrained(tmp_path)
    jax.tree.map(assert_array_equal, params_again, params)


def test_sharded_checkpoint_loads(checkpoint, tmp_path):
    model, folder = checkpoint
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in os.listdir(tmp_path) and len(shards) > 1
    _, sharded = bloom.load_pretrained(tmp_path)
    _, single = bloom.load_pretrained(folder)
    jax.tree.map(assert_array_equal, sharded, single)
    os.remove(tmp_path / sorted(shards)[-1])
    with pytest.raises(FileNotFoundError, match=sorted(shards)[-1]):
        bloom.load_pretrained(tmp_path)


def test_missing_or_misshaped_tensor_is_named(checkpoint, tmp_path):
    _, folder = checkpoint
    state = load_file(os.path.join(folder, "model.safetensors"))
    del state["transformer.ln_f.bias"]
    state["transformer.h.0.mlp.dense_h_to_4h.bias"] = state["transformer.h.0.mlp.dense_h_to_4h.bias"][:5]
    save_file(state, tmp_path / "model.safetensors")
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    with pytest.raises(ValueError, match=r"missing tensor transformer\.ln_f\.bias.*h\.0\.mlp\.dense_h_to_4h\.bias "
                                         r"has shape \(5,\)"):
        bloom.load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        bloom.load_pretrained(str(tmp_path / "nothing_here"))
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        bloom.load_pretrained(tmp_path)


def test_loads_bloom_model_keys_without_prefix(checkpoint, tmp_path):
    """Hub BLOOM checkpoints are BloomModel state dicts: no `transformer.` prefix, no lm_head."""
    _, folder = checkpoint
    state = load_file(os.path.join(folder, "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in state.items()}, tmp_path / "model.safetensors")
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    jax.tree.map(assert_array_equal, bloom.load_pretrained(tmp_path)[1], bloom.load_pretrained(folder)[1])


def test_value_head(checkpoint, tmp_path):
    model, folder = checkpoint
    module, params = bloom.load_pretrained(folder, value_head=True)  # no value_head.safetensors: zeros
    hidden = module.config.hidden_size
    assert params["value_head"]["kernel"].shape == (hidden, 1) and not params["value_head"]["kernel"].any()
    ids, mask = left_padded(np.random.default_rng(5), module.config.vocab_size, [6, 3], 6)
    out = flax_out(module, params, ids, mask)
    assert out.values.shape == (2, 6) and out.values.dtype == jnp.float32
    assert_array_equal(out.values, 0.0)
    assert_array_equal(out[0], out.logits)

    # A random head: values = last hidden states (after ln_f) @ w + b, as torch computes them.
    w = np.random.default_rng(6).normal(size=(hidden, 1)).astype(np.float32)
    params = {**params, "value_head": {"kernel": jnp.asarray(w), "bias": jnp.asarray([0.5])}}
    out = flax_out(module, params, ids, mask)
    with torch.no_grad():
        last = model.transformer(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))[0]
    real = mask.astype(bool)
    assert np.isfinite(out.values).all()
    assert_allclose(np.asarray(out.values)[real], (last.numpy() @ w + 0.5)[..., 0][real], atol=1e-4, rtol=0)

    bloom.save_pretrained(module.config, params, tmp_path)
    assert os.path.exists(tmp_path / "value_head.safetensors")
    jax.tree.map(assert_array_equal, bloom.load_pretrained(tmp_path, value_head=True)[1], params)
    plain_module, plain = bloom.load_pretrained(tmp_path)
    assert "value_head" not in plain and flax_out(plain_module, plain, ids, mask).values is None
    transformers.BloomForCausalLM.from_pretrained(tmp_path)  # the extra file does not bother transformers


def test_bf16_close_to_fp32(checkpoint, tmp_path):
    model, folder = checkpoint
    module32, params32 = bloom.load_pretrained(folder)
    module16, params16 = bloom.load_pretrained(folder, dtype=jnp.bfloat16)
    assert module16.config.dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    ids, mask = left_padded(np.random.default_rng(7), module32.config.vocab_size, [8, 4], 8)
    real = mask.astype(bool)
    ref = np.asarray(flax_out(module32, params32, ids, mask).logits)[real]
    logits16 = flax_out(module16, params16, ids, mask).logits
    assert logits16.dtype == jnp.float32
    # Measured: bf16 is ~0.02 off fp32 on these models (logits up to ~4); 0.1 leaves a 5x margin. It must
    # differ at all, or the compute dtype was ignored.
    error = np.abs(np.asarray(logits16)[real] - ref).max()
    assert 1e-4 < error < 0.1, error
    # fp32 master weights, bf16 compute.
    module_mixed, params_mixed = bloom.load_pretrained(folder, compute_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params_mixed)} == {jnp.dtype(jnp.float32)}
    error = np.abs(np.asarray(flax_out(module_mixed, params_mixed, ids, mask).logits)[real] - ref).max()
    assert 1e-4 < error < 0.1, error
    # bf16 params save as bf16 and transformers loads them as such.
    bloom.save_pretrained(module16.config, params16, tmp_path)
    assert transformers.BloomForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16


def test_remat_gives_same_loss_and_grads(checkpoint):
    _, folder = checkpoint
    module, params = bloom.load_pretrained(folder)
    remat = bloom.Bloom(dataclasses.replace(module.config, remat=True))
    ids, mask = left_padded(np.random.default_rng(8), module.config.vocab_size, [6, 4], 6)

    def loss(m):
        return jax.jit(jax.value_and_grad(lambda p: m.apply({"params": p}, ids, mask).logits.std()))(params)

    (value, grads), (value_remat, grads_remat) = loss(module), loss(remat)
    assert_allclose(value_remat, value, rtol=1e-6)
    jax.tree.map(lambda a, b: assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads_remat, grads)


def test_post_layernorm_residual_matches_torch(tmp_path):
    model = random_hf_model(1, **CONFIGS["4heads"], apply_residual_connection_post_layernorm=True)
    model.save_pretrained(tmp_path)
    module, params = bloom.load_pretrained(tmp_path)
    assert module.config.apply_residual_connection_post_layernorm
    ids, mask = left_padded(np.random.default_rng(9), module.config.vocab_size, [6, 6], 6)
    assert_allclose(flax_out(module, params, ids, mask).logits, torch_logits(model, ids, mask), atol=1e-4, rtol=0)


def test_partial_calls_compose_to_the_full_call(checkpoint):
    """blocks=(0, k) then blocks=(k, n) from its hidden state == the full call; head=False's hidden through
    lm_logits == the logits (PPO runs the frozen blocks once and the trainable ones from their output)."""
    _, folder = checkpoint
    module, params = bloom.load_pretrained(folder, value_head=True)
    params["value_head"]["kernel"] = jnp.ones_like(params["value_head"]["kernel"]) * 0.1
    cfg = module.config
    ids, mask = left_padded(np.random.default_rng(10), cfg.vocab_size, [6, 3], 6)
    full = module.apply({"params": params}, ids, mask)
    for k in range(1, cfg.n_layer):
        lower = module.apply({"params": params}, ids, mask, blocks=(0, k))
        assert lower.logits is None and lower.hidden.shape == (2, 6, cfg.hidden_size)
        upper = module.apply({"params": params}, None, mask, blocks=(k, cfg.n_layer), hidden=lower.hidden)
        assert_allclose(upper.logits, full.logits, rtol=1e-5, atol=1e-5)
        assert_allclose(upper.values, full.values, rtol=1e-5, atol=1e-6)
    headless = module.apply({"params": params}, ids, mask, head=False)
    assert headless.logits is None
    logits = bloom.lm_logits(headless.hidden, params["word_embeddings"]["embedding"], cfg.dtype)
    assert_allclose(logits, full.logits, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="pass hidden"):
        module.apply({"params": params}, ids, mask, blocks=(1, cfg.n_layer))
    with pytest.raises(ValueError, match="blocks must satisfy"):
        module.apply({"params": params}, ids, mask, blocks=(0, cfg.n_layer + 1))


def test_remat_keeps_only_block_inputs_under_a_gradient():
    """model.remat: XLA's temporaries for a gradient through 8 blocks shrink to about one block's working set
    (the scan of rematerialised blocks), where unrolled blocks keep every block's activations."""
    cfg = bloom.BloomConfig(vocab_size=64, hidden_size=128, n_layer=8, n_head=4)
    ids = jax.ShapeDtypeStruct((8, 128), jnp.int32)

    def temp(remat):
        module = bloom.Bloom(dataclasses.replace(cfg, remat=remat))
        params = jax.eval_shape(lambda: bloom.init_params(cfg, jax.random.PRNGKey(0)))
        grad = jax.jit(jax.grad(lambda p, i: module.apply({"params": p}, i, jnp.ones_like(i)).logits.mean()))
        return grad.lower(params, ids).compile().memory_analysis().temp_size_in_bytes

    plain, remat = temp(False), temp(True)
    assert remat < plain / 2.5, (plain, remat)
