"""PPO end to end on the tiny config: it learns, resumes exactly after a kill, and handles non-finite rewards."""
import json

import jax
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from diffchat_jax.configs import ppo as ppo_config
from tests import helpers
from diffchat_jax.rewards import base as reward_base, combine
from diffchat_jax.rl import learner as learner_lib, trainer
from diffchat_jax.text import adm, keywords
from diffchat_jax.utils import mesh as mesh_lib, metrics as metrics_lib

pytestmark = pytest.mark.skipif(not keywords.wordnet_available(), reason="NLTK WordNet is not installed")


main_process = helpers.start_main


def finish(proc, timeout=900):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def tiny_config(sft_dir, **overrides):
    """ppo.py:tiny with the CI reward only (no rendering), for the tests of everything but the images."""
    config = ppo_config.get_config("tiny")
    config.model.name_or_path = sft_dir
    config.reward.components = {"ci": 1.0}
    return helpers.override(config, **overrides)


@reward_base.register("mentions_detail")
def make_detail_component(config):
    """A verifiable text reward the SFT model already supports (most sample targets end in 'highly detailed'),
    so PPO can raise it without leaving the reference model far behind."""
    del config
    return reward_base.Component("mentions_detail",
                                 lambda batch: np.array([float("detailed" in r) for r in batch.responses]))


@pytest.mark.slow
def test_tiny_ppo_learns_a_text_reward_with_bounded_kl(sft_dir, tmp_path):
    """The CI reward is too sparse for the 2 x 64 tiny model to improve within a CPU-minute (its responses rarely
    contain the reference keywords), so learning is shown on a verifiable text reward with the tiny defaults."""
    config = tiny_config(sft_dir, **{"ppo.epochs": 3})
    config.reward.components = {"mentions_detail": 1.0}
    trainer.train_and_evaluate(config, str(tmp_path))
    rows = [r for r in metrics_lib.read_metrics(tmp_path) if "reward" in r]
    first = np.mean([r["reward"] for r in rows[:3]])
    last = np.mean([r["reward"] for r in rows[-3:]])
    assert last > first + 0.3, (first, last)  # measured: 0.07 -> 0.54
    assert max(r["kl"] for r in rows) < 25.0  # nats per response (measured <= 5.0): beta keeps it near SFT
    # The adaptive controller, in the loop: beta rises after an iteration whose KL was above target, else falls.
    for row, after in zip(rows, rows[1:]):
        assert np.sign(after["beta"] - row["beta"]) == np.sign(row["kl"] - config.kl.target), (row, after)
    assert any(r["negatives"] > 0 for r in rows)  # ADM pi- plans were used


@pytest.fixture(scope="module")
def ppo_cli_run(sft_dir, tiny_models, tmp_path_factory):
    """(workdir, console output, flags) of the demo command, `main --config=configs/ppo.py:tiny` on the tiny models
    from the tiny SFT run (7 iterations, checkpointed at 3 and 6): images rendered by the tiny SD and scored
    (aesthetic, PickScore) with CI, ADM and VCI."""
    flags = [f"--config.model.name_or_path={sft_dir}", "--config.ppo.epochs=1", "--config.checkpoint_every=3",
             *(f"--config.{k}={v}" for k, v in tiny_models.items())]

    def make(workdir):
        (workdir / "console.txt").write_text(finish(main_process("configs/ppo.py:tiny", workdir, *flags)))

    workdir = helpers.once_per_run(tmp_path_factory, "ppo_cli", make)
    return workdir, (workdir / "console.txt").read_text(), flags


@pytest.mark.slow
def test_tiny_ppo_cli_end_to_end(ppo_cli_run):
    """The demo command writes metrics, samples, image grids and PNGs, checkpoints and the export."""
    workdir, out, _ = ppo_cli_run
    assert "sample responses:" in out and "transformers export" in out
    rows = [r for r in metrics_lib.read_metrics(workdir) if "reward_ci" in r]
    assert len(rows) == 7 and all(0.0 <= r["reward_ci"] <= 1.0 for r in rows)
    assert all(np.isfinite(r["reward_aesthetic"]) and np.isfinite(r["reward_pickscore"]) for r in rows)
    assert all(r["time_render_s"] > 0 for r in rows)
    samples = [json.loads(line) for line in open(workdir / "samples.jsonl", encoding="utf-8")]
    assert samples and all({"x", "i", "response", "ci", "aesthetic", "pickscore", "negative", "edits"} <= set(s)
                           for s in samples)
    # Image grids at iterations 1 and 5 (render.log_every 5): PNGs with their prompts, and TensorBoard images.
    logged = sorted(p.name for p in (workdir / "images").iterdir())
    assert logged == ["000001", "000005"], logged
    pngs = sorted((workdir / "images" / "000005").glob("*.png"))
    assert len(pngs) == 8
    with Image.open(pngs[0]) as image:
        assert image.size == (16, 16) and image.text["prompt"] and image.text["seed"] == "0"
    events = list(workdir.glob("events.out.tfevents.*"))
    assert events and any(b"samples" in e.read_bytes() for e in events)
    assert (workdir / "export" / "value_head.safetensors").exists()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6", "7"]


@pytest.mark.slow
def test_kill_and_resume_match_uninterrupted(ppo_cli_run, tmp_path):
    """With the image rewards on, rendering too must continue exactly where the killed run left off: SIGKILLed
    at a random point after the checkpoint at iteration 3 and resumed, the same export and the same files as the
    uninterrupted run (checkpoints, metrics.jsonl, samples.jsonl, PNGs). (Ctrl-C and resume on the same loop:
    tests/test_multihost.py.)"""
    full, _, flags = ppo_cli_run
    killed = tmp_path / "killed"
    proc = main_process("configs/ppo.py:tiny", killed, *flags)
    helpers.kill_after_first_checkpoint(proc, killed / "checkpoints",
                                        delay_s=float(np.random.default_rng().uniform(0.0, 2.0)))
    out = finish(main_process("configs/ppo.py:tiny", killed, *flags))
    assert "resumed from checkpoint at iteration 3" in out, out
    a = safetensors.numpy.load_file(str(full / "export" / "model.safetensors"))
    b = safetensors.numpy.load_file(str(killed / "export" / "model.safetensors"))
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)
    helpers.assert_same_outputs(full, killed)


def test_rollout_in_chunks_keeps_every_row(sft_dir):
    """ppo.rollout_batch_size: the batch sampled in calls of 8 rows gives the tokens of one call, in order, with
    typical sampling and ADM pi- plans (a row's draws depend on its position in the batch, not on its call: what
    also makes hosts that sample their own rows agree); the memory report then sizes the rollout by the chunk."""
    config = tiny_config(sft_dir, **{"adm.negative_fraction": 0.5})
    prompts = trainer.load_prompts(config)
    rows = np.arange(32)
    ids, mask = trainer.left_padded_prompts(prompts.data, rows, prompts.prompt_length,
                                            prompts.tokenizer.pad_token_id)
    plans = adm.make_plans([prompts.references[r][2] for r in rows], prompts.vocab, prompts.tokenizer, seed=0,
                           negative_fraction=0.5)
    outputs, rollout_rows = [], []
    for chunk in (0, 8):
        config.ppo.rollout_batch_size = chunk
        learner = learner_lib.Learner(config, mesh_lib.make_mesh(), prompt_length=prompts.prompt_length,
                                      tokenizer=prompts.tokenizer)
        outputs.append(learner.rollout(ids, mask, plans, jax.random.PRNGKey(0), rows))
        rollout_rows.append(learner.device_steps()[0].args[2].shape[0])
    np.testing.assert_array_equal(outputs[1][0], outputs[0][0])
    np.testing.assert_array_equal(outputs[1][1], outputs[0][1])
    assert outputs[0][1].sum(1).min() > 0 and rollout_rows == [32, 8] and plans.negative.sum() > 4


@reward_base.register("nan_for_sample_1")
def make_nan_component(config):
    del config
    return reward_base.Component("nan_for_sample_1", lambda batch: np.where(np.arange(len(batch)) == 1, np.nan, 1.0))


def test_nonfinite_reward_stops_the_run_naming_the_sample(sft_dir, tmp_path):
    config = tiny_config(sft_dir, **{"ppo.epochs": 1})
    config.reward.components = {"ci": 1.0, "nan_for_sample_1": 1.0}
    with pytest.raises(combine.NonFiniteReward, match="'nan_for_sample_1' is nan for sample 1"):
        trainer.train_and_evaluate(config, str(tmp_path))


def test_nonfinite_reward_masked_when_asked(sft_dir, tmp_path):
    config = tiny_config(sft_dir, **{"ppo.epochs": 1, "reward.on_nonfinite": "mask"})
    config.reward.components = {"ci": 1.0, "nan_for_sample_1": 1.0}
    result = trainer.train_and_evaluate(config, str(tmp_path))
    rows = [r for r in metrics_lib.read_metrics(tmp_path) if "masked_samples" in r]
    assert rows and all(r["masked_samples"] == 1.0 for r in rows)
    assert np.isfinite(result["last_reward"]) and all(np.isfinite(r["policy_loss"]) for r in rows)


def test_image_rewards_need_a_stable_diffusion_model(sft_dir, tmp_path):
    config = tiny_config(sft_dir, **{"render.model": str(tmp_path / "nope")})
    config.reward.components = {"ci": 1.0, "aesthetic": 1.0}
    with pytest.raises(Exception, match="config.render.model not found: .*nope .*python -m diffchat_jax.tiny_models"):
        trainer.train_and_evaluate(config, str(tmp_path))
    config.render.model = sft_dir
    config.render.solver = "plms"
    with pytest.raises(Exception, match="config.render.solver"):
        trainer.validate_config(config, num_devices=1)


def test_bad_ppo_config_names_the_field(sft_dir):
    with pytest.raises(Exception, match="config.ppo.batch_size .* must be a multiple of ppo.minibatch_size"):
        trainer.validate_config(tiny_config(sft_dir, **{"ppo.batch_size": 30}), num_devices=1)
    with pytest.raises(Exception, match="config.model.name_or_path not found: /nope"):
        trainer.validate_config(tiny_config("/nope"), num_devices=1)


def test_render_seeds_follow_the_seed_policy():
    import ml_collections
    r = ml_collections.ConfigDict(dict(seed=10, images_per_prompt=3, seed_policy="fixed"))
    fixed = learner_lib.render_seeds(r, iteration=7, batch_size=2)
    np.testing.assert_array_equal(fixed, [[10, 11, 12], [10, 11, 12]])  # every response, every iteration
    np.testing.assert_array_equal(learner_lib.render_seeds(r, iteration=0, batch_size=2), fixed)
    r.seed_policy = "per_iteration"
    np.testing.assert_array_equal(learner_lib.render_seeds(r, iteration=0, batch_size=1), [[10, 11, 12]])
    np.testing.assert_array_equal(learner_lib.render_seeds(r, iteration=2, batch_size=1), [[16, 17, 18]])
