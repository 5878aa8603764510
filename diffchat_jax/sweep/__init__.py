"""Ablation sweeps (python -m diffchat_jax.sweep; see __main__.py): specs, the runner and the report."""
from diffchat_jax.sweep.spec import Eval, Job, Run, Sweep, jobs, load_spec  # noqa: F401
