"""The configs of the public checkpoints our configs name, for shapes without a download.

The memory report (diffchat_jax.memory) and the loaders' `abstract=True` mode (shapes only, no weights) read a
model's config.json from its local folder when there is one; for a hub id they fall back to this table, which
holds the fields that set the shapes (everything else takes the library defaults, as transformers does).
"""
import json
import os

from diffchat_jax.models import ldm


def _bloom(n_layer: int, hidden_size: int, n_head: int) -> dict:
    return {"model_type": "bloom", "architectures": ["BloomForCausalLM"], "vocab_size": 250880,
            "hidden_size": hidden_size, "n_layer": n_layer, "n_head": n_head, "layer_norm_epsilon": 1e-5}


BLOOM = {
    "bigscience/bloom-560m": _bloom(24, 1024, 16),
    "bigscience/bloom-1b1": _bloom(24, 1536, 16),
    "bigscience/bloom-1b7": _bloom(24, 2048, 16),
    "bigscience/bloom-3b": _bloom(30, 2560, 32),
    "bigscience/bloom-7b1": _bloom(30, 4096, 32),
}


def _clip(text: tuple[int, int, int, int], vision: tuple[int, int, int, int], projection: int, act: str) -> dict:
    """(layers, width, heads, mlp width) of each tower; ViT patch 14 at 224 pixels."""
    tower = lambda t: {"num_hidden_layers": t[0], "hidden_size": t[1], "num_attention_heads": t[2],
                       "intermediate_size": t[3], "hidden_act": act}
    return {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": projection,
            "text_config": {**tower(text), "vocab_size": 49408, "max_position_embeddings": 77,
                            "eos_token_id": 49407},
            "vision_config": {**tower(vision), "image_size": 224, "patch_size": 14}}


CLIP_L14 = _clip((12, 768, 12, 3072), (24, 1024, 16, 4096), 768, "quick_gelu")  # OpenAI ViT-L/14
CLIP_H14 = _clip((24, 1024, 16, 4096), (32, 1280, 16, 5120), 1024, "gelu")  # LAION ViT-H/14 (open_clip)
CLIP = {
    "openai/clip-vit-large-patch14": CLIP_L14,
    "yuvalkirstain/PickScore_v1": CLIP_H14,
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": CLIP_H14,
}

# SD 1.x pipelines: every SD 1.x checkpoint of the paper's evaluation has SD 1.5's shapes.
SD15 = {"unet": ldm.SD15_UNET_CONFIG, "vae": ldm.SD15_VAE_CONFIG, "text_encoder": ldm.SD15_TEXT_CONFIG,
        "scheduler": ldm.SD15_SCHEDULER}
SD = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": SD15,
    "runwayml/stable-diffusion-v1-5": SD15,
    "CompVis/stable-diffusion-v1-4": SD15,
}


def config_json(path_or_id: str, table: dict, filename: str = "config.json") -> dict:
    """`path_or_id/filename` when it is a local file, else the table's entry for the hub id.

    Raises FileNotFoundError naming both places when neither has it.
    """
    path = os.path.join(os.fspath(path_or_id), filename)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    if path_or_id in table:
        return table[path_or_id]
    raise FileNotFoundError(f"no {path} and {path_or_id!r} is not a known checkpoint (known: {sorted(table)}); "
                            f"pass a local folder with its {filename}")
