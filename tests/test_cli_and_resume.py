"""The command line and the workdir: configs found from any folder, typos answered with the nearest field,
--print_config, list-valued fields as typed, the resume guard on a changed config, rewinding what an interrupted
run wrote after its checkpoint, and failed starts that leave a workdir as it was."""
import hashlib
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from diffchat_jax import cli, errors
from diffchat_jax.configs import ppo as ppo_config, sft as sft_config
from diffchat_jax.sft import trainer as sft_trainer
from diffchat_jax.text import keywords
from diffchat_jax.train import loop, run_config
from diffchat_jax.utils import metrics as metrics_lib
from tests import helpers


def run_from_elsewhere(tmp_path, *args):
    """`python -m diffchat_jax.main ARGS` started in tmp_path, far from the repository root."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "diffchat_jax.main", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_configs_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, _, variant = cli.resolve_config_arg("configs/ppo.py:tiny").partition(":")
    assert path == os.path.join(cli.CONFIG_DIR, "ppo.py") and variant == "tiny"
    assert cli.resolve_config_arg("sft") == os.path.join(cli.CONFIG_DIR, "sft.py")
    own = tmp_path / "configs" / "ppo.py"  # a user's own file of that name wins
    own.parent.mkdir()
    own.write_text("")
    assert cli.resolve_config_arg("configs/ppo.py") == "configs/ppo.py"
    with pytest.raises(errors.ConfigError, match=r"--config: nope.py is not a file and not a packaged config "
                                                 r"\(one of \['chat', 'eval', 'ppo', 'sft'\]\)"):
        cli.resolve_config_arg("nope.py")


def test_unknown_field_names_the_nearest_ones():
    config = sft_config.get_config("tiny")
    with pytest.raises(errors.ConfigError, match=r"config.train.lrate is not a config field; did you mean "
                                                 r"config.train.lr"):
        cli.check_override(config, "train.lrate")
    with pytest.raises(errors.ConfigError, match="config.trian.lr is not a config field; did you mean config.train.lr"):
        cli.check_override(config, "trian.lr")
    cli.check_override(config, "train.lr")  # a field
    assert cli.prepare_argv(["main", "--config", "sft:tiny"]) == ["main", f"--config={cli.CONFIG_DIR}/sft.py:tiny"]
    with pytest.raises(errors.ConfigError, match="--config is required: --config=configs/<name>.py"):
        cli.prepare_argv(["main", "--workdir=/tmp/x"])
    cli.check_override(config, "model.random")  # a group


def test_cli_from_another_folder_prints_the_config_and_one_line_errors(tmp_path):
    printed = run_from_elsewhere(tmp_path, "--config=configs/sft.py:tiny", "--print_config")
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    lr = next(line for line in lines if line.startswith("train.lr = "))
    assert lr.startswith("train.lr = 0.003") and "#" not in lr  # the tiny value; base sft.py gives no comment
    assert any(line.startswith("train.batch_size = 16") and "# global batch" in line for line in lines)
    assert "# data: " not in printed.stdout and any(line.startswith("data.on_bad_row = 'skip'") and
                                                    "# \"skip\" (count and report)" in line for line in lines)
    typo = run_from_elsewhere(tmp_path, "--config=configs/sft.py:tiny", "--config.train.lrate=1")
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert typo.stderr.strip().splitlines() == [
        "error: --config.train.lrate: config.train.lrate is not a config field; did you mean config.train.lr or "
        "config.train.eps or config.train.min_lr_ratio? (--print_config lists every field)"]
    helped = run_from_elsewhere(tmp_path, "--help")
    assert helped.returncode == 0 and "--print_config" in helped.stdout and "--allow_config_change" in helped.stdout
    assert not (tmp_path / "workdirs").exists()  # nothing was started


@pytest.mark.parametrize("typed", [("NN", "JJ"), ["NN", "JJ"], "NN,JJ", ("NN,JJ",), (" NN", "JJ ")])
def test_candidate_pos_reads_as_typed(typed):
    """("NN,JJ",) is what `--config.ci.candidate_pos=NN,JJ` gives (it once meant one tag 'NN,JJ': no keywords)."""
    ci = ml_collections.ConfigDict({"candidate_pos": typed, "stop_list": True, "tagger": "auto"})
    assert keywords.from_config(ci).candidate_pos == ("NN", "JJ")


def test_unknown_candidate_pos_is_refused_before_any_work():
    config = ppo_config.get_config("tiny")
    config.ci.candidate_pos = ("NN,JJ,NOUN",)
    from diffchat_jax.rl import trainer as ppo_trainer
    # Paths that exist in any checkout (the tiny models may not be made yet): only the names are wrong here.
    config.model.name_or_path = config.render.model = helpers.ROOT
    with pytest.raises(errors.ConfigError, match=r"config.ci.candidate_pos has unknown name\(s\) \['NOUN'\]"):
        ppo_trainer.validate_config(config, num_devices=1)
    config.ci.candidate_pos = ("NN,JJ",)
    config.sampling.order = ("ban,top_k",)
    with pytest.raises(errors.ConfigError, match="config.sampling.order must name each of"):
        ppo_trainer.validate_config(config, num_devices=1)


def test_sft_checks_the_model_path():
    config = sft_config.get_config("tiny")
    config.model.name_or_path = "/nope/bloom"
    with pytest.raises(errors.ConfigError, match="config.model.name_or_path not found: /nope/bloom"):
        sft_trainer.validate_config(config, num_devices=1)


def test_one_knob_moves_the_tiny_models():
    config = ppo_config.get_config("tiny")
    helpers.override(config, tiny_models="/models")
    assert (config.render.model, config.reward.aesthetic.clip_model, config.reward.aesthetic.mlp_weights,
            config.reward.pickscore.model) == ("/models/sd", "/models/scorers/clip",
                                               "/models/scorers/aesthetic_mlp.pth", "/models/scorers/pickscore")


def test_resume_refuses_a_config_that_alters_the_run(tmp_path):
    config = sft_config.get_config("tiny")
    assert run_config.check_resume(config, str(tmp_path), allow_change=False) == []  # fresh
    run_config.save(config, str(tmp_path), [])
    (tmp_path / "checkpoints" / "20").mkdir(parents=True)
    changed = sft_config.get_config("tiny")
    changed.train.epochs, changed.log_every = 30, 5
    with pytest.raises(errors.ConfigError, match=r"holds a run started with another config \(config.train.epochs: "
                                                 r"25 -> 30\); .* --allow_config_change"):
        run_config.check_resume(changed, str(tmp_path), allow_change=False)
    assert run_config.check_resume(changed, str(tmp_path), allow_change=True) == ["log_every", "train.epochs"]
    changed.train.epochs = 25  # only the log interval differs: accepted
    assert run_config.check_resume(changed, str(tmp_path), allow_change=False) == ["log_every"]


def test_rewind_drops_what_came_after_the_checkpoint(tmp_path):
    writer = metrics_lib.MetricWriter(str(tmp_path))
    for step in (10, 20, 30):
        writer.write(step, {"loss": float(step)})
    writer.close()
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"iteration": i}) + "\n" for i in (1, 5, 10, 15)))
    for step in ("000005", "000010", "000015"):
        (tmp_path / "images" / step).mkdir(parents=True)
    resumed = metrics_lib.MetricWriter(str(tmp_path))
    resumed.rewind(20)
    metrics_lib.rewind_jsonl(str(tmp_path / "samples.jsonl"), "iteration", 10)
    loop.rewind_step_folders(str(tmp_path / "images"), 10)
    resumed.write(30, {"loss": 31.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(tmp_path)] == [(10, 10.0), (20, 20.0), (30, 31.0)]
    assert [json.loads(l)["iteration"] for l in open(tmp_path / "samples.jsonl")] == [1, 5, 10]
    assert sorted(os.listdir(tmp_path / "images")) == ["000005", "000010"]


def tree_digest(folder) -> dict[str, str]:
    return {os.path.relpath(os.path.join(root, name), folder):
            hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
            for root, _, names in os.walk(folder) for name in names}


BROKEN_DATA = {
    "truncated.jsonl": b'{"source_prompt": "a cat", "instruction": "make it bl',
    "empty.jsonl": b"",
    "random.jsonl": bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8)),
    "numbers.jsonl": b'{"input": 1, "edit": 2, "output": 3}\n',
    "columns.csv": b"a,b\n1,2\n",
    "latin1.jsonl": '{"input": "caf\xe9", "edit": "x", "output": "y"}\n'.encode("latin-1"),
}
BROKEN_CONFIG = [("train.lr", -1.0), ("train.batch_size", 0), ("data.train", "/no/such.jsonl"),
                 ("model.name_or_path", "/no/model"), ("data.max_length", 4), ("train.epochs", 26)]


@pytest.mark.slow
def test_failed_starts_leave_the_workdir_as_it_was(tiny_sft_run, tmp_path):
    """A finished tiny SFT workdir, started again with broken data files and broken or run-changing configs: every
    start ends in a UserError naming the input, and not one byte of the workdir changes."""
    import shutil
    workdir = tmp_path / "run"
    shutil.copytree(tiny_sft_run[0], workdir)
    before = tree_digest(workdir)
    cases = [({"data.train": str(tmp_path / name)}, name) for name in BROKEN_DATA]
    cases += [({field: value}, f"config.{field}") for field, value in BROKEN_CONFIG]
    for name, content in BROKEN_DATA.items():
        (tmp_path / name).write_bytes(content)
    for overrides, named in cases:
        config = sft_config.get_config("tiny")  # the run's own config (TINY_SFT_FLAGS), then the breakage
        for flag in helpers.TINY_SFT_FLAGS:
            key, value = flag.removeprefix("--config.").split("=")
            helpers.override(config, **{key: int(value)})
        helpers.override(config, **overrides)
        with pytest.raises(errors.UserError) as raised:
            sft_trainer.train_and_evaluate(config, str(workdir))
        assert named in str(raised.value), (overrides, str(raised.value))
        assert "\n" not in str(raised.value), str(raised.value)
        assert tree_digest(workdir) == before, overrides


def test_tiny_models_command_line(capsys):
    from diffchat_jax import tiny_models
    with pytest.raises(errors.ConfigError, match=r"unexpected arguments \['--bad'\]; usage: python -m"):
        tiny_models.main(["tiny_models", "--bad"])
    tiny_models.main(["tiny_models", "--help"])
    assert "python -m diffchat_jax.tiny_models [OUT]" in capsys.readouterr().out


def test_tiny_models_are_built_once_and_atomically(tiny_model_paths, tmp_path, monkeypatch, capsys):
    """A complete folder is reused as it is (no file rewritten); a build that fails halfway leaves no folder and
    no staging folder behind."""
    from diffchat_jax import tiny_models
    from diffchat_jax.diffusion import tiny
    out = os.path.dirname(tiny_model_paths["sd"])
    before = tree_digest(out)
    mtimes = {p: os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(out) for f in fs
              for p in [os.path.join(d, f)]}
    tiny_models.main(["tiny_models", out])
    printed = capsys.readouterr().out
    assert f"tiny models already built in {out}" in printed and f"sd: {tiny_model_paths['sd']}" in printed
    assert tiny_models.build(out) == tiny_model_paths
    assert tree_digest(out) == before
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(tiny, "build_ip2p_pipeline", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_models.build(str(tmp_path / "models"))
    assert os.listdir(tmp_path) == []
