"""Image reward components `aesthetic` and `pickscore` (paper section 3.3), and tiny random scorer checkpoints.

Each component scores the rendered images of a RewardBatch (`batch.images` [B, N, H, W, 3]): every image is
scored on its own (PickScore against the response that produced it) and a response gets the mean over its N
images. Images travel as uint8 and are preprocessed on device; the jitted scorers run on fixed-size chunks of
`batch_size` images split over this host's devices (a `data` mesh; each host scores its own part of a batch).

Their settings come from `config.reward.aesthetic` and `config.reward.pickscore`:
    aesthetic.clip_model    transformers CLIP (folder or hub id) whose image embeddings feed the MLP
    aesthetic.mlp_weights   the LAION MLP state dict: a local .pth/.safetensors or `owner/name/file` on the hub
    pickscore.model         a transformers CLIPModel (folder or hub id)
    pickscore.processor     where its tokenizer lives ("" = the model's folder)
    *.dtype                 "float32" or "bfloat16" (params and compute; features and scores stay float32)
    *.batch_size            images per jitted call, rounded up to a multiple of the local device count
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from diffchat_jax.models import clip
from diffchat_jax.rewards import scorers
from diffchat_jax.rewards.base import Component, RewardBatch, register
from diffchat_jax.utils import aot, torch_dep
from diffchat_jax.utils.mesh import chunk_size, make_mesh, map_in_chunks, replicate, shard_batch


def _images(batch: RewardBatch, name: str) -> np.ndarray:
    """batch.images, checked to be [B, N, H, W, 3]."""
    if batch.images is None:
        raise ValueError(f"{name} scores images but batch.images is None: render the responses first")
    images = np.asarray(batch.images)
    if images.ndim != 5 or images.shape[0] != len(batch) or images.shape[-1] != 3:
        raise ValueError(f"{name}: batch.images must be [B={len(batch)}, N, H, W, 3], got {images.shape}")
    return images


def _score_renders(fn, images: np.ndarray, per_response: tuple[np.ndarray, ...], batch_size: int, mesh) -> np.ndarray:
    """fn(images [C, H, W, 3], *rows [C, ...]) -> [C] over images [B, N, H, W, 3], each response's rows
    (per_response [B, ...]) repeated for its N images; returns the mean over the N images [B]."""
    n_images = images.shape[1]
    arrays = [images.reshape(-1, *images.shape[2:])] + [np.repeat(a, n_images, axis=0) for a in per_response]
    scores = map_in_chunks(fn, arrays, batch_size, mesh).astype(np.float32)
    return scores.reshape(images.shape[:2]).mean(axis=1)


def _abstract_images(size: tuple[int, int], batch_size: int, mesh) -> jax.ShapeDtypeStruct:
    """The images of one scoring call: [chunk, H, W, 3] uint8 split over the mesh."""
    chunk = chunk_size(batch_size, mesh)
    return shard_batch(jax.ShapeDtypeStruct((chunk, *size, 3), jnp.uint8), mesh)


@register("aesthetic", needs_images=True)
def make_aesthetic(config, mesh=None, abstract: bool = False) -> Component:
    c = config.reward.aesthetic
    mesh = mesh or make_mesh(jax.local_devices())
    module, params = clip.load_pretrained(c.clip_model, jnp.dtype(c.dtype), abstract=abstract)
    mlp = (scorers.abstract_aesthetic_mlp(module.config.projection_dim) if abstract
           else scorers.load_aesthetic_mlp(c.mlp_weights, in_features=module.config.projection_dim))
    params, mlp = replicate((params, mlp), mesh)

    def score(batch: RewardBatch) -> np.ndarray:
        fn = lambda images: scorers.aesthetic_score(module, params, mlp, images)
        return _score_renders(fn, _images(batch, "aesthetic"), (), c.batch_size, mesh)

    def device_steps(n_images: int, size: tuple[int, int]) -> list[aot.Step]:
        images = _abstract_images(size, c.batch_size, mesh)
        return [aot.Step("aesthetic", scorers.aesthetic_score, (module, aot.abstract(params), aot.abstract(mlp),
                                                                images), resident=(1, 2))]

    return Component("aesthetic", score, needs_images=True, params=(params, mlp), device_steps=device_steps)


@register("pickscore", needs_images=True)
def make_pickscore(config, mesh=None, abstract: bool = False) -> Component:
    c = config.reward.pickscore
    mesh = mesh or make_mesh(jax.local_devices())
    module, params = clip.load_pretrained(c.model, jnp.dtype(c.dtype), abstract=abstract)
    params = replicate(params, mesh)
    tokenizer = None if abstract else transformers.AutoTokenizer.from_pretrained(c.processor or c.model)
    text_length = module.config.text.max_position_embeddings

    def score(batch: RewardBatch) -> np.ndarray:
        images = _images(batch, "pickscore")
        ids, mask = clip.tokenize(tokenizer, batch.responses, text_length)
        fn = lambda images, ids, mask: scorers.pick_score(module, params, images, ids, mask)
        return _score_renders(fn, images, (ids, mask), c.batch_size, mesh)

    def device_steps(n_images: int, size: tuple[int, int]) -> list[aot.Step]:
        images = _abstract_images(size, c.batch_size, mesh)
        ids = shard_batch(jax.ShapeDtypeStruct((images.shape[0], text_length), jnp.int32), mesh)
        return [aot.Step("pickscore", scorers.pick_score, (module, aot.abstract(params), images, ids, ids),
                         resident=(1,))]

    return Component("pickscore", score, needs_images=True, params=params, device_steps=device_steps)


# ----------------------------------------------------------------------------------------------------------
# Tiny random checkpoints in the real formats (tests, tiny configs; needs torch).
# ----------------------------------------------------------------------------------------------------------
def tiny_clip_tokenizer() -> transformers.CLIPTokenizer:
    """A CLIP tokenizer without merges: the 256 byte symbols, their end-of-word forms, BOS 512, EOS (= pad) 513."""
    from tokenizers import pre_tokenizers
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)} | {s + "</w>": i + 256 for i, s in enumerate(symbols)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    return transformers.CLIPTokenizer(vocab=vocab, merges=[])


def _tiny_clip(hidden_act: str, patch_size: int, logit_scale: float, seed: int):
    """A random transformers CLIPModel: text 2x32, vision 2x32 on 32x32 images, projection 16."""
    torch = torch_dep.require_torch("building random CLIP models")
    text = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                hidden_act=hidden_act, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=patch_size, hidden_act=hidden_act)
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16,
                                     logit_scale_init_value=logit_scale)
    return transformers.CLIPModel(config).eval()


def _save_with_processor(model, out_dir: str) -> str:
    """model, its tokenizer and image processor -> out_dir (what a hub CLIP folder holds)."""
    model.save_pretrained(out_dir)
    tiny_clip_tokenizer().save_pretrained(out_dir)
    size = model.config.vision_config.image_size
    transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                       crop_size={"height": size, "width": size}).save_pretrained(out_dir)
    return out_dir


def save_random_clip(out_dir: str, hf_config: dict, seed: int = 0) -> str:
    """A transformers CLIPModel of `hf_config` (a config.json dict, e.g. models/known.CLIP_H14) with random weights,
    with the tiny byte-level tokenizer (ids < 514) and an image processor: benchmarks at the real shapes."""
    torch = torch_dep.require_torch("building random CLIP models")
    torch.manual_seed(seed)
    return _save_with_processor(transformers.CLIPModel(transformers.CLIPConfig.from_dict(hf_config)).eval(), out_dir)


def save_random_aesthetic_mlp(path: str, in_features: int, seed: int = 2) -> str:
    """A torch state dict of the LAION MLP layout (layers.{0,2,4,6,7}) on `in_features`-wide embeddings."""
    torch = torch_dep.require_torch("writing a random aesthetic MLP")
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(in_features, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                              torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                              torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, path)
    return path


def build_tiny_models(out_dir: str) -> dict[str, str]:
    """Writes tiny random stand-ins for the real scorer checkpoints, in their formats, and returns their paths:

        clip         like openai/clip-vit-large-patch14 (quick_gelu; patch 8), for aesthetic and CLIP score
        mlp_weights  aesthetic_mlp.pth: torch state dict of the LAION MLP layout, on clip's 16-wide embeddings
        pickscore    like yuvalkirstain/PickScore_v1 (gelu; patch 16; logit_scale log 100), tokenizer inside
        hps          hps.pt: an open_clip-layout {"state_dict": ...}; its architecture config is `pickscore`
    """
    torch = torch_dep.require_torch("building the tiny scorer models")
    paths = {
        "clip": _save_with_processor(_tiny_clip("quick_gelu", 8, 2.6592, seed=0), os.path.join(out_dir, "clip")),
        "pickscore": _save_with_processor(_tiny_clip("gelu", 16, float(np.log(100.0)), seed=1),
                                          os.path.join(out_dir, "pickscore")),
        "mlp_weights": os.path.join(out_dir, "aesthetic_mlp.pth"),
        "hps": os.path.join(out_dir, "hps.pt"),
    }
    save_random_aesthetic_mlp(paths["mlp_weights"], 16)

    hps = _tiny_clip("gelu", 16, float(np.log(100.0)), seed=3)  # the pickscore architecture, other weights
    state = {k: v.numpy() for k, v in hps.state_dict().items()}
    state = clip.hf_to_openclip(state, clip.CLIPConfig.from_hf(hps.config.to_dict()))
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}}, paths["hps"])
    return paths
