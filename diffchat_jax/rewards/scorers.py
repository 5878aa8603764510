"""Image scorers: pure functions of (params, images, token ids), jitted with the CLIP module static.

Images are [B, H, W, 3] uint8 (or float in 0..1) and go through `clip.preprocess`; prompts are token ids and
masks [B, T] from `clip.tokenize`. e_img, e_txt are L2-normalised projected CLIP features, cos = e_txt . e_img.

    aesthetic            MLP(e_img)                  LAION improved aesthetic predictor v2 (sac+logos+ava1-l14-
                                                     linearMSE) on openai/clip-vit-large-patch14
    PickScore            exp(logit_scale) * cos      yuvalkirstain/PickScore_v1 (CLIP-H; exp(logit_scale) ~ 100)
    CLIP score           scale * max(cos, 0)         torchmetrics' CLIPScore (scale 100), openai/clip-vit-large-patch14
    HPS                  scale * cos                 HPS v2 / v2.1 (CLIP-H) or v1 (ViT-L/14) weights via
                                                     clip.load_openclip; hpsv2's own number is cos (scale 1)
    directional CLIP     scale * cos(e_img1 - e_img0, e_txt1 - e_txt0)   InstructPix2Pix's metric (Gal et al.);
                                                     0 where the edit changed the images or the prompts by less
                                                     than 1e-4 (float noise; compute it in float32)

scale defaults to 100, the units of the paper's tables. Every score is float32 [B].
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffchat_jax.models import clip, hf_io

# Guards the cosine's denominator: a zero vector has cosine 0, not NaN.
_EPS = 1e-8
# A difference of unit embeddings shorter than this is no change: an image or prompt that the edit left as it
# was differs from itself only by float32 noise (~1e-7) when embedded twice, whose direction is meaningless.
_MIN_DIRECTION = 1e-4


class AestheticMLP(nn.Module):
    """The LAION aesthetic head: Linear layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations (its dropouts
    0.2/0.2/0.1 are identities at inference). Named like the torch nn.Sequential indices, layers.{0,2,4,6,7}."""
    features: tuple[int, ...] = (1024, 128, 64, 16, 1)

    @nn.compact
    def __call__(self, x):
        """[B, D] -> [B, 1]."""
        for index, width in zip((0, 2, 4, 6, 7), self.features):
            x = nn.Dense(width, name=f"layers_{index}")(x)
        return x


def load_aesthetic_mlp(path_or_hub_file: str, in_features: int | None = None) -> dict:
    """The published state dict (`layers.{i}.weight/bias`; .pth read with torch weights_only, or .safetensors),
    local or `owner/name/file` on the hub -> AestheticMLP params; each tensor's shape is checked against the MLP
    on `in_features`-wide embeddings (None: the file's own width)."""
    path = hf_io.resolve_file(path_or_hub_file)
    state = hf_io.read_safetensors_file(path) if path.endswith(".safetensors") else hf_io.read_torch_state_dict(path)
    want = {f"layers.{i}.{leaf}" for i in (0, 2, 4, 6, 7) for leaf in ("weight", "bias")}
    if set(state) != want:
        raise hf_io.BadModelFile(f"not a LAION aesthetic MLP: tensors {sorted(state)}, expected {sorted(want)}",
                                 where=path)
    params = {f"layers_{i}": {"kernel": state[f"layers.{i}.weight"].T, "bias": state[f"layers.{i}.bias"]}
              for i in (0, 2, 4, 6, 7)}
    width = in_features or params["layers_0"]["kernel"].shape[0]
    with hf_io.naming(path):
        return hf_io.checked_params(params, lambda: _init_aesthetic_mlp(width), _aesthetic_tensor, "aesthetic MLP",
                                    jnp.float32)


def _init_aesthetic_mlp(in_features: int) -> dict:
    return AestheticMLP().init(jax.random.key(0), jnp.zeros((1, in_features)))["params"]


def _aesthetic_tensor(path: tuple[str, ...]) -> str:
    """('layers_0', 'kernel') -> 'layers.0.weight', the file's name."""
    return f"{path[0].replace('_', '.')}.{'weight' if path[1] == 'kernel' else 'bias'}"


def abstract_aesthetic_mlp(in_features: int) -> dict:
    """AestheticMLP params as jax.ShapeDtypeStructs (float32) on `in_features`-wide embeddings (memory report)."""
    return jax.eval_shape(lambda: _init_aesthetic_mlp(in_features))


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """[B, P], [B, P] -> [B] cosine of each row pair; 0 where either vector is zero."""
    dot = jnp.sum(a * b, axis=-1)
    return dot / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), _EPS)


@functools.partial(jax.jit, static_argnames="module")
def image_embeds(module: clip.CLIP, params, images) -> jax.Array:
    """images [B, H, W, 3] uint8 or float -> [B, P] float32, L2-normalised."""
    pixels = clip.preprocess(images, module.config.vision.image_size)
    return clip.l2_normalize(module.apply({"params": params}, pixels, method=module.get_image_features))


@functools.partial(jax.jit, static_argnames="module")
def text_embeds(module: clip.CLIP, params, input_ids, attention_mask) -> jax.Array:
    """input_ids, attention_mask [B, T] -> [B, P] float32, L2-normalised."""
    features = module.apply({"params": params}, input_ids, attention_mask, method=module.get_text_features)
    return clip.l2_normalize(features)


@functools.partial(jax.jit, static_argnames="module")
def aesthetic_score(module: clip.CLIP, params, mlp_params, images) -> jax.Array:
    """images [B, H, W, 3] -> [B]: the LAION predictor on the ViT-L/14 image embedding."""
    return AestheticMLP().apply({"params": mlp_params}, image_embeds(module, params, images))[:, 0]


@functools.partial(jax.jit, static_argnames="module")
def pick_score(module: clip.CLIP, params, images, input_ids, attention_mask) -> jax.Array:
    """images [B, H, W, 3], prompts [B, T] -> [B]: exp(logit_scale) * cos(text, image)."""
    cos = cosine(text_embeds(module, params, input_ids, attention_mask), image_embeds(module, params, images))
    return jnp.exp(params["logit_scale"]) * cos


@functools.partial(jax.jit, static_argnames=("module", "clamp"))
def clip_score(module: clip.CLIP, params, images, input_ids, attention_mask, scale=100.0, clamp=True):
    """images [B, H, W, 3], prompts [B, T] -> [B]: scale * cos, floored at 0 when clamp (torchmetrics)."""
    cos = cosine(text_embeds(module, params, input_ids, attention_mask), image_embeds(module, params, images))
    return scale * (jnp.maximum(cos, 0.0) if clamp else cos)


def hps_score(module: clip.CLIP, params, images, input_ids, attention_mask, scale=100.0):
    """HPS with HPS weights (clip.load_openclip): scale * cos(text, image), not floored."""
    return clip_score(module, params, images, input_ids, attention_mask, scale, clamp=False)


@functools.partial(jax.jit, static_argnames="module")
def directional_clip(module: clip.CLIP, params, images0, images1, ids0, mask0, ids1, mask1, scale=100.0):
    """Source images [B, H, W, 3] and prompts [B, T] (0) vs edited ones (1) -> [B]:
    scale * cos(e_img1 - e_img0, e_txt1 - e_txt0); 0 where the images or the prompts did not change."""
    d_img = image_embeds(module, params, images1) - image_embeds(module, params, images0)
    d_txt = text_embeds(module, params, ids1, mask1) - text_embeds(module, params, ids0, mask0)
    moved = jnp.minimum(jnp.linalg.norm(d_img, axis=-1), jnp.linalg.norm(d_txt, axis=-1)) > _MIN_DIRECTION
    return jnp.where(moved, scale * cosine(d_img, d_txt), 0.0)
