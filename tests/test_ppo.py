"""The PPO core (diffchat_jax.rl.ppo): partial unfreezing, experience, the update, and 8 devices == 1 device."""
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from diffchat_jax.models import bloom
from diffchat_jax.rl import gae, ppo
from tests import helpers

CONFIG = bloom.BloomConfig(vocab_size=40, hidden_size=32, n_layer=4, n_head=4, value_head=True)
PROMPT, RESPONSE = 5, 6
HP = {"clip": 0.2, "value_clip": 0.2, "vf_coef": 0.5, "ent_coef": 0.01, "alpha": 0.05}


def make_params():
    params = bloom.init_params(CONFIG, jax.random.PRNGKey(0))
    # A non-zero value head, so values (and their gradients) are not trivially 0.
    params["value_head"]["kernel"] = 0.1 * jax.random.normal(jax.random.PRNGKey(1), params["value_head"]["kernel"].shape)
    return params


def make_batch(batch=8, seed=0):
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(2, PROMPT + 1, size=batch)
    response_len = rng.integers(1, RESPONSE + 1, size=batch)
    prompt_mask = (np.arange(PROMPT)[None] >= PROMPT - prompt_len[:, None]).astype(np.int32)  # left-padded
    response_mask = (np.arange(RESPONSE)[None] < response_len[:, None]).astype(np.int32)
    ids = rng.integers(0, CONFIG.vocab_size, size=(batch, PROMPT + RESPONSE)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.concatenate([prompt_mask, response_mask], 1),
            "response_mask": response_mask,
            "ci_state": np.cumsum(rng.uniform(0, 0.2, size=(batch, RESPONSE)), 1).astype(np.float32) * response_mask}


def run_update(params, data, grad_accum=1, seed=0, tx=optax.adamw(1e-2)):
    module = bloom.Bloom(CONFIG)
    trainable, frozen = ppo.partition(params, CONFIG.n_layer, 2)
    scores = jnp.asarray(np.random.default_rng(seed).normal(size=len(data["input_ids"])), jnp.float32)
    exp = ppo.experience(module.apply, params, params, data, scores, data["ci_state"], prompt_length=PROMPT,
                         beta=0.05, gamma=0.99, lam=0.95, alpha=HP["alpha"])
    update_data = {**data, **{k: exp[k] for k in ("old_logp", "old_values", "advantages", "returns")}}
    opt_state = tx.init(trainable)
    trainable, opt_state, stats = jax.jit(ppo.update, static_argnums=(3, 4), static_argnames=(
        "prompt_length", "ppo_epochs", "minibatch_size", "grad_accum"))(
        trainable, opt_state, frozen, module.apply, tx, update_data, jax.random.PRNGKey(seed),
        prompt_length=PROMPT, hp=HP, ppo_epochs=2, minibatch_size=4, grad_accum=grad_accum)
    return trainable, frozen, opt_state, stats


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
    trainable, frozen, opt_state, stats = run_update(params, make_batch())
    _, frozen_before = ppo.partition(params, CONFIG.n_layer, 2)
    jax.tree.map(np.testing.assert_array_equal, frozen, frozen_before)  # bit-identical
    trainable_before, _ = ppo.partition(params, CONFIG.n_layer, 2)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), trainable, trainable_before))
    assert all(changed)
    # Optimizer state exists only for trainable params.
    opt_paths = {path[0].key for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]
                 if path and hasattr(path[0], "key")}
    assert not opt_paths & {"h_0", "h_1", "word_embeddings", "word_embeddings_layernorm"}
    assert all(np.isfinite(v) for v in jax.tree.leaves(stats))


def test_grad_accumulation_is_exact():
    """Token-share weighting makes 2 micro-batches give the minibatch's gradient; SGD exposes it unnormalised."""
    params = make_params()
    data = make_batch()
    one, *_, stats_one = run_update(params, data, grad_accum=1, tx=optax.sgd(1.0))
    two, *_, stats_two = run_update(params, data, grad_accum=2, tx=optax.sgd(1.0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), one, two)
    for k in ("policy_loss", "value_loss", "entropy"):
        np.testing.assert_allclose(stats_one[k], stats_two[k], rtol=1e-4, atol=1e-7)


def test_experience_rewards_kl_and_vci():
    """With policy == reference the KL term vanishes: advantages come from the scalar reward at the last token
    and V̂ = V + alpha * CI alone; compare with GAE computed here from the model's own values."""
    params = make_params()
    data = make_batch(seed=3)
    module = bloom.Bloom(CONFIG)
    scores = jnp.arange(8, dtype=jnp.float32)
    exp = ppo.experience(module.apply, params, params, data, scores, data["ci_state"], prompt_length=PROMPT,
                         beta=0.5, gamma=0.9, lam=0.8, alpha=0.05)
    np.testing.assert_allclose(exp["kl"], 0.0, atol=1e-6)
    _, _, values = ppo.response_forward(module.apply, params, data, PROMPT)
    mask = data["response_mask"].astype(np.float32)
    lengths = mask.sum(1).astype(int)
    rewards = np.zeros_like(mask)
    rewards[np.arange(8), lengths - 1] = np.asarray(scores)
    want_adv, want_ret = gae.gae_advantages(rewards, values, mask, 0.9, 0.8, ci=data["ci_state"], alpha=0.05)
    np.testing.assert_allclose(exp["advantages"], want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exp["returns"], want_ret, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exp["old_values"], (np.asarray(values) + 0.05 * data["ci_state"]) * mask, atol=1e-6)

    # A different reference: the per-token reward gains -beta * (log pi - log pi_ref).
    ref = jax.tree.map(lambda x: x * 1.1, params)
    exp_ref = ppo.experience(module.apply, params, ref, data, scores, data["ci_state"], prompt_length=PROMPT,
                             beta=0.5, gamma=0.9, lam=0.8, alpha=0.05)
    _, logp, _ = ppo.response_forward(module.apply, params, data, PROMPT)
    _, ref_logp, _ = ppo.response_forward(module.apply, ref, data, PROMPT)
    np.testing.assert_allclose(exp_ref["kl"], (np.asarray(logp) - np.asarray(ref_logp)) * mask, atol=1e-5)
    want_adv, _ = gae.gae_advantages(rewards - 0.5 * np.asarray(exp_ref["kl"]), values, mask, 0.9, 0.8,
                                     ci=data["ci_state"], alpha=0.05)
    np.testing.assert_allclose(exp_ref["advantages"], want_adv, rtol=1e-4, atol=1e-5)


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import jax, numpy as np, optax
    from tests import test_ppo as t
    from diffchat_jax.rl import ppo
    from diffchat_jax.utils import mesh as mesh_lib
    assert jax.device_count() == 8
    params, data = t.make_params(), t.make_batch(batch=16, seed=5)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = mesh_lib.make_mesh(devices)
        # SGD: the update is the gradient itself (Adam would amplify float noise on near-zero gradients).
        trainable, *_ = t.run_update(mesh_lib.replicate(params, mesh), mesh_lib.shard_batch(data, mesh),
                                     tx=optax.sgd(0.1))
        results.append(jax.device_get(trainable))
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), *results)))
    before, _ = ppo.partition(params, 4, 2)
    moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), results[0], before)))
    print("MAXDIFF", diff, "MOVED", moved)
""")


def test_eight_devices_give_the_same_update_as_one():
    stdout = helpers.run_on_8_cpu_devices(MULTI_DEVICE_SCRIPT)
    fields = stdout.split("MAXDIFF")[1].split()
    assert float(fields[2]) > 1e-3, stdout  # the update really moved the params...
    assert float(fields[0]) < 1e-5, stdout  # ...identically on 1 and 8 devices
