"""A CPU-scale replication on real text: does PPO with ADM and VCI raise held-out content integrity (CI)?

    python -m diffchat_jax.sweep run experiments/cpu_study.py[:DATA_DIR] --root=workdirs/cpu_study
    python -m diffchat_jax.sweep report experiments/cpu_study.py[:DATA_DIR] --root=workdirs/cpu_study

DATA_DIR (default ../shared/data) holds the real InstructPix2Pix human-written triples (ip2p-human-written.jsonl)
and DiffusionDB prompts (diffusiondb-prompts.jsonl); they are read from there, never copied into the repository.
`prepare` writes into ROOT/data: a fixed split of the triples (TEST_ROWS held out for every eval, the rest for SFT
and PPO) and synthetic edit triples made from the DiffusionDB prompts (see `synthetic_edits`).

The recipe (a small BLOOM from scratch; no image rewards, since the one real reward on CPU is CI):
1. pretrain: SFT on synthetic edits of the DiffusionDB prompts and of the training triples' captions (never the
   test rows'): the model learns prompt language, copying x and applying an instruction that names the words to
   add or the word to swap (a byte-level BPE is trained on that data first).
2. sft: SFT on the real training triples mixed with synthetic edits of their captions, from the pretrained model;
   evaluated on the test split with the identity and reference baselines.
3. PPO from the SFT model with reward = CI (threshold CI_THRESHOLD) and the paper's ablations, 3 seeds each,
   each evaluated on the test split (CI before thresholding; greedy decoding).
The committed results are in experiments/results/cpu_study/ (README "A CPU-scale study").
"""
import json
import os

import numpy as np

from diffchat_jax.sweep import Eval, Run, Sweep

TEST_ROWS = 100
SEEDS = (0, 1, 2)
CI_THRESHOLD = 0.0  # a dense reward for a model this small (most of its CI values are below the paper's 0.7)
MODEL = {"n_layer": 4, "hidden_size": 128, "n_head": 4}
MAX_LENGTH = 128  # tokens of template T + x + i + y (the real triples)
PRETRAIN_MAX_LENGTH = 96
MAX_PROMPT_WORDS = 16  # DiffusionDB prompts longer than this are not used (they would not fit PRETRAIN_MAX_LENGTH)
MAX_CAPTION_WORDS = 24  # nor training captions longer than this
EDITS_PER_PROMPT = 2  # synthetic edits per DiffusionDB prompt
EDITS_PER_CAPTION = 4  # per caption (x_o or y_o) of the training triples: their style (case, titles) is the test's
SFT_SYNTHETIC = 1200  # synthetic caption edits mixed into the SFT data


def split_triples(rows: list[dict], test_rows: int) -> tuple[list[dict], list[dict]]:
    """(train, test) of the triples, a fixed permutation (seed 0) of the file's rows."""
    order = np.random.default_rng(0).permutation(len(rows))
    return [rows[k] for k in order[test_rows:]], [rows[k] for k in order[:test_rows]]


def synthetic_edits(prompts: list[str], copies: int = 1, seed: int = 0) -> list[dict]:
    """InstructPix2Pix-format triples {input, edit, output} made from real prompts, `copies` per prompt, of three kinds
    that mirror the real instructions ("add ...", "turn the X into Y", "make it ..."):
    - add: x = the prompt without one of its comma-separated phrases, i = "add <phrase>", y = the prompt;
    - swap: a word of the prompt becomes a word of another prompt: i = "turn the <old> into <new>";
    - style: y = "<phrase of another prompt>, <prompt>" with i = "make it <that phrase>".
    The words an instruction names are the words y gains: what CI rewards."""
    rng = np.random.default_rng(seed)
    words = [w for p in prompts for w in p.replace(",", " ").split() if w.isalpha() and len(w) > 3]
    phrases = [s.strip() for p in prompts for s in p.split(",") if 1 <= len(s.split()) <= 4 and s.strip()]
    rows = []
    for prompt in [p for p in prompts for _ in range(copies)]:
        parts = [s.strip() for s in prompt.split(",") if s.strip()]
        kind = rng.integers(3)
        if kind == 0 and len(parts) >= 2:
            k = int(rng.integers(1, len(parts)))
            rows.append({"input": ", ".join(parts[:k] + parts[k + 1:]), "edit": f"add {parts[k]}",
                         "output": prompt})
            continue
        tokens = prompt.split()
        candidates = [k for k, w in enumerate(tokens) if w.isalpha() and len(w) > 3]
        if kind == 1 and candidates:
            k = candidates[int(rng.integers(len(candidates)))]
            new = words[int(rng.integers(len(words)))]
            rows.append({"input": prompt, "edit": f"turn the {tokens[k]} into {new}",
                         "output": " ".join(tokens[:k] + [new] + tokens[k + 1:])})
            continue
        style = phrases[int(rng.integers(len(phrases)))]
        rows.append({"input": prompt, "edit": f"make it {style}", "output": f"{style}, {prompt}"})
    return rows


def write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def make_prepare(data_dir: str):
    def prepare(root: str) -> None:
        from diffchat_jax.errors import DataError
        triples_path = os.path.join(data_dir, "ip2p-human-written.jsonl")
        prompts_path = os.path.join(data_dir, "diffusiondb-prompts.jsonl")
        for path in (triples_path, prompts_path):
            if not os.path.isfile(path):
                raise DataError(f"{path}: not found; pass the folder with the InstructPix2Pix triples and the "
                                f"DiffusionDB prompts as the spec's argument: experiments/cpu_study.py:DATA_DIR")
        out = os.path.join(root, "data")
        if os.path.exists(os.path.join(out, "sft.jsonl")):
            return
        os.makedirs(out, exist_ok=True)
        train, test = split_triples(read_jsonl(triples_path), TEST_ROWS)
        prompts = [r["prompt"].strip() for r in read_jsonl(prompts_path)]
        prompts = [p for p in prompts if 3 <= len(p.split()) <= MAX_PROMPT_WORDS]
        captions = [r[k].strip() for r in train for k in ("input", "output")]  # the test rows' are never used
        captions = [c for c in captions if 3 <= len(c.split()) <= MAX_CAPTION_WORDS]
        edits = (synthetic_edits(prompts, EDITS_PER_PROMPT, seed=0)
                 + synthetic_edits(captions, EDITS_PER_CAPTION, seed=1))
        write_jsonl(os.path.join(out, "train.jsonl"), train)
        write_jsonl(os.path.join(out, "test.jsonl"), test)
        write_jsonl(os.path.join(out, "pretrain.jsonl"), edits)
        # SFT: the real triples and as many synthetic edits of their captions again (without them, SFT on 400 rows
        # unlearns much of the copying: held-out CI fell from 57 to 43-46 in our runs).
        mix = train + synthetic_edits(captions, SFT_SYNTHETIC // max(1, len(captions)) + 1, seed=2)[:SFT_SYNTHETIC]
        order = np.random.default_rng(3).permutation(len(mix))
        write_jsonl(os.path.join(out, "sft.jsonl"), [mix[k] for k in order])  # last: marks prepare done
    return prepare


def get_sweep(arg=None) -> Sweep:
    data_dir = os.path.abspath(arg or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                                                   "data"))
    evaluation = Eval("configs/eval.py", {
        "eval.data": "{root}/data/test.jsonl", "eval.metrics": ("ci",), "eval.models": {},
        "eval.systems": {"identity": "identity", "reference": "reference"},
        "eval.decoding.max_new_tokens": 64, "eval.decoding.batch_size": 50, "eval.decoding.max_prompt_tokens": 112})
    common = {"model.compute_dtype": "float32", "data.max_length": MAX_LENGTH, "log_every": 10}
    pretrain = Run("pretrain", "configs/sft.py", {
        **common, "model.name_or_path": "", "model.random": MODEL, "tokenizer.train_vocab_size": 2048,
        "data.train": "{root}/data/pretrain.jsonl", "data.eval_fraction": 0.01, "data.max_length": PRETRAIN_MAX_LENGTH,
        "train.epochs": 4, "train.batch_size": 32, "train.lr": 3e-3, "train.warmup_steps": 100,
        "eval_every": 250, "checkpoint_every": 250})
    sft = Run("sft", "configs/sft.py", {
        **common, "model.name_or_path": "{root}/pretrain/seed0", "data.train": "{root}/data/sft.jsonl",
        "data.eval_fraction": 0.02, "train.epochs": 2, "train.batch_size": 16, "train.lr": 3e-4,
        "train.warmup_steps": 20, "eval_every": 50, "checkpoint_every": 50}, needs=("pretrain",), eval=evaluation)
    ppo = {**common, "model.name_or_path": "{root}/sft/seed0", "data.train": "{root}/data/train.jsonl",
           "data.max_length": 2 * MAX_LENGTH,  # the longest prompt (161 tokens) + 64 sampled
           "reward.components": {"ci": 1.0}, "ci.threshold": CI_THRESHOLD,
           "ppo.epochs": 4, "ppo.batch_size": 32, "ppo.minibatch_size": 16, "ppo.experience_batch_size": 32,
           "ppo.ppo_epochs": 2, "ppo.trainable_blocks": 2, "ppo.lr": 3e-4, "ppo.min_lr_ratio": 0.5, "kl.horizon": 200,
           "sampling.max_new_tokens": 64, "adm.negative_fraction": 0.04, "model.remat": False,
           "sample_log_every": 10, "checkpoint_every": 10}
    variants = {"full": {}, "no_adm_pos": {"adm.positive": False, "sampling.top_p": 0.9},
                "no_adm_neg": {"adm.negative": False}, "no_vci": {"vci.alpha": 0.0}}
    runs = [pretrain, sft] + [Run(name, "configs/ppo.py", {**ppo, **extra}, SEEDS, needs=("sft",), eval=evaluation)
                              for name, extra in variants.items()]
    return Sweep(runs=tuple(runs), prepare=make_prepare(data_dir),
                 groups={"adm": ("full", "no_adm_pos", "no_adm_neg"), "vci": ("full", "no_vci")},
                 columns=("reward", "reward_ci", "kl", "response_length", "eval_ci"),
                 curves=("reward_ci", "kl", "response_length"))
