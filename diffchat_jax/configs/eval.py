"""The evaluation (paper section 4.1, Tables 1 and 4): `python -m diffchat_jax.main --config=configs/eval.py[:tiny]`.

Every system's target prompts are rendered with every SD model (same seeds per row as the row's raw image,
rendered from x), scored by the chosen metrics and summarised in results.csv / results.json / report.md
(diffchat_jax/eval/job.py). Rerunning the same command resumes: cached prompts, images and scores are kept.

Variants: tiny (tiny random models on CPU: the demo's SFT and PPO models, the tiny InstructPix2Pix and the fixed
systems); tiny,baselines (only the systems that need no trained model).
"""
import ml_collections

from diffchat_jax.configs import base
from diffchat_jax.configs.ppo import TINY_MODELS
from diffchat_jax.data import SAMPLE_PATH
from diffchat_jax.errors import ConfigError

DEMO_WORKDIR = "workdirs/demo"  # where `make demo` trains the tiny SFT and PPO models
HPS = {  # eval.scorers.hps_version -> (weights, the transformers config of their architecture)
    "v1": ("", "openai/clip-vit-large-patch14"),  # the paper's citation (Wu et al. 2023): set hps_weights to hpc.pt
    "v2.0": ("xswu/HPSv2/HPS_v2_compressed.pt", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "v2.1": ("xswu/HPSv2/HPS_v2.1_compressed.pt", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
}


def get_config(arg=None):
    variants = set(arg.split(",")) if arg else set()
    known = {"tiny", "baselines"}
    if variants - known or "baselines" in variants and "tiny" not in variants:
        raise ConfigError(f"--config=configs/eval.py: unknown variant(s) {sorted(variants - known)} or baselines "
                          f"without tiny; known: 'tiny', 'tiny,baselines'")
    c = base.get_config()
    c.mode = "eval"
    e = c.eval = ml_collections.ConfigDict()
    # The test rows: an InstructPE test file or InstructPix2Pix triples (any format the data loader takes).
    e.data = ""
    e.holdout_fraction = 0.0  # > 0: only the rows SFT held out of e.data (its split, with config.seed)
    e.limit = 0  # the first N rows (0 = all)
    e.on_bad_row = "skip"  # "skip" (count and report) or "error"
    e.max_chars = 2000
    # name -> identity | append | reference | file:PATH | model:PATH | openai:MODEL | ip2p:PATH (eval/systems.py).
    # The report lists them in name order (ml_collections sorts the keys).
    e.systems = ml_collections.ConfigDict({"user": "identity", "append": "append", "reference": "reference"})
    # model: systems decode with (sampling/rewriter.py): greedy, or typical sampling keyed by seed (each row's draws
    # depend on the seed and its row number only).
    e.decoding = ml_collections.ConfigDict(dict(greedy=True, typical_mass=0.97, temperature=1.0, seed=0,
                                                max_new_tokens=128, max_prompt_tokens=384, batch_size=16,
                                                dtype="float32"))
    # openai: systems: any OpenAI-compatible chat endpoint (diffchat_jax/llm); the key is read from the environment
    # variable named here, never logged or stored; every reply is cached in <workdir>/llm_cache.sqlite.
    e.llm = ml_collections.ConfigDict(dict(base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY",
                                           temperature=0.0, max_tokens=256, timeout_s=60.0, max_retries=6,
                                           backoff_s=1.0, max_backoff_s=60.0, concurrency=8, max_requests=0))
    # ip2p: systems (InstructPix2Pix, diffusion/ip2p.py) edit each SD model's raw image with the instruction: its
    # own scheduler (Euler ancestral), as many steps as config.render, and diffusers' guidance scales.
    e.ip2p = ml_collections.ConfigDict(dict(solver="euler_ancestral", num_steps=c.render.get_ref("num_steps"),
                                            guidance_scale=7.5, image_guidance_scale=1.5))
    # name -> SD 1.x checkpoint (hub id, diffusers folder or single file) rendered with the config.render settings.
    e.models = ml_collections.ConfigDict({"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"})
    e.metrics = ("pickscore", "aesthetic", "hps", "clip_score", "directional_clip", "ci")
    # The text PickScore, HPS and CLIP score compare each target image with: "target" (the system's own prompt,
    # the paper's reading) or "reference" (the row's y, so no system wins by describing its own image).
    e.score_text = "target"
    e.rank_ties = "min"  # tied systems share the best rank ("min": 1, 1, 3) or their mean ("average": 1.5, 1.5, 3)
    e.grid_rows = 4  # grids/<row>.png (raw | each system, a line per model) for the first rows
    e.scorers = ml_collections.ConfigDict(dict(
        clip_model="openai/clip-vit-large-patch14",  # aesthetic, CLIP score, directional CLIP
        mlp_weights="trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth",
        pickscore_model="yuvalkirstain/PickScore_v1",
        pickscore_processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        hps_version="v2.1",  # "v1" (needs hps_weights), "v2.0", "v2.1"
        hps_weights="",  # "" = the version's hub file
        hps_config="",  # "" = the version's architecture
        batch_size=16))  # images per jitted scoring call
    c.render.images_per_prompt = 1
    c.render.batch_size = 8

    if "tiny" in variants:
        e.data = SAMPLE_PATH
        e.holdout_fraction = 0.1  # configs/sft.py:tiny's eval split: rows the tiny models never trained on
        e.limit = 6
        c.tiny_models = TINY_MODELS
        models = c.get_ref("tiny_models")
        e.models = ml_collections.ConfigDict({"tiny": models + "/sd"})
        # The tiny demo's SFT and PPO models (make demo writes them under demo_workdir) and the tiny random
        # InstructPix2Pix of `python -m diffchat_jax.tiny_models`.
        c.demo_workdir = DEMO_WORKDIR
        demo = c.get_ref("demo_workdir")
        e.systems = ml_collections.ConfigDict({
            "user": "identity", "append": "append", "reference": "reference", "sft": "model:" + demo + "/sft",
            "ppo": "model:" + demo + "/ppo", "ip2p": "ip2p:" + models + "/ip2p"})
        if "baselines" in variants:  # only the systems that need no training (no make demo first)
            del e.systems["sft"], e.systems["ppo"]
        e.decoding.max_new_tokens = 48  # as configs/ppo.py:tiny samples
        e.scorers.clip_model = models + "/scorers/clip"
        e.scorers.mlp_weights = models + "/scorers/aesthetic_mlp.pth"
        e.scorers.pickscore_model = e.scorers.hps_config = models + "/scorers/pickscore"
        e.scorers.pickscore_processor = ""
        e.scorers.hps_weights = models + "/scorers/hps.pt"
        e.grid_rows = 2
        c.render.num_steps = 4
        c.render.height = c.render.width = 16
        c.render.images_per_prompt = 2
    return c
