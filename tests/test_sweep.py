"""Sweeps (diffchat_jax/sweep): specs resolve to the expected runs and configs; `run` skips finished runs, resumes a
killed one and goes on after a failed one; `--print-commands` gives commands that each run on their own; `report`
aggregates hand-checkable numbers and lists failed and unfinished runs."""
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from diffchat_jax.errors import ConfigError
from diffchat_jax.sweep import Eval, Run, Sweep, jobs, load_spec, report, runner, spec as spec_lib
from tests import helpers

ABLATIONS = os.path.join(helpers.ROOT, "experiments", "ablations.py")


# ---------------------------------------------------------------------------------------------------------------
# Specs.
# ---------------------------------------------------------------------------------------------------------------
def test_the_ablations_spec_resolves_to_the_papers_runs(tmp_path):
    sweep = load_spec(ABLATIONS)
    names = [r.name for r in sweep.runs]
    assert names == ["full", "no_adm_pos", "no_adm_neg", "no_vci", "alpha_0.01", "alpha_0.1", "alpha_0.5",
                     "ci_thr_0", "ci_thr_0.5", "ci_thr_0.9", "blocks_4", "blocks_all"]
    assert [j.id for j in jobs(sweep)][:4] == ["full/seed0", "full/seed1", "full/seed2", "no_adm_pos/seed0"]
    assert len(jobs(sweep)) == 3 * len(names)
    root = str(tmp_path)
    config = lambda name, seed=0: spec_lib.train_config(spec_lib.Job(sweep.run(name), seed), root)
    full = config("full", seed=2)
    assert (full.mode, full.seed, full.vci.alpha, full.ci.threshold, full.ppo.trainable_blocks) == (
        "ppo", 2, 0.05, 0.7, 8)
    assert full.adm.positive and full.adm.negative and full.sampling.typical_mass == 0.97
    assert not config("no_adm_pos").adm.positive and config("no_adm_pos").sampling.top_p == 0.9
    assert not config("no_adm_neg").adm.negative and config("no_adm_neg").adm.positive
    assert config("no_vci").vci.alpha == 0.0 and config("alpha_0.5").vci.alpha == 0.5
    assert config("ci_thr_0.9").ci.threshold == 0.9 and config("ci_thr_0").ci.threshold == 0.0
    assert config("blocks_4").ppo.trainable_blocks == 4 and config("blocks_all").ppo.trainable_blocks == 24
    # Every group's grid: the paper's values, the shared ones taken from full.
    alphas = [config(n).vci.alpha for n in sweep.groups["alpha"]]
    thresholds = [config(n).ci.threshold for n in sweep.groups["ci_threshold"]]
    blocks = [config(n).ppo.trainable_blocks for n in sweep.groups["trainable_blocks"]]
    assert (alphas, thresholds, blocks) == ([0, 0.01, 0.05, 0.1, 0.5], [0, 0.5, 0.7, 0.9], [4, 8, 24])


def test_spec_options_tiny_seeds_sft_epochs_and_eval(tmp_path):
    sweep = load_spec(ABLATIONS + ":tiny,seeds=2,sft=/models/sft,epochs=1,eval")
    job = spec_lib.Job(sweep.run("no_vci"), 1)
    config = spec_lib.train_config(job, str(tmp_path))
    assert (config.model.name_or_path, config.ppo.epochs, config.seed, config.vci.alpha) == ("/models/sft", 1, 1, 0)
    assert config.render.height == 16  # the tiny variant
    assert [j.id for j in jobs(sweep, ["full"])] == ["full/seed0", "full/seed1"]
    evaluation = spec_lib.eval_config(job, str(tmp_path))
    assert dict(evaluation.eval.systems) == {"user": "identity", "reference": "reference",
                                             "no_vci": "model:" + job.workdir(str(tmp_path))}
    thresholds = [spec_lib.train_config(spec_lib.Job(sweep.run(n), 0), "/r").ci.threshold
                  for n in sweep.groups["ci_threshold"]]
    assert thresholds == [0.0, 0.5, 0.7, 0.9]
    with pytest.raises(ConfigError, match="option 'seeds=three'"):
        load_spec(ABLATIONS + ":seeds=three")
    with pytest.raises(ConfigError, match="option 'fast'"):
        load_spec(ABLATIONS + ":fast")


def write_spec(path, body: str) -> str:
    path.write_text("from diffchat_jax.sweep import Eval, Run, Sweep\n\n" + textwrap.dedent(body), encoding="utf-8")
    return str(path)


def test_bad_specs_and_overrides_name_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="needs 'b', which is not a run listed before it"):
        load_spec(write_spec(tmp_path / "a.py", """
            def get_sweep():
                return Sweep(runs=(Run("a", "configs/sft.py:tiny", needs=("b",)), Run("b", "configs/sft.py:tiny")))
        """))
    with pytest.raises(ConfigError, match="two runs are named 'a'"):
        load_spec(write_spec(tmp_path / "b.py", """
            def get_sweep():
                return Sweep(runs=(Run("a", "configs/sft.py"), Run("a", "configs/sft.py")))
        """))
    with pytest.raises(ConfigError, match="run name 'a/b'"):
        load_spec(write_spec(tmp_path / "c.py", """
            def get_sweep():
                return Sweep(runs=(Run("a/b", "configs/sft.py"),))
        """))
    with pytest.raises(ConfigError, match="no get_sweep"):
        load_spec(write_spec(tmp_path / "d.py", "x = 1\n"))
    with pytest.raises(ConfigError, match="is not a file"):
        load_spec(str(tmp_path / "missing.py"))
    sweep = load_spec(write_spec(tmp_path / "e.py", """
        def get_sweep():
            return Sweep(runs=(Run("a", "configs/sft.py:tiny", {"train.epochz": 2}),
                               Run("b", "configs/sft.py:tiny", {"train.epochs": "many"})))
    """))
    with pytest.raises(ConfigError, match=r"run a/seed0: override 'train.epochz': the config has no such field"):
        spec_lib.train_config(jobs(sweep)[0], str(tmp_path))
    with pytest.raises(ConfigError, match=r"run b/seed0: override 'train.epochs' = 'many'"):
        spec_lib.train_config(jobs(sweep)[1], str(tmp_path))
    with pytest.raises(ConfigError, match=r"--only: \['c'\] name no run of the spec; its runs: \['a', 'b'\]"):
        jobs(sweep, ["c"])


# ---------------------------------------------------------------------------------------------------------------
# Running (real runs of the tiny SFT config, in subprocesses as a user starts them).
# ---------------------------------------------------------------------------------------------------------------
TINY = '{"train.epochs": 1, "checkpoint_every": 8, "log_every": 4, "eval_every": 1000, "data.max_length": 160}'


def sweep_command(*args) -> list[str]:
    return [sys.executable, "-m", "diffchat_jax.sweep", *args]


def run_cli(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_command(*args), cwd=helpers.ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_run_skips_finished_runs_resumes_a_killed_one_and_goes_on_after_a_failure(tmp_path):
    spec = write_spec(tmp_path / "spec.py", f"""
        def get_sweep():
            tiny = {TINY}
            return Sweep(runs=(
                Run("first", "configs/sft.py:tiny", tiny),
                Run("broken", "configs/sft.py:tiny", {{**tiny, "data.train": "{{root}}/no-such-file.jsonl"}}),
                Run("second", "configs/sft.py:tiny", {{**tiny, "model.name_or_path": "{{root}}/first/seed0",
                                                       "model.random.n_layer": 0, "tokenizer.train_vocab_size": 0}},
                    needs=("first",)),
            ))
    """)
    root = tmp_path / "root"
    # The first sweep is killed (the whole process group, as a scheduler preempts) once `second` has a checkpoint.
    proc = subprocess.Popen(sweep_command("run", spec, f"--root={root}"), cwd=helpers.ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ckpt = root / "second" / "seed0" / "checkpoints"
    deadline = time.time() + 600
    while not (ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    first_out = proc.communicate()[0]
    assert "[1/3] first/seed0: starting" in first_out and "[2/3] broken/seed0: failed" in first_out, first_out
    assert runner.read_status(str(root / "second" / "seed0"))["train"] == "running"  # killed while running

    result = run_cli("run", spec, f"--root={root}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[1/3] first/seed0: finished, skipped" in result.stdout
    assert "[3/3] second/seed0: resuming" in result.stdout and "resumed from checkpoint at step" in result.stdout
    assert "broken/seed0: failed" in result.stderr and "no-such-file.jsonl" in result.stderr
    assert "1 run(s) failed ['broken/seed0']" in result.stderr
    rows = [json.loads(line) for line in open(root / "second" / "seed0" / "metrics.jsonl")]
    steps = [r["step"] for r in rows if "train_loss" in r]  # once each: the killed run's extra rows were rewound
    first = [json.loads(line)["step"] for line in open(root / "first" / "seed0" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == first[-1]
    assert os.path.isdir(root / "second" / "seed0" / "export")
    sweep = load_spec(spec)
    assert [runner.job_state(j, str(root)) for j in jobs(sweep)] == ["finished", "failed", "finished"]
    # A third run does nothing but retry the failed one.
    result = run_cli("run", spec, f"--root={root}", "--only=first,second")
    assert result.returncode == 0 and result.stdout.count("finished, skipped") == 2, result.stdout + result.stderr
    # The report lists the failure with its error and averages only the finished runs.
    result = run_cli("report", spec, f"--root={root}")
    assert result.returncode == 0, result.stderr
    text = (root / "report.md").read_text()
    assert "- broken/seed0: failed (train:" in text and "no-such-file.jsonl" in text
    assert "| first |" in text and "| broken |" not in text


@pytest.mark.slow
def test_print_commands_run_on_their_own_and_are_idempotent(tmp_path):
    spec = write_spec(tmp_path / "spec.py", f"""
        def get_sweep():
            tiny = {TINY}
            evaluation = Eval("configs/eval.py:tiny", {{"eval.metrics": ("ci",), "eval.models": {{}},
                                                      "eval.systems": {{"user": "identity"}}, "eval.limit": 4}})
            return Sweep(runs=(Run("a", "configs/sft.py:tiny", tiny, seeds=(0, 1), eval=evaluation),
                               Run("b", "configs/sft.py:tiny", {{**tiny, "model.name_or_path": "{{root}}/a/seed1",
                                   "model.random.n_layer": 0, "tokenizer.train_vocab_size": 0}},
                                   needs=("a",))))
    """)
    root = tmp_path / "root"
    printed = run_cli("run", spec, f"--root={root}", "--print-commands")
    assert printed.returncode == 0, printed.stderr
    commands = [line for line in printed.stdout.splitlines() if not line.startswith("#")]
    assert len(commands) == 3 and "# b/seed0 needs: a" in printed.stdout
    assert all(f"--only={id}" in c for c, id in zip(commands, ["a/seed0", "a/seed1", "b/seed0"]))
    # From another folder, b before its need refuses and names it; then each in any order, each on its own.
    elsewhere = dict(cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
    early = subprocess.run(shlex.split(commands[2]), **elsewhere)
    assert early.returncode == 2 and "needs ['a/seed0', 'a/seed1'] to finish first" in early.stderr, early.stderr
    for command in (commands[1], commands[0], commands[2]):
        done = subprocess.run(shlex.split(command), **elsewhere)
        assert done.returncode == 0, done.stdout + done.stderr
    sweep = load_spec(spec)
    assert all(runner.job_state(j, str(root)) == "finished" for j in jobs(sweep))
    assert os.path.exists(root / "a" / "seed0" / "eval" / "results.json")
    again = subprocess.run(shlex.split(commands[0]), **elsewhere)  # idempotent: nothing is trained again
    assert again.returncode == 0 and "sft" not in again.stdout + again.stderr, again.stdout + again.stderr
    # The eval's CI joins the report (eval_ci) with the identity baseline beside it.
    results = report.collect(sweep, str(root))
    assert {"eval_ci", "train_loss"} <= set(results[0].final) and "user" in results[0].baselines
    dry = run_cli("run", spec, f"--root={root}", "--dry-run")
    assert dry.stdout.count("skip (finished)") == 3 and "eval.systems.a='model:" in dry.stdout, dry.stdout


# ---------------------------------------------------------------------------------------------------------------
# The report (metrics files written by hand, numbers checked by hand).
# ---------------------------------------------------------------------------------------------------------------
def fake_run(root, name, seed, rows, state="finished", eval_ci=None, identity_ci=None, error=None):
    workdir = root / name / f"seed{seed}"
    workdir.mkdir(parents=True)
    with open(workdir / "metrics.jsonl", "w") as f:
        for step, values in rows:
            f.write(json.dumps({"step": step, **values}) + "\n")
    stages = {"train": state} if eval_ci is None else {"train": "finished", "eval": state}
    (workdir / "sweep.json").write_text(json.dumps({**stages, "error": error}))
    if eval_ci is not None and state == "finished":
        (workdir / "eval").mkdir()
        results = [{"system": name, "model": "all", "metric": "ci", "mean": eval_ci, "std": 0.0, "n": 1},
                   {"system": "identity", "model": "all", "metric": "ci", "mean": identity_ci, "std": 0, "n": 1},
                   {"system": name, "model": "sd15", "metric": "ci", "mean": -9.0, "std": 0.0, "n": 1}]
        (workdir / "eval" / "results.json").write_text(json.dumps({"results": results}))


def test_report_is_mean_and_std_over_finished_seeds_and_lists_the_others(tmp_path):
    sweep = Sweep(runs=(Run("full", "configs/ppo.py", seeds=(0, 1, 2), eval=Eval()),
                        Run("no_vci", "configs/ppo.py", seeds=(0, 1), eval=Eval())),
                  groups={"vci": ("full", "no_vci")}, final_window=2, columns=("reward", "kl", "eval_*"),
                  curves=("reward",))
    curve = lambda r: [(1, {"reward": 0.0, "kl": 1.0}), (2, {"reward": r - 2, "kl": 2.0}),
                       (3, {"reward": r, "kl": 3.0})]
    fake_run(tmp_path, "full", 0, curve(1.0), eval_ci=0.5, identity_ci=0.25)
    fake_run(tmp_path, "full", 1, curve(3.0), eval_ci=0.7, identity_ci=0.25)
    fake_run(tmp_path, "full", 2, curve(100.0), state="failed", eval_ci=0.9, error="eval: out of memory")
    fake_run(tmp_path, "no_vci", 0, curve(5.0), eval_ci=0.4, identity_ci=0.25)
    fake_run(tmp_path, "no_vci", 1, curve(7.0)[:1], state="running")  # killed: unfinished
    report.write_report(sweep, str(tmp_path))

    with open(tmp_path / "results.csv") as f:
        rows = {(r["run"], r["metric"]): r for r in __import__("csv").DictReader(f)}
    # full: final reward per seed = mean of the last 2 rows: seed 0 (-1 + 1) / 2 = 0, seed 1 (1 + 3) / 2 = 2.
    assert float(rows[("full", "reward")]["mean"]) == pytest.approx(1.0)
    assert float(rows[("full", "reward")]["std"]) == pytest.approx(np.std([0.0, 2.0], ddof=1))
    assert rows[("full", "reward")]["n"] == "2" and rows[("full", "reward")]["seeds"] == "0 1"
    assert float(rows[("full", "kl")]["mean"]) == pytest.approx(2.5)
    assert float(rows[("full", "eval_ci")]["mean"]) == pytest.approx(0.6)  # the "all" row, not sd15's
    assert float(rows[("no_vci", "reward")]["mean"]) == pytest.approx(4.0) and rows[("no_vci", "reward")]["n"] == "1"
    assert float(rows[("no_vci", "reward")]["std"]) == 0.0
    assert float(rows[("identity (baseline)", "eval_ci")]["mean"]) == pytest.approx(0.25)
    assert rows[("identity (baseline)", "eval_ci")]["n"] == "3"
    text = (tmp_path / "report.md").read_text()
    assert "| full | 1 ± 1.4 (n=2) | 2.5 ± 0 (n=2) | 0.6 ± 0.14 (n=2) |" in text
    assert "- full/seed2: failed (eval: out of memory)" in text and "- no_vci/seed1: unfinished" in text
    assert "3 of 5 runs finished" in text and "## vci" in text
    assert os.path.exists(tmp_path / "curves" / "vci-reward.png") and "curves/vci-reward.png" in text


def test_curves_are_smoothed_per_seed_then_averaged_on_common_steps():
    np.testing.assert_allclose(report.smooth(np.array([1.0, 3.0]), 0.5), [1.0, (0.5 * 0.5 + 1.5) / 0.75])
    steps, mean, std = report.seed_band([(np.array([1, 2, 3]), np.array([0.0, 2.0, 4.0])),
                                         (np.array([1, 2]), np.array([2.0, 2.0]))], 0.0)
    np.testing.assert_array_equal(steps, [1, 2])
    np.testing.assert_allclose(mean, [1.0, 2.0])
    np.testing.assert_allclose(std, [np.sqrt(2.0), 0.0])


@pytest.mark.slow
def test_parallel_runs_wait_for_their_needs_and_log_to_their_workdirs(tmp_path):
    spec = write_spec(tmp_path / "spec.py", """
        def get_sweep():
            evaluation = {"eval.metrics": ("ci",), "eval.models": {}, "eval.systems": {"user": "identity"},
                          "eval.limit": 3}
            return Sweep(runs=(Run("a", "configs/eval.py:tiny,baselines", evaluation, seeds=(0, 1)),
                               Run("b", "configs/eval.py:tiny,baselines", {**evaluation, "eval.limit": 2},
                                   needs=("a",))))
    """)
    root = tmp_path / "root"
    result = run_cli("run", spec, f"--root={root}", "--parallel=2")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    started = [n for n, line in enumerate(lines) if ": starting in" in line]
    finished = {line.split(":")[0]: n for n, line in enumerate(lines) if line.endswith(": finished")}
    assert len(started) == 3 and started[1] == started[0] + 1  # both seeds of a at once
    # b only once a had finished (its own process refuses to start before: exit 2, and the sweep would fail).
    assert started[2] > min(finished["[1/3] a/seed0"], finished["[2/3] a/seed1"])
    for job in ("a/seed0", "a/seed1", "b/seed0"):
        log = (root / job / "sweep.log").read_text()
        assert "results:" in log, log
        rows = json.loads((root / job / "results.json").read_text())["results"]
        assert {r["system"] for r in rows} == {"user"}


# ---------------------------------------------------------------------------------------------------------------
# The CPU study's data (experiments/cpu_study.py).
# ---------------------------------------------------------------------------------------------------------------
def load_study():
    import importlib.util
    module_spec = importlib.util.spec_from_file_location("cpu_study", os.path.join(helpers.ROOT, "experiments",
                                                                                     "cpu_study.py"))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_synthetic_edits_do_what_their_instruction_says():
    study = load_study()
    prompts = ["a castle on a hill, sunset, oil painting", "portrait of a knight, dramatic lighting",
               "a red fox in the snow", "city street at night, neon, rain, cinematic"]
    rows = study.synthetic_edits(prompts, copies=5, seed=0)
    assert len(rows) == 20
    kinds = set()
    for row in rows:
        x, i, y = row["input"], row["edit"], row["output"]
        if i.startswith("add "):
            kinds.add("add")
            phrase = i[4:]
            assert y in prompts and phrase in [p.strip() for p in y.split(",")]
            assert [p.strip() for p in x.split(",")] == [p.strip() for p in y.split(",") if p.strip() != phrase]
        elif i.startswith("turn the "):
            kinds.add("swap")
            old, new = i[len("turn the "):].split(" into ")
            assert x in prompts and y.split() == [new if w == old else w for w in x.split()]
        else:
            kinds.add("style")
            assert i.startswith("make it ") and y == f"{i[len('make it '):]}, {x}" and x in prompts
    assert kinds == {"add", "swap", "style"}


@pytest.mark.skipif(not os.path.isdir(os.path.join(helpers.ROOT, "..", "shared", "data")),
                    reason="../shared/data is not here")
def test_cpu_study_prepare_keeps_the_test_rows_out_of_training(tmp_path):
    study = load_study()
    sweep = load_spec(os.path.join(helpers.ROOT, "experiments", "cpu_study.py"))
    assert [r.name for r in sweep.runs] == ["pretrain", "sft", "full", "no_adm_pos", "no_adm_neg", "no_vci"]
    assert all(r.seeds == (0, 1, 2) and r.needs == ("sft",) and r.eval for r in sweep.runs[2:])
    sweep.prepare(str(tmp_path))
    data = {name: study.read_jsonl(str(tmp_path / "data" / f"{name}.jsonl"))
            for name in ("train", "test", "pretrain", "sft")}
    assert (len(data["train"]), len(data["test"])) == (400, study.TEST_ROWS)
    test_text = {r[k] for r in data["test"] for k in ("input", "output")}
    train_keys = {(r["input"], r["edit"]) for r in data["train"]}
    assert not train_keys & {(r["input"], r["edit"]) for r in data["test"]}
    assert train_keys <= {(r["input"], r["edit"]) for r in data["sft"]}
    for name in ("pretrain", "sft"):  # no synthetic edit starts from or ends in a test caption
        assert not {r[k] for r in data[name] for k in ("input", "output")} & (test_text - {
            r[k] for r in data["train"] for k in ("input", "output")})
    config = spec_lib.train_config(spec_lib.Job(sweep.run("no_vci"), 2), str(tmp_path))
    assert (config.vci.alpha, config.seed, dict(config.reward.components)) == (0.0, 2, {"ci": 1.0})
