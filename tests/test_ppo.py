"""The PPO core (diffchat_jax.rl.ppo): partial unfreezing, the experience and update steps, micro-batching, the
static hyper-parameters, and 8 devices == 1 device."""
import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from diffchat_jax.models import bloom
from diffchat_jax.rl import gae, ppo
from diffchat_jax.utils import mesh as mesh_lib
from tests import helpers

CONFIG = bloom.BloomConfig(vocab_size=40, hidden_size=32, n_layer=4, n_head=4, value_head=True)
PROMPT, RESPONSE = 5, 6
HP = ppo.Hyper(prompt_length=PROMPT, n_layer=4, trainable_blocks=2, gamma=0.99, lam=0.95, alpha=0.05, clip=0.2,
               value_clip=0.2, vf_coef=0.5, ent_coef=0.01, whiten_advantages=False, ppo_epochs=2, minibatch_size=4,
               grad_accum=1, logprob_chunk=4)


def make_params():
    params = bloom.init_params(CONFIG, jax.random.PRNGKey(0))
    # A non-zero value head, so values (and their gradients) are not trivially 0.
    params["value_head"]["kernel"] = 0.1 * jax.random.normal(jax.random.PRNGKey(1), params["value_head"]["kernel"].shape)
    return params


def make_batch(batch=8, seed=0) -> ppo.Batch:
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(2, PROMPT + 1, size=batch)
    response_len = rng.integers(1, RESPONSE + 1, size=batch)
    prompt_mask = (np.arange(PROMPT)[None] >= PROMPT - prompt_len[:, None]).astype(np.int32)  # left-padded
    response_mask = (np.arange(RESPONSE)[None] < response_len[:, None]).astype(np.int32)
    ids = rng.integers(0, CONFIG.vocab_size, size=(batch, PROMPT + RESPONSE)).astype(np.int32)
    ci_state = np.cumsum(rng.uniform(0, 0.2, size=(batch, RESPONSE)), 1).astype(np.float32) * response_mask
    return ppo.Batch(input_ids=ids, attention_mask=np.concatenate([prompt_mask, response_mask], 1),
                     response_mask=response_mask, ci_state=ci_state,
                     scores=rng.normal(size=batch).astype(np.float32))


def run_update(params, batch, hp=HP, seed=0, tx=optax.adamw(1e-2), mesh=None, compiled_text=False):
    """experience then update, jitted as the learner does; returns (state, frozen, stats), and with
    compiled_text=True also the update's compiled HLO."""
    module = bloom.Bloom(CONFIG)
    mesh = mesh or mesh_lib.make_mesh(jax.devices()[:1])
    trainable, frozen = ppo.partition(params, CONFIG.n_layer, hp.trainable_blocks)
    trainable, frozen = mesh_lib.shard_params((trainable, frozen), mesh)
    state = ppo.TrainState(trainable, mesh_lib.shard_params(tx.init(trainable), mesh))
    steps = ppo.make_steps(module, tx, hp, mesh, state, frozen)
    exp, _ = steps.experience(trainable, frozen, trainable, mesh_lib.shard_batch(batch, mesh), jnp.float32(0.05))
    key = jax.random.PRNGKey(seed)
    text = steps.update.lower(state, frozen, exp, key).compile().as_text() if compiled_text else None
    state, stats = steps.update(jax.tree.map(jnp.copy, state), frozen, exp, key)
    return (state, frozen, stats, text) if compiled_text else (state, frozen, stats)


def test_is_trainable_last_blocks_ln_f_value_head():
    flags = {name: ppo.is_trainable((name,), n_layer=4, n_trainable=2)
             for name in ("word_embeddings", "word_embeddings_layernorm", "h_0", "h_1", "h_2", "h_3", "ln_f",
                          "value_head")}
    assert flags == {"word_embeddings": False, "word_embeddings_layernorm": False, "h_0": False, "h_1": False,
                     "h_2": True, "h_3": True, "ln_f": True, "value_head": True}
    assert ppo.is_trainable(("word_embeddings",), n_layer=4, n_trainable=4)


def test_partition_merge_round_trip():
    params = make_params()
    trainable, frozen = ppo.partition(params, CONFIG.n_layer, 2)
    assert set(trainable) == {"h_2", "h_3", "ln_f", "value_head"}
    merged = ppo.merge(trainable, frozen)
    assert traverse_util.flatten_dict(merged).keys() == traverse_util.flatten_dict(params).keys()
    jax.tree.map(np.testing.assert_array_equal, merged, params)


def test_update_trains_only_the_unfrozen_part():
    params = make_params()
    state, frozen, stats = run_update(params, make_batch())
    trainable_before, frozen_before = ppo.partition(params, CONFIG.n_layer, 2)
    jax.tree.map(np.testing.assert_array_equal, frozen, frozen_before)  # bit-identical
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), state.trainable, trainable_before))
    assert all(changed)
    # Optimizer state exists only for trainable params.
    opt_paths = {path[0].key for path, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
                 if path and hasattr(path[0], "key")}
    assert not opt_paths & {"h_0", "h_1", "word_embeddings", "word_embeddings_layernorm"}
    assert all(np.isfinite(v) for v in jax.tree.leaves(stats))


def test_grad_accumulation_is_exact():
    """Token-share weighting makes 2 micro-batches give the minibatch's gradient; SGD exposes it unnormalised."""
    params, batch = make_params(), make_batch()
    one, _, stats_one = run_update(params, batch, tx=optax.sgd(1.0))
    two, _, stats_two = run_update(params, batch, hp=dataclasses.replace(HP, grad_accum=2), tx=optax.sgd(1.0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), one.trainable, two.trainable)
    for k in ("policy_loss", "value_loss", "entropy"):
        np.testing.assert_allclose(stats_one[k], stats_two[k], rtol=1e-4, atol=1e-7)


def scaled_trainable(params, factor):
    """params with the trainable part (HP.trainable_blocks) scaled: a reference policy that differs from it."""
    trainable, frozen = ppo.partition(params, CONFIG.n_layer, HP.trainable_blocks)
    return ppo.merge(jax.tree.map(lambda x: x * factor, trainable), frozen)


def experience(params, ref, batch, hp=HP, beta=0.5):
    module = bloom.Bloom(CONFIG)
    trainable, frozen = ppo.partition(params, CONFIG.n_layer, hp.trainable_blocks)
    ref_trainable, _ = ppo.partition(ref, CONFIG.n_layer, hp.trainable_blocks)
    return jax.jit(ppo.make_experience_fn(module, hp))(trainable, frozen, ref_trainable, batch, beta)


def test_experience_rewards_kl_and_vci():
    """With policy == reference the KL term vanishes: advantages come from the scalar reward at the last token
    and V̂ = V + alpha * CI alone; compare with GAE computed here from the model's own values."""
    params, batch = make_params(), make_batch(seed=3)
    batch = batch.replace(scores=np.arange(8, dtype=np.float32))
    hp = dataclasses.replace(HP, gamma=0.9, lam=0.8)
    exp, stats = experience(params, params, batch, hp)
    np.testing.assert_allclose(stats["kl"], 0.0, atol=1e-6)
    module = bloom.Bloom(CONFIG)
    full = module.apply({"params": params}, batch.input_ids, batch.attention_mask)
    values = full.values[:, PROMPT - 1:-1]
    mask = batch.response_mask.astype(np.float32)
    lengths = mask.sum(1).astype(int)
    rewards = np.zeros_like(mask)
    rewards[np.arange(8), lengths - 1] = np.asarray(batch.scores)
    want_adv, want_ret = gae.gae_advantages(rewards, values, mask, 0.9, 0.8, ci=batch.ci_state, alpha=0.05)
    np.testing.assert_allclose(exp.advantages, want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exp.returns, want_ret, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exp.old_values, (np.asarray(values) + 0.05 * batch.ci_state) * mask, atol=1e-6)
    # The frozen trunk: blocks h_0, h_1 of the full model, kept for the update.
    trunk = module.apply({"params": params}, batch.input_ids, batch.attention_mask, blocks=(0, 2)).hidden
    np.testing.assert_allclose(exp.trunk, trunk, rtol=1e-5, atol=1e-7)

    # A different reference (in the trainable part: the frozen one is shared): the per-token reward gains
    # -beta * (log pi - log pi_ref), computed here the plain [B, N, V] way.
    ref = scaled_trainable(params, 1.1)
    exp_ref, stats_ref = experience(params, ref, batch, hp)
    logp_of = lambda p: jnp.take_along_axis(jax.nn.log_softmax(module.apply(
        {"params": p}, batch.input_ids, batch.attention_mask).logits[:, PROMPT - 1:-1]),
        batch.input_ids[:, PROMPT:, None], -1)[..., 0]
    kl = (logp_of(params) - logp_of(ref)) * mask
    np.testing.assert_allclose(stats_ref["kl"], kl.sum(1).mean(), rtol=1e-4)
    np.testing.assert_allclose(exp_ref.old_logp, logp_of(params) * mask, rtol=1e-5, atol=1e-5)
    want_adv, _ = gae.gae_advantages(rewards - 0.5 * np.asarray(kl), values, mask, 0.9, 0.8,
                                     ci=batch.ci_state, alpha=0.05)
    np.testing.assert_allclose(exp_ref.advantages, want_adv, rtol=1e-4, atol=1e-5)


def test_experience_in_micro_batches_equals_one_pass():
    params, batch = make_params(), make_batch(seed=4)
    ref = scaled_trainable(params, 0.9)
    whole, stats = experience(params, ref, batch, dataclasses.replace(HP, whiten_advantages=True))
    micro, micro_stats = experience(params, ref, batch, dataclasses.replace(HP, whiten_advantages=True,
                                                                              experience_batch_size=2))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), micro, whole)
    np.testing.assert_allclose(micro_stats["kl"], stats["kl"], rtol=1e-5)
    # Whitened over the batch: zero mean, unit variance over the response tokens.
    mask = batch.response_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(whole.advantages)[mask].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(whole.advantages)[mask].std(), 1.0, rtol=1e-4)


def test_entropy_bonus_off_removes_its_backward_pass():
    """ent_coef is a constant to XLA: 0 compiles an update without the entropy gradient (fewer FLOPs), while the
    entropy statistic is still reported."""
    params, batch = make_params(), make_batch()
    trainable, frozen = ppo.partition(params, CONFIG.n_layer, 2)
    tx = optax.sgd(0.1)
    state = ppo.TrainState(trainable, tx.init(trainable))
    exp, _ = experience(params, params, batch)

    def flops(ent_coef):
        fn = jax.jit(ppo.make_update_fn(bloom.Bloom(CONFIG), tx, dataclasses.replace(HP, ent_coef=ent_coef)))
        compiled = fn.lower(state, frozen, exp, jax.random.PRNGKey(0)).compile()
        return compiled.cost_analysis()["flops"], fn(state, frozen, exp, jax.random.PRNGKey(0))[1]

    (off, stats_off), (on, stats_on) = flops(0.0), flops(0.01)
    assert off < on, (off, on)
    assert stats_off["entropy"] > 0 and np.isfinite(stats_on["entropy"])


def test_hyper_names_the_bad_field():
    import pytest
    with pytest.raises(Exception, match="config.ppo.trainable_blocks .* exceeds the model's 4 blocks"):
        dataclasses.replace(HP, trainable_blocks=5)
    with pytest.raises(Exception, match="config.ppo.minibatch_size .* multiple of ppo.grad_accum"):
        dataclasses.replace(HP, grad_accum=3)


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import dataclasses
    import jax, numpy as np, optax
    from tests import test_ppo as t
    from diffchat_jax.rl import ppo
    from diffchat_jax.utils import mesh as mesh_lib
    assert jax.device_count() == 8
    params, batch = t.make_params(), t.make_batch(batch=16, seed=5)
    hp = dataclasses.replace(t.HP, minibatch_size=8)
    results = []
    for devices, fsdp in ((jax.devices()[:1], 1), (jax.devices(), 1), (jax.devices(), 4)):
        mesh = mesh_lib.make_mesh(devices, fsdp=fsdp)
        # SGD: the update is the gradient itself (Adam would amplify float noise on near-zero gradients).
        state, _, _, text = t.run_update(params, batch, hp=hp, tx=optax.sgd(0.1), mesh=mesh, compiled_text=True)
        if fsdp > 1:
            spec = state.trainable["h_3"]["mlp"]["dense_h_to_4h"]["kernel"].sharding.spec
            assert "fsdp" in spec, spec  # the params really are split
        if len(devices) == 8 and fsdp == 1:
            # Each device runs its row of every 8-row minibatch through the blocks ([1, T, H] activations), not
            # the whole minibatch ([8, T, H]: a shuffle that lost the batch split would run every row everywhere).
            assert "[1,11,32]" in text and "[8,11,32]" not in text
        results.append(jax.device_get(state.trainable))
    diff = lambda a, b: max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))
    before, _ = ppo.partition(params, 4, 2)
    print("MAXDIFF", diff(results[0], results[1]), "FSDP", diff(results[0], results[2]),
          "MOVED", diff(results[0], before))
""")


@pytest.mark.slow
def test_eight_devices_and_fsdp_give_the_same_update_as_one():
    stdout = helpers.run_on_8_cpu_devices(MULTI_DEVICE_SCRIPT)
    fields = stdout.split("MAXDIFF")[1].split()
    assert float(fields[4]) > 1e-3, stdout  # the update really moved the params...
    assert float(fields[0]) < 1e-5, stdout  # ...identically on 1 and 8 devices (data parallel)
    assert float(fields[2]) < 1e-5, stdout  # ...and with the params split over fsdp groups of 4
