"""The paper's ablations (section 4.3: Fig. 7, Table 2) as a sweep of configs/ppo.py, 3 seeds each.

    python -m diffchat_jax.sweep run experiments/ablations.py --root=workdirs/ablations [--only=full,no_vci]
    python -m diffchat_jax.sweep run experiments/ablations.py --root=workdirs/ablations --print-commands
    python -m diffchat_jax.sweep report experiments/ablations.py --root=workdirs/ablations

The spec's argument (after ':') is a comma-separated list of options:
    tiny        the tiny random models of configs/ppo.py:tiny (CPU, minutes a run); trainable blocks (1, all = 2)
    sft=PATH    the SFT model every run starts from (default: the config's model.name_or_path)
    tiny_models=PATH   with tiny: where `python -m diffchat_jax.tiny_models` wrote them (default workdirs/tiny-models)
    seeds=N     seeds 0 .. N-1 (default 3)
    epochs=N    ppo.epochs of every run (default: the config's)
    eval        evaluate every run's export (configs/eval.py[:tiny], its own systems as baselines)
e.g. `experiments/ablations.py:tiny,sft=workdirs/demo/sft,seeds=1,epochs=1`.

Runs, and the paper's value each grid shares with `full` (so it is not trained twice):
    full          ADM pi+ (typical sampling), ADM pi-, VCI alpha 0.05, CI threshold 0.7, last 8 blocks trainable
    no_adm_pos    pi+ off: nucleus sampling (top-p 0.9) instead (Fig. 7)
    no_adm_neg    pi- off: no hard negatives (Table 2a)
    no_vci        alpha = 0 (Table 2b; also the alpha grid's 0)
    alpha_*       VCI alpha 0.01, 0.1, 0.5 (0 = no_vci, 0.05 = full)
    ci_thr_*      CI threshold 0, 0.5, 0.9 (0.7 = full; tiny: 0.5, 0.7, 0.9, as its full trains with 0)
    blocks_*      trainable blocks 4 and all (8 = full; tiny: all = 2, its full trains 1)
"""
from diffchat_jax.errors import ConfigError
from diffchat_jax.sweep import Eval, Run, Sweep

BLOOM_1B1_BLOCKS = 24  # "all" trainable blocks of the paper's model
TINY_BLOCKS = 2  # configs/sft.py:tiny's n_layer


def parse_options(arg: str | None) -> dict:
    options = {"tiny": False, "sft": "", "tiny_models": "", "seeds": 3, "epochs": 0, "eval": False}
    for token in filter(None, (arg or "").split(",")):
        key, sep, value = token.partition("=")
        if key not in options or (sep == "") != isinstance(options[key], bool):
            raise ConfigError(f"experiments/ablations.py: option {token!r} is not one of tiny, sft=PATH, "
                              f"tiny_models=PATH, seeds=N, epochs=N, eval")
        try:
            options[key] = True if not sep else type(options[key])(value)
        except ValueError:
            raise ConfigError(f"experiments/ablations.py: option {token!r}: {value!r} is not a number") from None
    return options


def get_sweep(arg=None) -> Sweep:
    o = parse_options(arg)
    base = "configs/ppo.py:tiny" if o["tiny"] else "configs/ppo.py"
    common = {}
    if o["sft"]:
        common["model.name_or_path"] = o["sft"]
    if o["tiny_models"]:
        common["tiny_models"] = o["tiny_models"]
    if o["epochs"]:
        common["ppo.epochs"] = o["epochs"]
    evaluation = Eval("configs/eval.py:tiny" if o["tiny"] else "configs/eval.py", {
        "eval.systems": {"user": "identity", "reference": "reference"},
        **({"tiny_models": o["tiny_models"]} if o["tiny_models"] else {})}) if o["eval"] else None
    if o["tiny"]:  # the tiny config's own defaults, as configs/ppo.py:tiny sets them
        blocks = {"blocks_all": TINY_BLOCKS}
    else:
        blocks = {"blocks_4": 4, "blocks_all": BLOOM_1B1_BLOCKS}
    variants = {
        "full": {},
        "no_adm_pos": {"adm.positive": False, "sampling.top_p": 0.9},
        "no_adm_neg": {"adm.negative": False},
        "no_vci": {"vci.alpha": 0.0},
        **{f"alpha_{a:g}": {"vci.alpha": a} for a in (0.01, 0.1, 0.5)},
        **{f"ci_thr_{t:g}": {"ci.threshold": t} for t in (0.0, 0.5, 0.9)},
        **{name: {"ppo.trainable_blocks": n} for name, n in blocks.items()},
    }
    if o["tiny"]:  # configs/ppo.py:tiny trains with threshold 0; its grid is the paper's all the same
        variants["ci_thr_0.7"] = {"ci.threshold": 0.7}
        del variants["ci_thr_0"]
    seeds = tuple(range(o["seeds"]))
    runs = tuple(Run(name, base, {**common, **extra}, seeds, eval=evaluation) for name, extra in variants.items())
    thresholds = ("full", "ci_thr_0.5", "ci_thr_0.7", "ci_thr_0.9") if o["tiny"] else (
        "ci_thr_0", "ci_thr_0.5", "full", "ci_thr_0.9")  # full: 0 in the tiny config, the paper's 0.7 otherwise
    return Sweep(runs=runs, groups={
        "adm": ("full", "no_adm_pos", "no_adm_neg"),
        "vci": ("full", "no_vci"),
        "alpha": ("no_vci", "alpha_0.01", "full", "alpha_0.1", "alpha_0.5"),
        "ci_threshold": thresholds,
        "trainable_blocks": ("blocks_4", "full", "blocks_all") if not o["tiny"] else ("full", "blocks_all"),
    })
