"""A sweep spec: named runs of the main job (config, overrides, seeds, needs, optional eval), loaded from a Python
file's `get_sweep(arg)`, and the configs each resolves to."""
import dataclasses
import importlib.util
import os
import re
from typing import Callable, Mapping, Sequence

from diffchat_jax.errors import ConfigError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # a run's name is a folder name and an eval system name


# ---------------------------------------------------------------------------------------------------------------
# The spec.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Eval:
    """An evaluation of a run's export: `config` (file[:variant]) with `overrides`; the run joins eval.systems as
    system NAME = model:<its workdir>, beside the config's own systems (baselines such as identity, reference)."""
    config: str = "configs/eval.py"
    overrides: Mapping[str, object] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Run:
    """A named run of the main job: `config` (file[:variant]) with `overrides` ({"a.b": value}), once per seed
    (config.seed). In string values "{root}" becomes the sweep's root and "{seed}" the seed, so a run can start
    from another's result ("{root}/sft/seed0"); `needs` names the runs (all their seeds) that must finish first."""
    name: str
    config: str
    overrides: Mapping[str, object] = dataclasses.field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    needs: tuple[str, ...] = ()
    eval: Eval | None = None


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Runs in dependency order. `groups` (name -> run names) are the report's ablation groups: a table and curves
    each. `prepare(root)`, when given, runs before any run (idempotent: e.g. writes data splits into the root).
    The report's final value of a metric is the mean of the last `final_window` rows of a run's metrics.jsonl;
    its `columns` (glob patterns over the metric names; eval metrics are `eval_<metric>`) and `curves` say what
    it shows."""
    runs: tuple[Run, ...]
    groups: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    prepare: Callable[[str], None] | None = None
    final_window: int = 5
    columns: tuple[str, ...] = ("reward", "reward_*", "kl", "response_length", "eval_*")
    curves: tuple[str, ...] = ("reward", "reward_ci", "kl", "response_length")
    smoothing: float = 0.6  # exponential moving average of the curves (TensorBoard's slider); 0 = none

    def run(self, name: str) -> Run:
        return {r.name: r for r in self.runs}[name]


@dataclasses.dataclass(frozen=True)
class Job:
    """One run at one seed: the unit that is run, skipped, resumed and reported."""
    run: Run
    seed: int

    @property
    def id(self) -> str:
        return f"{self.run.name}/seed{self.seed}"

    def workdir(self, root: str) -> str:
        return os.path.join(root, self.run.name, f"seed{self.seed}")


def check_sweep(sweep, where: str) -> Sweep:
    """Raises ConfigError naming the spec and the run when the spec is malformed."""
    if not isinstance(sweep, Sweep):
        raise ConfigError(f"{where}: get_sweep() returned {type(sweep).__name__}, not a diffchat_jax.sweep.Sweep")
    seen = set()
    for run in sweep.runs:
        if not NAME.match(run.name):
            raise ConfigError(f"{where}: run name {run.name!r} must be letters, digits and _ . + - (a folder name)")
        if run.name in seen:
            raise ConfigError(f"{where}: two runs are named {run.name!r}")
        if not run.seeds or len(set(run.seeds)) != len(run.seeds):
            raise ConfigError(f"{where}: run {run.name!r} needs one or more distinct seeds, got {run.seeds}")
        for need in run.needs:
            if need not in seen:
                raise ConfigError(f"{where}: run {run.name!r} needs {need!r}, which is not a run listed before it")
        seen.add(run.name)
    for group, names in sweep.groups.items():
        unknown = [n for n in names if n not in seen]
        if unknown:
            raise ConfigError(f"{where}: group {group!r} names unknown runs {unknown}")
    if sweep.final_window < 1:
        raise ConfigError(f"{where}: final_window must be 1 or more, got {sweep.final_window}")
    return sweep


def load_spec(value: str) -> Sweep:
    """The Sweep of `PATH[:ARG]` (get_sweep(ARG), or get_sweep() without one)."""
    path, _, arg = value.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"sweep spec {path} is not a file (pass experiments/<name>.py[:arg])")
    module_spec = importlib.util.spec_from_file_location("_diffchat_sweep_spec", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"sweep spec {path} has no get_sweep() function")
    return check_sweep(module.get_sweep(arg) if arg else module.get_sweep(), path)


def jobs(sweep: Sweep, only: Sequence[str] = ()) -> list[Job]:
    """The jobs in spec order; `only` keeps runs by name (every seed) or by id (NAME/seedS)."""
    every = [Job(run, seed) for run in sweep.runs for seed in run.seeds]
    if not only:
        return every
    known = {j.id for j in every} | {j.run.name for j in every}
    unknown = [o for o in only if o not in known]
    if unknown:
        raise ConfigError(f"--only: {unknown} name no run of the spec; its runs: "
                          f"{sorted({j.run.name for j in every})} (or NAME/seedS)")
    return [j for j in every if j.id in only or j.run.name in only]


# ---------------------------------------------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------------------------------------------
def substitute(value, root: str, seed: int):
    if isinstance(value, str):
        return value.replace("{root}", root).replace("{seed}", str(seed))
    if isinstance(value, dict):
        return {k: substitute(v, root, seed) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(substitute(v, root, seed) for v in value)
    return value


def apply_overrides(config, overrides: Mapping[str, object], where: str):
    """Sets each "a.b" field of `config`; a field the config lacks, or a value of another type, is a ConfigError
    naming the field (a dict value replaces a whole sub-config such as eval.systems)."""
    import ml_collections
    for field, value in overrides.items():
        *parents, leaf = field.split(".")
        node = config
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ConfigError(f"{where}: override {field!r}: the config has no group {part!r}")
            node = node[part]
        if isinstance(value, dict):
            node[leaf] = ml_collections.ConfigDict(value)
            continue
        if leaf not in node:
            raise ConfigError(f"{where}: override {field!r}: the config has no such field")
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: override {field!r} = {value!r}: {e}") from None
    return config


def load_config(config_arg: str, overrides: Mapping[str, object], where: str):
    from diffchat_jax import cli
    config = cli.load_config(cli.resolve_config_arg(config_arg))
    return apply_overrides(config, overrides, where)


def train_config(job: Job, root: str):
    config = load_config(job.run.config, substitute(dict(job.run.overrides), root, job.seed), f"run {job.id}")
    config.seed = job.seed
    return config


def eval_config(job: Job, root: str):
    overrides = substitute(dict(job.run.eval.overrides), root, job.seed)
    config = load_config(job.run.eval.config, overrides, f"run {job.id} (eval)")
    config.eval.systems[job.run.name] = "model:" + job.workdir(root)
    return config


