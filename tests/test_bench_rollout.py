"""bench.rollout: its FLOP count against a hand count, and one end-to-end run on a tiny shape (its numbers are not
asserted: timings are not tests)."""
import argparse
import sys

from bench import rollout as bench_rollout
from bench import shapes


def test_rollout_flops_hand_count():
    config = shapes.random_torch_bloom("1x4x1", vocab=10).config
    args = argparse.Namespace(batch=3, prompt=2, new=3, vocab=10)
    # Block weights 12 * 4 * 4 = 192, head 4 * 10 = 40.
    # Prefill: 2 tokens * 2 * 192 + the head once (2 * 40) + causal attention 2 * width * P^2 = 2 * 4 * 4.
    # Decode: 2 fed tokens * 2 * (192 + 40) + attention 4 * width * (3 + 4 attended positions).
    assert bench_rollout.rollout_flops(config, args) == (3 * (768 + 80 + 32), 3 * (928 + 112))


def test_rollout_bench_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rollout", "--shapes=1x64", "--batch=2", "--prompt=8", "--new=4",
                                      "--vocab=256", "--repeats=1"])
    bench_rollout.main()
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["1x64"])
    ours, torch_rate, ratio, compile_s, ceiling, ceiling_ratio = map(float, row[1:])
    assert min(ours, torch_rate, ceiling) > 0 and compile_s >= 0
    assert abs(ratio - ours / torch_rate) < 0.01 * ratio + 0.01
    assert "roofline at 1x64" in out
