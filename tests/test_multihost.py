"""Many hosts: `main` as 2 real processes x 4 CPU devices on localhost (jax.distributed with a local coordinator,
CPU collectives over gloo) against 1 process x 8 devices; interruptions of the 2-process job; failing processes."""
import json
import time

import numpy as np
import pytest
import safetensors.numpy

from diffchat_jax.data import SAMPLE_PATH
from diffchat_jax.text import keywords
from tests import helpers

SFT_FLAGS = ("--config.train.epochs=1", "--config.checkpoint_every=5", "--config.eval_every=5")  # 13 steps


def exports_close(a, b, atol: float) -> None:
    a, b = (safetensors.numpy.load_file(str(root / "export" / "model.safetensors")) for root in (a, b))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=atol, err_msg=name)


@pytest.mark.slow
def test_sft_on_two_processes_gives_one_process_steps_through_a_kill_and_a_ctrl_c_on_one_host(tmp_path):
    """13 SFT steps on 2 x 4 devices, SIGKILLed (both processes, as a preempted job) at a random point after the
    first checkpoint, rerun, stopped by a Ctrl-C that process 1 alone got (both stop after the same step), rerun:
    the losses, evals, checkpoints and export of 1 process x 8 devices."""
    reference = helpers.start_processes("configs/sft.py:tiny", tmp_path / "one", *SFT_FLAGS, processes=1, devices=8)
    job = tmp_path / "two"
    rng = np.random.default_rng()
    procs = helpers.start_processes("configs/sft.py:tiny", job, *SFT_FLAGS)
    helpers.kill_after_first_checkpoint(procs[0], job / "checkpoints", delay_s=float(rng.uniform(0, 1)))
    procs[1].kill()
    procs[1].wait()
    procs = helpers.start_processes("configs/sft.py:tiny", job, *SFT_FLAGS)
    helpers.interrupt_once_running(procs[1], job, after_step=5, delay_s=float(rng.uniform(0, 1)))
    out0, _ = procs[0].communicate(timeout=300)
    assert procs[0].returncode == 130 and "resumed from checkpoint at step 5" in out0, out0
    stopped = out0.strip().splitlines()[-1]
    assert stopped.startswith("stopped: interrupted at step "), out0
    out = helpers.wait_all(helpers.start_processes("configs/sft.py:tiny", job, *SFT_FLAGS))[0]
    step = stopped.split("interrupted at step ")[1].split()[0]
    assert f"resumed from checkpoint at step {step}" in out and "transformers export:" in out, out
    helpers.wait_all(reference)
    helpers.assert_same_outputs(tmp_path / "one", job)
    exports_close(tmp_path / "one", job, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not keywords.wordnet_available(), reason="NLTK WordNet is not installed")
def test_ppo_on_two_processes_samples_scores_and_updates_as_one(sft_dir, tiny_models, tmp_path):
    """An iteration of configs/ppo.py:tiny with its image rewards (32 rows) on 2 x 4 devices samples the same
    tokens for every row (ADM pi+ and pi- included), renders and scores them the same, logs the same and updates
    to the same params as 1 x 8: each process ran the host stages on its own 16 rows."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(open(SAMPLE_PATH, encoding="utf-8").readlines()[:32]), encoding="utf-8")
    flags = (f"--config.model.name_or_path={sft_dir}", f"--config.data.train={data}", "--config.ppo.epochs=1",
             "--config.samples_per_log=32", "--config.reward.components.pickscore=0",
             *(f"--config.{k}={v}" for k, v in tiny_models.items()))
    one, two = tmp_path / "one", tmp_path / "two"
    runs = [helpers.start_processes("configs/ppo.py:tiny", one, *flags, processes=1, devices=8),
            helpers.start_processes("configs/ppo.py:tiny", two, *flags)]
    for procs in runs:
        helpers.wait_all(procs)

    samples = [[json.loads(l) for l in (root / "samples.jsonl").read_text().splitlines()] for root in (one, two)]
    assert len(samples[0]) == len(samples[1]) == 32
    assert [s["response"] for s in samples[1]] == [s["response"] for s in samples[0]]
    assert [s["edits"] for s in samples[1]] == [s["edits"] for s in samples[0]]
    assert sum(s["negative"] for s in samples[0]) > 0  # pi- was exercised
    for a, b in zip(*samples):
        for key in ("reward", "ci", "aesthetic"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
    metrics = [json.loads((root / "metrics.jsonl").read_text().splitlines()[0]) for root in (one, two)]
    for key, value in metrics[0].items():
        if not helpers.TIMING.search(key):
            np.testing.assert_allclose(metrics[1][key], value, rtol=1e-4, atol=1e-6, err_msg=key)
    a, b = (helpers.load_checkpoint(root / "checkpoints" / "1")["trainable"] for root in (one, two))
    for (path, x), y in zip(_leaves(a), [v for _, v in _leaves(b)]):
        # The key part of the QKV bias has no effect on attention (softmax is shift invariant), so its gradient is
        # rounding noise, which Adam's first step scales up to ~lr: the only params allowed more than 1e-5.
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-3 if "query_key_value']['bias" in path else 1e-5,
                                   err_msg=path)
    helpers.assert_same_outputs(one, two)  # and the PNGs of process 0's rows are those of the same rows


def _leaves(tree):
    import jax
    return [(jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_leaves_with_path(tree)]


def test_a_process_that_fails_at_start_up_stops_its_peer(tmp_path):
    """Process 1 cannot read its data: it stops with its own line, and process 0 (which could) stops within
    seconds with that line, instead of waiting in a collective for a peer that is gone."""
    start = time.time()
    procs = helpers.start_processes("configs/sft.py:tiny", tmp_path / "run", *SFT_FLAGS,
                                    per_process=lambda i: ["--config.data.train=/nope/data.jsonl"] if i else [])
    outs = [p.communicate(timeout=120)[0] for p in procs]
    elapsed = time.time() - start
    assert [p.returncode for p in procs] == [2, 2], outs
    assert "error: config.data.train file not found: /nope/data.jsonl" in outs[1].strip().splitlines()[-1], outs[1]
    assert outs[0].strip().splitlines()[-1] == (
        f"error: process 1 stopped ({outs[1].strip().splitlines()[-1]}); process 0 stops too"), outs[0]
    assert elapsed < 60, elapsed


def test_a_process_that_never_joins_stops_the_others(tmp_path):
    start = time.time()
    port = helpers.free_port()
    procs = helpers.start_processes(
        "configs/sft.py:tiny", tmp_path / "run", "--config.distributed.initialization_timeout_s=3", processes=1,
        per_process=lambda i: [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                               "--config.distributed.num_processes=2", "--config.distributed.process_id=0"])
    out = procs[0].communicate(timeout=120)[0]
    assert procs[0].returncode == 2, out
    assert out.strip().splitlines()[-1] == (
        f"error: distributed: not every process joined the coordinator at 127.0.0.1:{port} within 3 s "
        "(config.distributed.initialization_timeout_s); start all 2 processes with the same coordinator_address "
        "and num_processes, each with its own process_id"), out
    assert time.time() - start < 30
