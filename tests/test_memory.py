"""The memory report (diffchat_jax.memory): every jitted step compiled on abstract shapes; the trainers' check."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffchat_jax.configs import ppo as ppo_config, sft as sft_config
from diffchat_jax import memory
from diffchat_jax.diffusion import pipeline as sd_pipeline
from diffchat_jax.models import bloom, clip, known
from diffchat_jax.utils import aot
from tests import helpers

PPO_STEPS = ["rollout", "render", "aesthetic", "pickscore", "experience", "update"]


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,count", [("bigscience/bloom-560m", 559_214_592), ("bigscience/bloom-1b1", 1_065_314_304),
                                        ("bigscience/bloom-7b1", 7_069_016_064)])
def test_built_in_bloom_shapes_have_the_published_sizes(name, count):
    _, params = bloom.load_pretrained(name, abstract=True)
    assert n_params(params) == count
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))


def test_built_in_sd15_and_clip_shapes_have_the_published_sizes():
    _, params = sd_pipeline.load_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", abstract=True)
    # diffusers' UNet2DConditionModel, AutoencoderKL and CLIPTextModel of SD 1.5.
    assert (n_params(params["unet"]), n_params(params["vae"]), n_params(params["text_encoder"])) == \
        (859_520_964, 83_653_863, 123_060_480)
    _, params = clip.load_pretrained("openai/clip-vit-large-patch14", abstract=True)
    assert n_params(params) == 427_616_513  # transformers' CLIPModel of openai/clip-vit-large-patch14


def test_abstract_clip_has_the_shapes_of_the_loaded_checkpoint(tmp_path):
    """A random CLIP of a config dict in the table's format (as bench.ppo_step builds them at the real shapes):
    loading it and reading its config.json alone give the same tree."""
    from diffchat_jax.rewards import image
    small = known._clip((2, 32, 4, 64), (2, 48, 4, 96), 16, "gelu")
    folder = image.save_random_clip(str(tmp_path / "clip"), small)
    _, real = clip.load_pretrained(folder)
    _, abstract = clip.load_pretrained(folder, abstract=True)
    assert jax.tree.map(lambda x: x.shape, real) == jax.tree.map(lambda x: x.shape, abstract)


def test_unknown_hub_id_is_named():
    with pytest.raises(FileNotFoundError, match="'someone/bloom-9b' is not a known checkpoint"):
        bloom.load_pretrained("someone/bloom-9b", abstract=True)


@pytest.fixture(scope="module")
def tiny_ppo_config(tmp_path_factory, tiny_model_paths):
    """ppo.py:tiny on tiny random SD + scorers, its policy a config.json only: the report reads no weights."""
    root = tmp_path_factory.mktemp("memory")
    paths = tiny_model_paths
    policy = root / "policy"
    policy.mkdir()
    (policy / "config.json").write_text(json.dumps(
        bloom.BloomConfig(vocab_size=1024, hidden_size=64, n_layer=2, n_head=4).to_hf()))
    config = ppo_config.get_config("tiny")
    return helpers.override(config, **{"model.name_or_path": str(policy),
                                       "tiny_models": os.path.dirname(paths["sd"])})


@pytest.mark.slow
def test_ppo_report_has_every_step_and_grows_with_the_batch(tiny_ppo_config):
    small = memory.job_report(tiny_ppo_config, jax.devices()[:1])
    assert [s.name for s in small.steps] == PPO_STEPS
    assert all(s.peak_gib > 0 and s.temp_gib >= 0 for s in small.steps)
    assert {"policy", "frozen", "reference", "optimizer", "renderer", "aesthetic", "pickscore"} == set(small.resident)
    assert small.peak_gib == pytest.approx(small.resident_gib + max(s.transient_gib for s in small.steps))
    # The same job on twice the batch, with the CI reward only (no renderer or scorers: fewer compilations).
    config = helpers.override(tiny_ppo_config.copy_and_resolve_references(), **{"ppo.batch_size": 64})
    config.reward.components = {"ci": 1.0}
    large = memory.job_report(config, jax.devices()[:1])
    by_name = lambda report: {s.name: s for s in report.steps}
    assert list(by_name(large)) == ["rollout", "experience", "update"]
    for name in by_name(large):
        assert by_name(large)[name].peak_gib > by_name(small)[name].peak_gib, name
    assert large.peak_gib > small.peak_gib - small.resident_gib + large.resident_gib
    assert large.resident == {k: v for k, v in small.resident.items() if k in large.resident}  # same policy
    payload = large.to_json()
    assert set(payload) == {"steps", "resident_gib", "peak_gib"}
    assert set(payload["steps"]["update"]) == {"temp_gib", "args_gib", "out_gib", "peak_gib"}


@pytest.mark.slow
def test_sft_report_and_remat(tmp_path):
    config = sft_config.get_config("tiny")
    plain = memory.job_report(config, jax.devices()[:1])
    assert [s.name for s in plain.steps] == ["train_step"] and set(plain.resident) == {"params", "optimizer"}
    # 2 x 64 is too small for remat to matter; a deeper, wider random model shows it.
    deep = helpers.override(config.copy_and_resolve_references(), **{
        "model.random.n_layer": 6, "model.random.hidden_size": 128, "train.batch_size": 16})
    without = memory.job_report(deep, jax.devices()[:1])
    deep.model.remat = True
    with_remat = memory.job_report(deep, jax.devices()[:1])
    assert with_remat.steps[0].temp_gib < 0.6 * without.steps[0].temp_gib


def run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "diffchat_jax.memory", *args], cwd=helpers.ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_json_and_fsdp_over_several_devices():
    one = run_cli("--config=configs/sft.py:tiny", "--json")
    assert one.returncode == 0, one.stderr
    one = json.loads(one.stdout.strip().splitlines()[-1])
    four = run_cli("--config=configs/sft.py:tiny", "--devices=4", "--config.mesh.fsdp=4")  # the table
    assert four.returncode == 0, four.stderr
    lines = four.stdout.strip().splitlines()
    assert lines[0] == "sft on 4 cpu device(s), mesh.fsdp 4" and lines[2].split()[0] == "train_step"
    peak = float(lines[-1].removeprefix("peak per device: ").removesuffix(" GiB"))
    params = float(next(l for l in lines if l.startswith("resident: ")).split("params ")[1].split(",")[0])
    # Params and optimizer state split 4 ways: a quarter per device (the 1-D ones stay whole, hence the margin).
    assert params < 0.3 * one["resident_gib"]["params"]
    assert peak < one["peak_gib"]
    bad = run_cli("--config=configs/sft.py:tiny", "--devices=4", "--config.mesh.fsdp=3")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == \
        "error: config.mesh.fsdp (3) must be >= 1 and divide the 4 devices"


def test_trainer_stops_when_the_estimate_exceeds_the_limit(tmp_path):
    proc = helpers.start_main("configs/sft.py:tiny", tmp_path, "--config.memory_limit_gib=0.0001")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: config.memory_limit_gib: the job needs about "), last
    assert "largest step, train_step" in last and "the limit is 0.0001 GiB" in last
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_report_lines_and_step_accounting():
    report = aot.Report((aot.StepMemory("a", 1.0, 2.0, 0.5, 0.5, 1.5), aot.StepMemory("b", 3.0, 1.5, 0.1, 0.0, 1.5)),
                        {"params": 1.5})
    assert report.steps[0].peak_gib == 3.0 and report.steps[0].transient_gib == 1.5
    assert report.steps[1].transient_gib == pytest.approx(3.1)
    assert report.peak_gib == pytest.approx(1.5 + 3.1)
    assert report.largest().name == "b"
    assert report.lines()[-1] == "peak per device: 4.600 GiB"


def test_known_config_prefers_a_local_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 3}))
    assert known.config_json(str(tmp_path), known.BLOOM) == {"n_layer": 3}
    assert known.config_json("bigscience/bloom-1b1", known.BLOOM)["hidden_size"] == 1536
