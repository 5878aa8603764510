"""Ablation sweeps: named runs of the main job, run one after another here or one command each on a cluster, and
a report over their seeds (paper section 4.3: Fig. 7, Table 2).

    python -m diffchat_jax.sweep run SPEC[:ARG] --root=DIR [--only=NAME,...] [--dry-run | --print-commands]
    python -m diffchat_jax.sweep report SPEC[:ARG] --root=DIR

A spec is a Python file whose `get_sweep(arg=None)` returns a `Sweep` (experiments/ablations.py). Run NAME with
seed S trains in DIR/NAME/seedS (its workdir: checkpoints, metrics.jsonl, export/) and, when the run has an `Eval`,
evaluates its export in DIR/NAME/seedS/eval. DIR/NAME/seedS/sweep.json records how far it got, so:
- `run` skips finished runs; an interrupted or killed run resumes from its newest checkpoint (the main job's
  resume), a failed one is tried again. Several runs: each in its own process, the command that `--print-commands`
  prints; the sweep goes on after a failed run and exits 1 at the end, naming it. One run: in this process.
- `--print-commands` prints one independent, idempotent shell command per run (for a SLURM array, a TPU queue) in
  dependency order; a run whose `needs` have not finished refuses to start, naming them.
- `report` writes DIR/report.md and DIR/results.csv (final metrics as mean ± std over the finished seeds) and
  DIR/curves/<group>-<metric>.png (Fig. 7 style); failed and unfinished runs are listed, never averaged in.
"""
import argparse
import os
import sys

from diffchat_jax import errors
from diffchat_jax.sweep import report as report_lib
from diffchat_jax.sweep.runner import run_sweep
from diffchat_jax.sweep.spec import load_spec
# ---------------------------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffchat_jax.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the spec's runs (finished ones are skipped, interrupted ones resumed)")
    report = sub.add_parser("report", help="report.md, results.csv and curves/ of the finished runs")
    for s in (run, report):
        s.add_argument("spec", help="the spec file, optionally with an argument: experiments/ablations.py[:ARG]")
        s.add_argument("--root", required=True, help="the sweep's folder: one workdir per run and seed")
    run.add_argument("--only", default="", help="comma-separated run names (every seed) or NAME/seedS ids")
    run.add_argument("--dry-run", action="store_true", help="print each run's resolved config and what would run")
    run.add_argument("--parallel", type=int, default=1,
                     help="jobs at once (each in its own process, output in <workdir>/sweep.log); every job sees "
                          "every device, so this is for CPU studies or devices you assign yourself")
    run.add_argument("--print-commands", action="store_true",
                     help="print one independent, idempotent shell command per run, in dependency order")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.command == "run":
        only = [o for o in args.only.split(",") if o]
        return run_sweep(args.spec, args.root, only, args.dry_run, args.print_commands, args.parallel)
    report_lib.write_report(load_spec(args.spec), os.path.abspath(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_command(main))
