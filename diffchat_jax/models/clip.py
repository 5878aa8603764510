"""CLIP (text and vision towers with projections) in flax.linen, numerically matching transformers' `CLIPModel`.

The param tree mirrors the HF state dict, so conversion is a renaming (Dense kernel = torch weight.T, Conv
kernel = torch weight as HWIO; `layers.{i}` becomes `layers_{i}`):

    text_model/embeddings/{token_embedding,position_embedding}/embedding
    text_model/encoder/layers_{i}/{layer_norm1,layer_norm2}/{scale,bias}
    text_model/encoder/layers_{i}/self_attn/{q_proj,k_proj,v_proj,out_proj}/{kernel,bias}
    text_model/encoder/layers_{i}/mlp/{fc1,fc2}/{kernel,bias}
    text_model/final_layer_norm/{scale,bias}
    vision_model/embeddings/{class_embedding, patch_embedding/kernel, position_embedding/embedding}
    vision_model/{pre_layrnorm,post_layernorm}/{scale,bias}   (sic: HF's spelling)   vision_model/encoder/...
    text_projection/kernel, visual_projection/kernel, logit_scale

Checkpoints: transformers `CLIPModel` folders (`load_pretrained`), text-only `CLIPTextModel` folders such as
Stable Diffusion's text_encoder (no vision tower, no projections), and open_clip / OpenAI-CLIP state dicts such
as HPS (`load_openclip`, architecture from a transformers config). Images go through `preprocess` (JAX,
emulating CLIPImageProcessor's PIL path), prompts through `tokenize` (transformers' CLIP tokenizer).
"""
import dataclasses
import functools
import os
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffchat_jax.models import hf_io, known

# The normalisation of every checkpoint used here (OpenAI CLIP, LAION CLIP-H, PickScore, HPS).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # open_clip / LAION models (erf GELU)
}
# Tower fields no tensor shape confirms (widths, depths, vocabulary, positions and patches all show in the
# weights): left out of a config.json, they take transformers' defaults and a model trained otherwise loads without
# error. The text tower also pools at its eos_token_id.
_UNCONFIRMED = ("num_attention_heads", "hidden_act", "layer_norm_eps")
_UNCONFIRMED_TEXT = _UNCONFIRMED + ("eos_token_id",)


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """One transformer tower; HF field names."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class TextConfig(TowerConfig):
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    # Pooling token, as HF: the first `eos_token_id`; legacy configs say 2 and then pool at argmax(input_ids),
    # which is also EOS (the largest id of CLIP's vocabulary).
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class VisionConfig(TowerConfig):
    image_size: int = 224
    patch_size: int = 32


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """vision None: a text-only CLIPTextModel; projection_dim None: no projections (nor logit_scale).

    dtype: compute dtype (activations, matmuls); params keep their own. Softmax and features are float32.
    """
    text: TextConfig
    vision: VisionConfig | None = None
    projection_dim: int | None = None
    dtype: Any = jnp.float32

    @classmethod
    def from_hf(cls, hf: dict) -> "CLIPConfig":
        """From a config.json dict of a CLIPModel (model_type "clip") or CLIPTextModel ("clip_text_model");
        transformers' config classes fill in the fields a file leaves out."""
        import transformers
        from huggingface_hub.errors import StrictDataclassError  # transformers' checks of config values
        model_type = hf.get("model_type")
        try:
            if model_type == "clip":
                full = transformers.CLIPConfig.from_dict(hf)
                text, vision = full.text_config, full.vision_config
            elif model_type == "clip_text_model":
                if hf.get("architectures", ["CLIPTextModel"]) != ["CLIPTextModel"]:
                    raise hf_io.BadModelFile(f"unsupported text-only CLIP {hf['architectures']} (only CLIPTextModel)")
                text, vision = transformers.CLIPTextConfig.from_dict(hf), None
            else:
                raise hf_io.BadModelFile(f"not a CLIP config: model_type {model_type!r}; a transformers CLIPModel "
                                         "or CLIPTextModel config.json is expected")
        except StrictDataclassError as e:
            raise hf_io.BadModelFile(f"not a valid CLIP config ({' '.join(str(e).split())})") from e
        for tower in (text, vision):
            if tower is not None and tower.hidden_act not in ACTIVATIONS:
                raise hf_io.BadModelFile(f"hidden_act {tower.hidden_act!r} not supported; known: "
                                         f"{sorted(ACTIVATIONS)}")

        def tower_fields(hf_tower):
            return {f.name: getattr(hf_tower, f.name) for f in dataclasses.fields(TowerConfig)}

        text = TextConfig(**tower_fields(text), vocab_size=text.vocab_size, eos_token_id=text.eos_token_id,
                          max_position_embeddings=text.max_position_embeddings)
        if vision is None:
            return cls(text=text)
        vision = VisionConfig(**tower_fields(vision), image_size=vision.image_size, patch_size=vision.patch_size)
        return cls(text=text, vision=vision, projection_dim=full.projection_dim)


def unconfirmed_defaults(hf: dict) -> dict[str, Any]:
    """The tower fields a CLIPModel / CLIPTextModel config.json dict leaves to transformers' defaults that no tensor
    shape confirms, as {"text_config.num_attention_heads": 8, ...} (no prefix for a CLIPTextModel)."""
    import transformers
    text_defaults, vision_defaults = transformers.CLIPTextConfig(), transformers.CLIPVisionConfig()
    if hf.get("model_type") == "clip_text_model":
        towers = [("", hf, text_defaults, _UNCONFIRMED_TEXT)]
    else:
        # transformers also reads the `*_config_dict` copies older files carry.
        tower = lambda name: {**(hf.get(f"{name}_dict") or {}), **(hf.get(name) or {})}
        towers = [("text_config.", tower("text_config"), text_defaults, _UNCONFIRMED_TEXT),
                  ("vision_config.", tower("vision_config"), vision_defaults, _UNCONFIRMED)]
    return {prefix + field: getattr(defaults, field) for prefix, given, defaults, fields in towers
            for field in fields if given.get(field) is None}


def read_config_json(path: str) -> dict:
    """A CLIP config.json file as a dict, checked as CLIPConfig.from_hf does, warning about the fields it leaves to
    defaults that no tensor shape checks."""
    hf = hf_io.read_json(path)
    with hf_io.naming(path):
        CLIPConfig.from_hf(hf)
    hf_io.warn_defaults(path, unconfirmed_defaults(hf))
    return hf


@flax.struct.dataclass
class CLIPOutput:
    """As transformers' CLIPOutput: logits_per_image [B_img, B_txt], logits_per_text [B_txt, B_img] (= the
    cosines times exp(logit_scale)); text_embeds [B_txt, P], image_embeds [B_img, P] L2-normalised; float32."""
    logits_per_image: jax.Array
    logits_per_text: jax.Array
    text_embeds: jax.Array
    image_embeds: jax.Array


def _layer_norm(config: TowerConfig, dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, name=name)


class Attention(nn.Module):
    config: TowerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        """x [B, T, D]; mask [B, T, T] bool (True = may attend) or None (all) -> [B, T, D]."""
        batch, length, width = x.shape
        heads = self.config.num_attention_heads
        q, k, v = (nn.Dense(width, dtype=self.dtype, name=f"{p}_proj")(x).reshape(batch, length, heads, -1)
                   for p in "qkv")
        scores = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (width // heads) ** -0.5
        if mask is not None:
            # A finite fill, not -inf: a fully masked row (a query at a left pad) stays finite.
            scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bnts,bsnd->btnd", probs, v).reshape(batch, length, width)
        return nn.Dense(width, dtype=self.dtype, name="out_proj")(out)


class MLP(nn.Module):
    config: TowerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """[B, T, D] -> [B, T, D]."""
        h = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = ACTIVATIONS[self.config.hidden_act](h)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(h)


class EncoderLayer(nn.Module):
    """Pre-LN transformer block."""
    config: TowerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        """x [B, T, D], mask [B, T, T] bool or None -> [B, T, D]."""
        cfg = self.config
        x = x + Attention(cfg, self.dtype, name="self_attn")(_layer_norm(cfg, self.dtype, "layer_norm1")(x), mask)
        return x + MLP(cfg, self.dtype, name="mlp")(_layer_norm(cfg, self.dtype, "layer_norm2")(x))


class Encoder(nn.Module):
    config: TowerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        for i in range(self.config.num_hidden_layers):
            x = EncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x, mask)
        return x


class TextEmbeddings(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        """[B, T] int -> [B, T, D]."""
        cfg = self.config
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(input_ids.shape[1]))
        return tokens + positions[None]


class TextTransformer(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        """input_ids, attention_mask [B, T] (T <= max_position_embeddings; mask 1 = real token) ->
        (last_hidden_state [B, T, D] after final_layer_norm, pooled [B, D] at the EOS token)."""
        cfg = self.config
        batch, length = input_ids.shape
        if length > cfg.max_position_embeddings:
            raise ValueError(f"{length} tokens > max_position_embeddings {cfg.max_position_embeddings}: "
                             "tokenize with truncation (see `tokenize`)")
        x = TextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        causal = jnp.tril(jnp.ones((length, length), bool))
        x = Encoder(cfg, self.dtype, name="encoder")(x, causal[None] & (attention_mask[:, None, :] > 0))
        x = _layer_norm(cfg, self.dtype, "final_layer_norm")(x)
        # A row without EOS pools at position 0, as HF does.
        eos = jnp.argmax(input_ids if cfg.eos_token_id == 2 else input_ids == cfg.eos_token_id, axis=-1)
        return x, x[jnp.arange(batch), eos]


class VisionEmbeddings(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        """[B, 3, S, S] (S = image_size) -> [B, 1 + (S / patch)^2, D]: class token then patches in row-major order."""
        cfg = self.config
        patches = nn.Conv(cfg.hidden_size, (cfg.patch_size,) * 2, strides=cfg.patch_size, padding="VALID",
                          use_bias=False, dtype=self.dtype, name="patch_embedding")(pixel_values.transpose(0, 2, 3, 1))
        patches = patches.reshape(patches.shape[0], -1, cfg.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(cfg.hidden_size ** -0.5), (cfg.hidden_size,))
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (patches.shape[0], 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        positions = nn.Embed(x.shape[1], cfg.hidden_size, dtype=self.dtype, name="position_embedding")
        return x + positions(jnp.arange(x.shape[1]))[None]


class VisionTransformer(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        """pixel_values [B, 3, S, S] (the transformers layout, S = image_size) ->
        (last_hidden_state [B, 1 + P, D], pooled [B, D] = post_layernorm of the class token)."""
        cfg = self.config
        expected = (3, cfg.image_size, cfg.image_size)
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != expected:
            raise ValueError(f"pixel_values must be [B, {', '.join(map(str, expected))}] (see `preprocess`), "
                             f"got {pixel_values.shape}")
        x = VisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values.astype(self.dtype))
        x = Encoder(cfg, self.dtype, name="encoder")(_layer_norm(cfg, self.dtype, "pre_layrnorm")(x))
        return x, _layer_norm(cfg, self.dtype, "post_layernorm")(x[:, 0])


class CLIP(nn.Module):
    """CLIPModel (or a text-only CLIPTextModel). Deterministic: no dropout.

    Use as `module.apply({"params": params}, ..., method=module.get_text_features)` like transformers' methods:
    get_text_features / get_image_features return projected, unnormalised features; encode_text the text tower's
    hidden states (Stable Diffusion's conditioning); __call__ the CLIPOutput of a text batch and an image batch.
    """
    config: CLIPConfig

    def setup(self):
        cfg = self.config
        self.text_model = TextTransformer(cfg.text, cfg.dtype)
        if cfg.vision is not None:
            self.vision_model = VisionTransformer(cfg.vision, cfg.dtype)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=cfg.dtype)
            self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=cfg.dtype)
            # HF's init, log(1 / 0.07).
            self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), ())

    def encode_text(self, input_ids, attention_mask=None):
        """input_ids [B, T] int, attention_mask [B, T] (None = all ones, as Stable Diffusion calls it) ->
        (last_hidden_state [B, T, D_text], pooled [B, D_text]) in the compute dtype."""
        mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.text_model(input_ids, mask)

    def get_text_features(self, input_ids, attention_mask=None):
        """[B, T] -> [B, P] float32, unnormalised."""
        self._require_projections()
        return self.text_projection(self.encode_text(input_ids, attention_mask)[1]).astype(jnp.float32)

    def get_image_features(self, pixel_values):
        """pixel_values [B, 3, S, S] float (see `preprocess`) -> [B, P] float32, unnormalised."""
        self._require_projections()
        return self.visual_projection(self.vision_model(pixel_values)[1]).astype(jnp.float32)

    def __call__(self, input_ids, attention_mask, pixel_values) -> CLIPOutput:
        text = l2_normalize(self.get_text_features(input_ids, attention_mask))
        image = l2_normalize(self.get_image_features(pixel_values))
        logits_per_text = jnp.exp(self.logit_scale.astype(jnp.float32)) * text @ image.T
        return CLIPOutput(logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                          text_embeds=text, image_embeds=image)

    def _require_projections(self):
        if self.config.vision is None or self.config.projection_dim is None:
            raise ValueError("a text-only CLIP has no projections; use encode_text")


def l2_normalize(x: jax.Array) -> jax.Array:
    """[..., P] -> unit vectors along the last axis (as HF: x / ||x||)."""
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def init_params(config: CLIPConfig, rng: jax.Array):
    """Random params (flax default initialisers; logit_scale as HF), float32."""
    model = CLIP(config)
    ids = jnp.zeros((1, config.text.max_position_embeddings), jnp.int32)
    if config.vision is None:
        return model.init(rng, ids, method=model.encode_text)["params"]
    pixels = jnp.zeros((1, 3, config.vision.image_size, config.vision.image_size))
    return model.init(rng, ids, jnp.ones_like(ids), pixels)["params"]


# ----------------------------------------------------------------------------------------------------------
# Inputs: images and prompts.
# ----------------------------------------------------------------------------------------------------------
def preprocess(images, size: int) -> jax.Array:
    """images [B, H, W, 3] uint8 (0..255) or float (0..1) -> pixel_values [B, 3, size, size] float32.

    CLIPImageProcessor's steps: bicubic resize of the shortest side to `size` (long side int(size * long /
    short)), centre crop, OpenAI mean/std. transformers resizes in PIL on 8-bit images: a horizontal and a
    vertical antialiased bicubic pass (a = -0.5), each rounded and clipped to 0..255. We run the same passes
    with jax.image.resize, horizontal first; uint8 images are rounded between passes like PIL, float images are
    only clipped (PIL would first truncate them to 8 bits). Measured against transformers with Pillow 13
    (tests/test_clip.py): uint8 within 1 level of 255 for square images (SD renders) and most shapes; Pillow
    13 runs the vertical pass first for some shapes (e.g. 200x63 -> 24), there within 2 levels; float images
    within 2 levels. One level is <= 0.0151 after normalisation.
    Jittable: shapes are static.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3] (RGB, channels last), got {images.shape}")
    quantize = images.dtype == jnp.uint8
    if not (quantize or jnp.issubdtype(images.dtype, jnp.floating)):
        raise ValueError(f"images must be uint8 (0..255) or float (0..1), got {images.dtype}")
    batch, height, width, _ = images.shape
    short, long = sorted((height, width))
    new_long = int(size * long / short)
    new_height, new_width = (size, new_long) if height <= width else (new_long, size)
    # Channels first from the start: the output layout, and ~30% faster resizes on CPU (contiguous last axis).
    x = images.transpose(0, 3, 1, 2).astype(jnp.float32) * (1.0 if quantize else 255.0)
    for shape in ((batch, 3, height, new_width), (batch, 3, new_height, new_width)):
        if shape != x.shape:
            x = jax.image.resize(x, shape, "bicubic", antialias=True)
            x = jnp.clip(jnp.round(x) if quantize else x, 0.0, 255.0)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    x = x[:, :, top:top + size, left:left + size] / 255.0
    return (x - jnp.asarray(OPENAI_MEAN)[:, None, None]) / jnp.asarray(OPENAI_STD)[:, None, None]


def tokenize(tokenizer, prompts: Sequence[str], max_length: int = 77) -> tuple[np.ndarray, np.ndarray]:
    """prompts -> (input_ids, attention_mask) [B, max_length] int32, padded to max_length (one jit shape).

    Longer prompts are truncated to max_length tokens, EOS kept last (what transformers and open_clip do: the
    tail of the prompt is not seen). An empty prompt is [BOS, EOS]: scored as the empty text.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a sequence of str")
    enc = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


# ----------------------------------------------------------------------------------------------------------
# HF state dict -> Flax params.
# ----------------------------------------------------------------------------------------------------------
_IGNORED = ("position_ids",)  # buffers that old transformers checkpoints saved
# transformers 5 saves a CLIPTextModel without the `text_model.` prefix of 4.x files (e.g. SD's text_encoder).
_TEXT_MODEL_PARTS = ("embeddings", "encoder", "final_layer_norm")


def _hf_key_to_path(key: str) -> tuple[str, ...]:
    """'text_model.encoder.layers.3.self_attn.q_proj.weight' -> ('text_model', 'encoder', 'layers_3',
    'self_attn', 'q_proj', 'kernel')."""
    path = []
    for part in key.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    *modules, leaf = path
    if leaf in ("class_embedding", "logit_scale", "bias"):
        return tuple(path)
    if leaf != "weight" or not modules:
        raise hf_io.BadModelFile(f"unexpected tensor {key!r} in a CLIP checkpoint")
    module = modules[-1]
    if module == "patch_embedding":
        name = "kernel"
    elif module.endswith("_embedding"):
        name = "embedding"
    elif "norm" in module:  # layer_norm1/2, final_layer_norm, pre_layrnorm, post_layernorm
        name = "scale"
    else:
        name = "kernel"
    return (*modules, name)


def hf_to_params(state: dict[str, np.ndarray]) -> dict:
    """HF CLIPModel / CLIPTextModel state dict -> nested Flax params (numpy)."""
    flat = {}
    for key, x in state.items():
        if key.split(".")[-1] in _IGNORED:
            continue
        if key.split(".")[0] in _TEXT_MODEL_PARTS:
            key = "text_model." + key
        path = _hf_key_to_path(key)
        if path[-1] == "kernel":
            x = x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T  # conv OIHW -> HWIO; linear [out, in] -> [in, out]
        flat[path] = x
    return traverse_util.unflatten_dict(flat)


def _build(config: CLIPConfig, state: dict[str, np.ndarray] | None, dtype):
    """(CLIP, params); state None: abstract params (shapes only)."""
    params = hf_io.checked_params(None if state is None else hf_to_params(state),
                                  lambda: init_params(config, jax.random.key(0)), "/".join, "CLIP", dtype)
    if state is None:
        return CLIP(config), params
    if "logit_scale" in params:
        # Scores scale by exp(logit_scale): in bf16 PickScore's log(100) would become 98.9.
        params["logit_scale"] = jnp.asarray(state["logit_scale"], jnp.float32)
    return CLIP(config), params


def _read_config(folder: str, compute_dtype) -> CLIPConfig:
    return dataclasses.replace(CLIPConfig.from_hf(read_config_json(os.path.join(folder, "config.json"))),
                               dtype=compute_dtype)


def from_state(config_dict: dict, state: dict[str, np.ndarray] | None, dtype=jnp.float32, compute_dtype=None):
    """A transformers config.json dict and an HF-named state dict in memory (e.g. the text encoder of a
    single-file Stable Diffusion checkpoint) -> (CLIP, params), as `load_pretrained`; state None: abstract
    params (jax.ShapeDtypeStructs, for the memory report)."""
    config = dataclasses.replace(CLIPConfig.from_hf(config_dict), dtype=compute_dtype or dtype)
    return _build(config, state, dtype)


def load_pretrained(path_or_id: str, dtype=jnp.float32, compute_dtype=None, abstract: bool = False):
    """Load a transformers CLIPModel or CLIPTextModel checkpoint (local folder or hub id) -> (CLIP, params).

    Reads config.json and model.safetensors (or sharded). Params are cast to `dtype`, also the compute dtype
    unless `compute_dtype` is given. abstract=True: shapes only (jax.ShapeDtypeStructs), from the local
    config.json or, for a hub id, the built-in table (models/known.py); nothing is read or downloaded.
    """
    if abstract:
        return from_state(known.config_json(path_or_id, known.CLIP), None, dtype, compute_dtype)
    folder = hf_io.resolve_folder(path_or_id, ["config.json", "*.safetensors", "*.index.json"])
    config, state = _read_config(folder, compute_dtype or dtype), hf_io.read_safetensors(folder)
    with hf_io.naming(folder):
        return _build(config, state, dtype)


# ----------------------------------------------------------------------------------------------------------
# open_clip / OpenAI-CLIP state dicts (HPS v1 and v2 checkpoints) <-> HF names.
# ----------------------------------------------------------------------------------------------------------
# Per residual block: open_clip module -> HF module. attn.in_proj_{weight,bias} is q, k, v stacked on axis 0.
_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# Projections are used as `x @ proj` in open_clip: the transposed HF Linear weight.
_OPENCLIP_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
# Buffers or metadata some files carry (the causal mask; OpenAI's JIT archives' sizes).
_OPENCLIP_IGNORED = ("attn_mask", "input_resolution", "context_length", "vocab_size")


def _openclip_names(config: CLIPConfig) -> dict[str, str | tuple[str, str, str]]:
    """open_clip tensor name -> HF name, or (q, k, v) names for a fused in-projection; every tensor of a CLIP."""
    names = {
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "logit_scale": "logit_scale",
        **_OPENCLIP_TRANSPOSED,
    }
    for ours, theirs in (("ln_final", "text_model.final_layer_norm"), ("visual.ln_pre", "vision_model.pre_layrnorm"),
                         ("visual.ln_post", "vision_model.post_layernorm")):
        names.update({f"{ours}.{leaf}": f"{theirs}.{leaf}" for leaf in ("weight", "bias")})
    for prefix, hf_prefix, tower in (("transformer", "text_model", config.text),
                                     ("visual.transformer", "vision_model", config.vision)):
        for i in range(tower.num_hidden_layers):
            block, layer = f"{prefix}.resblocks.{i}", f"{hf_prefix}.encoder.layers.{i}"
            for leaf in ("weight", "bias"):
                names[f"{block}.attn.in_proj_{leaf}"] = tuple(f"{layer}.self_attn.{p}_proj.{leaf}" for p in "qkv")
                names.update({f"{block}.{ours}.{leaf}": f"{layer}.{theirs}.{leaf}"
                              for ours, theirs in _OPENCLIP_BLOCK.items()})
    return names


def openclip_to_hf(state: dict[str, np.ndarray], config: CLIPConfig) -> dict[str, np.ndarray]:
    """An open_clip (or OpenAI `clip` package) ViT CLIP state dict -> the transformers CLIPModel state dict."""
    names = _openclip_names(config)
    unexpected = sorted(k for k in state if k not in names and k.split(".")[-1] not in _OPENCLIP_IGNORED)
    missing = sorted(k for k in names if k not in state)
    if unexpected or missing:
        raise hf_io.BadModelFile(f"not an open_clip ViT CLIP of this config: missing {missing[:8]}, "
                                 f"unexpected {unexpected[:8]}")
    hf = {}
    for key, name in names.items():
        x = state[key]
        if isinstance(name, tuple):
            hf.update(zip(name, np.split(x, 3, axis=0)))
        else:
            hf[name] = x.T if key in _OPENCLIP_TRANSPOSED else x
    return hf


def hf_to_openclip(state: dict[str, np.ndarray], config: CLIPConfig) -> dict[str, np.ndarray]:
    """Inverse of openclip_to_hf (writes open_clip-layout test checkpoints)."""
    out = {}
    for key, name in _openclip_names(config).items():
        if isinstance(name, tuple):
            out[key] = np.concatenate([state[n] for n in name], axis=0)
        else:
            out[key] = state[name].T if key in _OPENCLIP_TRANSPOSED else state[name]
    return out


def load_openclip(checkpoint: str, config_path_or_id: str, dtype=jnp.float32, compute_dtype=None):
    """An open_clip / OpenAI-CLIP checkpoint file (local or `owner/name/file` on the hub; a state dict, possibly
    under "state_dict", read with torch weights_only) with the architecture of a transformers CLIP config
    (folder or hub id, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K for HPS v2) -> (CLIP, params)."""
    config = _read_config(hf_io.resolve_folder(config_path_or_id, ["config.json"]), compute_dtype or dtype)
    path = hf_io.resolve_file(checkpoint)
    state = hf_io.read_torch_state_dict(path)
    with hf_io.naming(path):
        return _build(config, openclip_to_hf(state, config), dtype)
