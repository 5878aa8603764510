"""SFT trainer: the loss, gradient accumulation, config checks, the tiny run end to end, kill/resume, 8 devices."""
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffchat_jax.configs import sft as sft_config
from tests import helpers
from diffchat_jax.sft import trainer
from diffchat_jax.utils import batching, metrics as metrics_lib, optim
from diffchat_jax.utils.validate import ConfigError


def tiny_config(**overrides):
    return helpers.override(sft_config.get_config("tiny"), **overrides)


def run_main(workdir, *flags):
    return helpers.start_main("configs/sft.py:tiny", workdir, *flags)


# ----- loss ------------------------------------------------------------------------------------------------------
def test_summed_response_nll_matches_hand_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, size=(2, 5))
    mask = np.array([[0, 0, 1, 1, 1], [0, 0, 0, 1, 0]])
    # The identity embedding makes the LM head's input the logits themselves; chunks of 3 positions (of 4).
    total, count = trainer.summed_response_nll(jnp.asarray(logits), jnp.eye(7), jnp.asarray(ids), jnp.asarray(mask),
                                               dtype=jnp.float32, chunk=3)
    expected = 0.0
    for b in range(2):
        for t in range(1, 5):  # logits at t-1 predict token t
            if mask[b, t]:
                logp = logits[b, t - 1] - np.log(np.exp(logits[b, t - 1]).sum())
                expected -= logp[ids[b, t]]
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    assert float(count) == 4.0


def test_split_microbatches_is_strided_and_complete():
    batch = {"a": np.arange(8)[:, None] * np.ones((1, 3))}
    micro = batching.split_microbatches(batch, 2)["a"]
    assert micro.shape == (2, 4, 3)
    np.testing.assert_array_equal(micro[0, :, 0], [0, 2, 4, 6])
    np.testing.assert_array_equal(micro[1, :, 0], [1, 3, 5, 7])


def test_grad_accumulation_equals_one_big_batch():
    """Accumulating over 4 micro-batches gives the same update as the whole batch at once (token-mean loss)."""
    from flax.training import train_state  # pylint: disable=import-outside-toplevel
    from diffchat_jax.models import bloom  # pylint: disable=import-outside-toplevel
    config = tiny_config()
    model_config = bloom.BloomConfig(vocab_size=50, hidden_size=32, n_layer=2, n_head=4)
    params = bloom.init_params(model_config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, size=(8, 12)).astype(np.int32)
    loss_mask = (np.arange(12)[None] >= rng.integers(3, 9, size=(8, 1))).astype(np.int32)  # uneven y lengths
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}
    results = []
    module = bloom.Bloom(model_config)
    for accum in (1, 4):
        tx = optim.make_optimizer(config.train, optim.make_schedule(config.train, 10))
        state = train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx)
        state, metrics = jax.jit(trainer.make_train_step(module, accum, chunk=5))(state, batch)
        results.append((state.params, metrics))
    chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    jax.tree.map(chex_close, results[0][0], results[1][0])
    chex_close(results[0][1]["train_loss"], results[1][1]["train_loss"])


# ----- config checks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("train.lr", -1.0, "config.train.lr must be > 0"),
    ("train.batch_size", 12, "config.train.batch_size must be a positive multiple of grad_accum x devices"),
    ("data.train", "/no/such/file.jsonl", "config.data.train file not found: /no/such/file.jsonl"),
    ("data.on_bad_row", "ignore", "config.data.on_bad_row must be one of ['skip', 'error']"),
    ("model.compute_dtype", "float16", "config.model.compute_dtype must be one of"),
])
def test_validate_config_names_the_field(field, value, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        trainer.validate_config(tiny_config(**{field: value}), num_devices=8)


def test_cli_reports_bad_config_in_one_line(tmp_path):
    proc = run_main(tmp_path / "w", "--config.train.lr=-0.5")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert out.strip().splitlines()[-1] == "error: config.train.lr must be > 0, got -0.5"


# ----- end to end ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_run_learns(tiny_sft_run):
    """The uninterrupted CLI run (conftest's tiny_sft_run): its eval loss must drop clearly. (Kill, Ctrl-C and
    resume of SFT: tests/test_multihost.py, on the same training loop with two processes.)"""
    full, out = tiny_sft_run
    assert "checkpoints:" in out and "transformers export:" in out
    evals = [row["eval_loss"] for row in metrics_lib.read_metrics(full) if "eval_loss" in row]
    # Starts near ln(1024) = 6.93 nats (uniform over the vocabulary); 8 epochs take it below 5.4 (measured 4.76).
    assert evals[-1] < evals[0] - 1.5, evals


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from flax.training import train_state
    from diffchat_jax.configs import sft as sft_config
    from diffchat_jax.models import bloom
    from diffchat_jax.sft import trainer
    from diffchat_jax.utils import mesh as mesh_lib, optim
    assert jax.device_count() == 8, jax.devices()
    config = sft_config.get_config("tiny")
    model_config = bloom.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    params = jax.device_get(bloom.init_params(model_config, jax.random.PRNGKey(0)))  # host copies: steps donate
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(0, 64, size=(16, 20)).astype(np.int32),
                "attention_mask": np.ones((16, 20), np.int32),
                "loss_mask": (np.arange(20)[None] >= rng.integers(4, 15, size=(16, 1))).astype(np.int32)}
               for _ in range(3)]
    finals = []
    module = bloom.Bloom(model_config)
    for devices, fsdp in ((jax.devices()[:1], 1), (jax.devices(), 1), (jax.devices(), 8)):
        mesh = mesh_lib.make_mesh(devices, fsdp=fsdp)
        tx = optim.make_optimizer(config.train, optim.make_schedule(config.train, 10))
        state = train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx)
        state = mesh_lib.shard_params(state, mesh)
        steps = trainer.make_steps(module, 2, 7, mesh, state)
        for batch in batches:
            state, metrics = steps.train(state, mesh_lib.shard_batch(batch, mesh))
        finals.append((jax.device_get(state.params), float(metrics["train_loss"])))
    (p1, l1), (p8, l8), (pf, lf) = finals
    diff = lambda a, b: max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))
    print("MAXDIFF", diff(p1, p8), "MOVED", diff(p1, params), "LOSS", l1, l8, "FSDP", diff(p1, pf), lf)
""")


def test_eight_devices_and_fsdp_give_the_same_steps_as_one():
    stdout = helpers.run_on_8_cpu_devices(MULTI_DEVICE_SCRIPT)
    fields = stdout.split("MAXDIFF")[1].split()
    maxdiff, moved, loss1, loss8 = float(fields[0]), float(fields[2]), float(fields[4]), float(fields[5])
    assert moved > 1e-4  # the steps really changed the parameters...
    assert maxdiff < 1e-5, stdout  # ...identically on 1 and 8 devices (an extra pmean would be 8x off)
    np.testing.assert_allclose(loss1, loss8, rtol=1e-5)
    assert float(fields[7]) < 1e-5, stdout  # ...and with params and optimizer state split 8 ways (fsdp)
    np.testing.assert_allclose(loss1, float(fields[8]), rtol=1e-5)
