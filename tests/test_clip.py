"""Flax CLIP vs transformers' CLIPModel on tiny random checkpoints built here; preprocessing vs
CLIPImageProcessor; tokenisation limits; the open_clip (HPS) checkpoint conversion."""
import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import traverse_util
from numpy.testing import assert_allclose, assert_array_equal
from safetensors.numpy import load_file, save_file

from diffchat_jax.models import clip
from diffchat_jax.rewards.image import tiny_clip_tokenizer

BOS, EOS = 512, 513  # the tiny tokenizer's
# Two shapes: OpenAI-style (quick_gelu, EOS pooling by id) and LAION-style (gelu, legacy eos_token_id 2 = argmax
# pooling), with different patch sizes, widths, depths and head counts.
CONFIGS = {
    "quick_gelu-patch4": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="quick_gelu", eos_token_id=EOS),
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6, image_size=24,
                    patch_size=4, hidden_act="quick_gelu")),
    "gelu-patch8": dict(
        text=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                  hidden_act="gelu", eos_token_id=2),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=24,
                    patch_size=8, hidden_act="gelu")),
}
PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at dusk, highly detailed", "", "dog"]


def hf_config(name) -> transformers.CLIPConfig:
    sizes = CONFIGS[name]
    text = dict(vocab_size=514, bos_token_id=BOS, pad_token_id=EOS, **sizes["text"])
    return transformers.CLIPConfig(text_config=text, vision_config=sizes["vision"], projection_dim=16)


def randomise(model, seed=0):
    """HF init leaves biases at 0 and LN scales at 1: randomise every tensor so every mapping is exercised."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = "norm" in name and name.endswith("weight")
            p.copy_(float(is_scale) + 0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(torch CLIPModel, folder written by save_pretrained)."""
    model = randomise(transformers.CLIPModel(hf_config(request.param)))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return model, str(folder)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_clip_tokenizer()


@functools.partial(jax.jit, static_argnames="module")
def forward(module, params, ids, mask, pixels):
    """(CLIPOutput, text features, image features) in one compilation."""
    run = lambda method, *args: module.apply({"params": params}, *args, method=method)
    return run(None, ids, mask, pixels), run("get_text_features", ids, mask), run("get_image_features", pixels)


def torch_out(model, ids, mask, pixels):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     pixel_values=torch.tensor(pixels))


def random_pixels(config, n, seed=0):
    size = config.vision.image_size
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def test_config_from_real_config_json_shapes():
    # The fields of openai/clip-vit-large-patch14's config.json that matter (legacy eos_token_id 2).
    vit_l = {"model_type": "clip", "projection_dim": 768,
             "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                             "num_hidden_layers": 12, "projection_dim": 768, "eos_token_id": 2},
             "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                               "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}}
    config = clip.CLIPConfig.from_hf(vit_l)
    assert (config.text.hidden_size, config.text.num_hidden_layers, config.text.eos_token_id) == (768, 12, 2)
    assert (config.vision.hidden_size, config.vision.patch_size, config.vision.image_size) == (1024, 14, 224)
    assert config.text.hidden_act == config.vision.hidden_act == "quick_gelu"
    assert (config.projection_dim, config.text.vocab_size, config.text.max_position_embeddings) == (768, 49408, 77)
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K (PickScore's and HPS v2's architecture).
    vit_h = {"model_type": "clip", "projection_dim": 1024,
             "text_config": {"hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
                             "num_attention_heads": 16, "num_hidden_layers": 24},
             "vision_config": {"hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120,
                               "num_attention_heads": 16, "num_hidden_layers": 32, "patch_size": 14}}
    config = clip.CLIPConfig.from_hf(vit_h)
    assert (config.vision.hidden_size, config.vision.num_hidden_layers, config.vision.hidden_act) == (1280, 32, "gelu")
    # Stable Diffusion 1.x's text_encoder: a CLIPTextModel.
    text_only = clip.CLIPConfig.from_hf({"model_type": "clip_text_model", "architectures": ["CLIPTextModel"],
                                         "hidden_size": 768, "num_hidden_layers": 12})
    assert text_only.vision is None and text_only.projection_dim is None
    with pytest.raises(ValueError, match="hidden_act"):
        clip.CLIPConfig.from_hf({**vit_h, "text_config": {"hidden_act": "relu"}})
    with pytest.raises(ValueError, match="not a CLIP config"):
        clip.CLIPConfig.from_hf({"model_type": "bloom"})


def test_param_tree_is_named_like_hf(checkpoint):
    _, folder = checkpoint
    _, params = clip.load_pretrained(folder)
    assert set(params) == {"text_model", "vision_model", "text_projection", "visual_projection", "logit_scale"}
    assert set(params["vision_model"]) == {"embeddings", "pre_layrnorm", "encoder", "post_layernorm"}
    assert set(params["text_model"]["encoder"]["layers_0"]) == {"layer_norm1", "self_attn", "layer_norm2", "mlp"}
    _, bf16 = clip.load_pretrained(folder, dtype=jnp.bfloat16)
    assert bf16["text_projection"]["kernel"].dtype == jnp.bfloat16
    assert bf16["logit_scale"].dtype == jnp.float32 and bf16["logit_scale"] == params["logit_scale"]


def test_features_and_logits_match_torch(checkpoint, tokenizer):
    model, folder = checkpoint
    module, params = clip.load_pretrained(folder)
    ids, mask = clip.tokenize(tokenizer, PROMPTS, max_length=20)
    pixels = random_pixels(module.config, 3)
    ref = torch_out(model, ids, mask, pixels)
    out, text, image = forward(module, params, ids, mask, pixels)
    for name in ("text_embeds", "image_embeds", "logits_per_image", "logits_per_text"):
        theirs = getattr(ref, name).numpy()
        assert np.abs(theirs).max() > 0.1  # not a degenerate model
        assert_allclose(getattr(out, name), theirs, atol=1e-4, rtol=0, err_msg=name)
    with torch.no_grad():
        theirs_text = model.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long),
                                              attention_mask=torch.tensor(mask)).pooler_output.numpy()
        theirs_image = model.get_image_features(pixel_values=torch.tensor(pixels)).pooler_output.numpy()
    assert_allclose(text, theirs_text, atol=1e-4, rtol=0)
    assert_allclose(image, theirs_image, atol=1e-4, rtol=0)


def test_text_only_checkpoint_hidden_states_match_clip_text_model(tmp_path, tokenizer):
    # Stable Diffusion's text_encoder is a CLIPTextModel: hidden states, no projection.
    model = randomise(transformers.CLIPTextModel(hf_config("quick_gelu-patch4").text_config))
    model.save_pretrained(tmp_path)
    module, params = clip.load_pretrained(str(tmp_path))
    assert set(params) == {"text_model"}
    ids, mask = clip.tokenize(tokenizer, PROMPTS, max_length=16)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    hidden, pooled = jax.jit(functools.partial(module.apply, method="encode_text"))({"params": params}, ids, mask)
    assert_allclose(hidden, ref.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    assert_allclose(pooled, ref.pooler_output.numpy(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="text-only"):
        module.apply({"params": params}, ids, mask, method=module.get_text_features)


def test_load_errors_name_the_tensor(checkpoint, tmp_path):
    _, folder = checkpoint
    state = load_file(os.path.join(folder, "model.safetensors"))
    bad = {k: v for k, v in state.items() if k != "visual_projection.weight"}
    bad["text_model.final_layer_norm.weight"] = np.ones(7, np.float32)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with open(os.path.join(folder, "config.json")) as src, open(tmp_path / "config.json", "w") as dst:
        dst.write(src.read())
    with pytest.raises(ValueError, match=r"missing tensor visual_projection/kernel.*final_layer_norm/scale has shape"):
        clip.load_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        clip.load_pretrained(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------------------------------------
def reference_pixels(images, size, **kwargs):
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                                   crop_size={"height": size, "width": size}, **kwargs)
    return processor(images=list(images), return_tensors="np")["pixel_values"]


def test_preprocess_matches_clip_image_processor():
    # One uint8 level after normalisation is 1 / 255 / std; the largest with the smallest std (0.2613).
    level = 1 / 255 / min(clip.OPENAI_STD)
    preprocess = jax.jit(clip.preprocess, static_argnums=1)
    rng = np.random.default_rng(0)
    # Square inputs (SD's renders) and other aspect ratios. Pillow 13 runs its vertical pass first for some
    # shapes (here 200x63), where our horizontal-first rounding differs by up to 2 levels.
    for (height, width), size, tolerance in [((48, 48), 24, 1), ((512, 512), 224, 1),
                                             ((100, 150), 24, 1), ((37, 80), 24, 1), ((200, 63), 24, 2)]:
        noise = rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8)  # worst case for overshoot
        ramp = np.linspace(0, 255, width)[None, None, :, None] * np.ones((1, height, 1, 3))
        smooth = np.clip(ramp + rng.normal(0, 20, ramp.shape), 0, 255).astype(np.uint8)
        for images in (noise, smooth):
            ours = np.asarray(preprocess(images, size))
            assert ours.shape == (1, 3, size, size) and ours.dtype == np.float32
            assert np.abs(ours - reference_pixels(images, size)).max() <= tolerance * level + 1e-5, (height, width)
            # float images in 0..1: transformers truncates them to 8 bits before PIL; we do not round.
            floats = images.astype(np.float32) / 255
            theirs = reference_pixels(floats, size, do_rescale=False)
            assert np.abs(np.asarray(preprocess(floats, size)) - theirs).max() <= 2 * level + 1e-5, (height, width)


def test_preprocess_rejects_bad_images():
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        clip.preprocess(np.zeros((32, 32, 3), np.uint8), 24)  # no batch axis
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        clip.preprocess(np.zeros((1, 3, 32, 32), np.uint8), 24)  # channels first
    for dtype in (np.int32, bool):
        with pytest.raises(ValueError, match="uint8"):
            clip.preprocess(np.zeros((1, 32, 32, 3), dtype), 24)


def test_image_features_reject_wrong_pixel_shape(checkpoint):
    _, folder = checkpoint
    module, params = clip.load_pretrained(folder)
    for shape in [(1, 3, 25, 25), (1, 24, 24, 3)]:
        with pytest.raises(ValueError, match="pixel_values must be"):
            module.apply({"params": params}, np.zeros(shape, np.float32), method=module.get_image_features)


def test_tokenize_empty_and_long_prompts(checkpoint, tokenizer):
    _, folder = checkpoint
    module, params = clip.load_pretrained(folder)
    long_prompt = "a castle on a hill " * 40
    ids, mask = clip.tokenize(tokenizer, ["", long_prompt])
    assert ids.shape == mask.shape == (2, 77) and ids.dtype == mask.dtype == np.int32
    assert_array_equal(ids[0, :3], [BOS, EOS, EOS]) and mask[0].sum() == 2  # empty = [BOS, EOS] + pads
    assert mask[1].all() and ids[1, 0] == BOS and ids[1, -1] == EOS  # truncated to 77 tokens, EOS kept last
    # Documented behaviour: the tail of a long prompt is dropped.
    assert_array_equal(ids[1, :-1], tokenizer(long_prompt)["input_ids"][:76])
    with pytest.raises(TypeError):
        clip.tokenize(tokenizer, "a single string")
    with pytest.raises(TypeError):
        clip.tokenize(tokenizer, ["ok", None])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        module.apply({"params": params}, np.zeros((1, 78), np.int32), method=module.encode_text)


# ----------------------------------------------------------------------------------------------------------
# open_clip checkpoints (HPS).
# ----------------------------------------------------------------------------------------------------------
# Recorded from open_clip 3.3.0: `open_clip.model.CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=48,
# head_width=8, patch_size=8, image_size=24), text_cfg=CLIPTextCfg(vocab_size=514, width=32, heads=4,
# layers=1)).state_dict()`, names and shapes.
OPENCLIP_TINY = {
    "positional_embedding": (77, 32), "text_projection": (32, 16), "logit_scale": (),
    "visual.class_embedding": (48,), "visual.positional_embedding": (10, 48), "visual.proj": (48, 16),
    "visual.conv1.weight": (48, 3, 8, 8), "visual.ln_pre.weight": (48,), "visual.ln_pre.bias": (48,),
    "visual.transformer.resblocks.0.ln_1.weight": (48,), "visual.transformer.resblocks.0.ln_1.bias": (48,),
    "visual.transformer.resblocks.0.attn.in_proj_weight": (144, 48),
    "visual.transformer.resblocks.0.attn.in_proj_bias": (144,),
    "visual.transformer.resblocks.0.attn.out_proj.weight": (48, 48),
    "visual.transformer.resblocks.0.attn.out_proj.bias": (48,),
    "visual.transformer.resblocks.0.ln_2.weight": (48,), "visual.transformer.resblocks.0.ln_2.bias": (48,),
    "visual.transformer.resblocks.0.mlp.c_fc.weight": (192, 48), "visual.transformer.resblocks.0.mlp.c_fc.bias": (192,),
    "visual.transformer.resblocks.0.mlp.c_proj.weight": (48, 192),
    "visual.transformer.resblocks.0.mlp.c_proj.bias": (48,),
    "visual.ln_post.weight": (48,), "visual.ln_post.bias": (48,),
    "transformer.resblocks.0.ln_1.weight": (32,), "transformer.resblocks.0.ln_1.bias": (32,),
    "transformer.resblocks.0.attn.in_proj_weight": (96, 32), "transformer.resblocks.0.attn.in_proj_bias": (96,),
    "transformer.resblocks.0.attn.out_proj.weight": (32, 32), "transformer.resblocks.0.attn.out_proj.bias": (32,),
    "transformer.resblocks.0.ln_2.weight": (32,), "transformer.resblocks.0.ln_2.bias": (32,),
    "transformer.resblocks.0.mlp.c_fc.weight": (128, 32), "transformer.resblocks.0.mlp.c_fc.bias": (128,),
    "transformer.resblocks.0.mlp.c_proj.weight": (32, 128), "transformer.resblocks.0.mlp.c_proj.bias": (32,),
    "token_embedding.weight": (514, 32), "ln_final.weight": (32,), "ln_final.bias": (32,),
}


def test_openclip_layout_matches_open_clip_state_dict():
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4),
        vision_config=dict(hidden_size=48, intermediate_size=192, num_hidden_layers=1, num_attention_heads=6,
                           image_size=24, patch_size=8), projection_dim=16)
    state = {k: v.numpy() for k, v in transformers.CLIPModel(config).state_dict().items()}
    converted = clip.hf_to_openclip(state, clip.CLIPConfig.from_hf(config.to_dict()))
    assert {k: v.shape for k, v in converted.items()} == OPENCLIP_TINY


def openclip_reference(state, ids, pixels, text_heads, vision_heads, hidden_act):
    """open_clip's CLIP.encode_text / encode_image (transformer.py) in plain torch on an open_clip state dict:
    fused q|k|v in-projection, `x @ proj` projections, argmax (EOT) text pooling, causal mask only."""
    sd = {k: torch.from_numpy(v) for k, v in state.items()}
    act = {"gelu": F.gelu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}[hidden_act]
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)

    def tower(x, prefix, heads, mask):
        i = 0
        while f"{prefix}.resblocks.{i}.ln_1.weight" in sd:
            p = f"{prefix}.resblocks.{i}."
            qkv = F.linear(ln(x, p + "ln_1"), sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"])
            q, k, v = qkv.chunk(3, -1)
            split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)
            o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask).transpose(1, 2).flatten(2)
            x = x + F.linear(o, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
            h = act(F.linear(ln(x, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
            x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
            i += 1
        return x

    with torch.no_grad():
        ids = torch.from_numpy(ids).long()
        x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:ids.shape[1]]
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        x = ln(tower(x, "transformer", text_heads, causal), "ln_final")
        text = x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]
        x = F.conv2d(torch.from_numpy(pixels), sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + sd["visual.positional_embedding"]
        x = tower(ln(x, "visual.ln_pre"), "visual.transformer", vision_heads, None)
        image = ln(x[:, 0], "visual.ln_post") @ sd["visual.proj"]
    return text.numpy(), image.numpy()


def test_openclip_checkpoint_converts_exactly(checkpoint, tokenizer, tmp_path):
    model, folder = checkpoint
    module, params = clip.load_pretrained(folder)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    oc_state = clip.hf_to_openclip(state, module.config)
    back = clip.openclip_to_hf(oc_state, module.config)
    assert back.keys() == state.keys() and all(np.array_equal(back[k], state[k]) for k in state)

    # As HPS ships it: {"state_dict": ...} plus non-tensor entries, read with weights_only.
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in oc_state.items()}, "epoch": 1}, tmp_path / "hps.pt")
    oc_module, oc_params = clip.load_openclip(str(tmp_path / "hps.pt"), folder)
    flat, oc_flat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(oc_params)
    assert flat.keys() == oc_flat.keys() and all(np.array_equal(flat[k], oc_flat[k]) for k in flat)

    # Independently of our name tables: open_clip's forward on the open_clip tensors. Pads are 0 as in open_clip.
    ids, mask = clip.tokenize(tokenizer, PROMPTS, max_length=20)
    ids = np.where(mask > 0, ids, 0).astype(np.int32)
    pixels = random_pixels(module.config, 3)
    text, image = openclip_reference(oc_state, ids, pixels, module.config.text.num_attention_heads,
                                     module.config.vision.num_attention_heads, module.config.text.hidden_act)
    _, ours_text, ours_image = forward(oc_module, oc_params, ids, mask, pixels)
    assert_allclose(ours_text, text, atol=1e-4, rtol=0)
    assert_allclose(ours_image, image, atol=1e-4, rtol=0)


def test_openclip_rejects_other_layouts(checkpoint):
    model, folder = checkpoint
    module, _ = clip.load_pretrained(folder)
    oc_state = clip.hf_to_openclip({k: v.numpy() for k, v in model.state_dict().items()}, module.config)
    with pytest.raises(ValueError, match="missing.*ln_final.weight"):
        clip.openclip_to_hf({k: v for k, v in oc_state.items() if k != "ln_final.weight"}, module.config)
    with pytest.raises(ValueError, match="unexpected.*logit_bias"):
        clip.openclip_to_hf({**oc_state, "logit_bias": np.zeros(())}, module.config)  # a SigLIP checkpoint
    assert clip.openclip_to_hf({**oc_state, "attn_mask": np.zeros((77, 77))}, module.config).keys() == \
        clip.openclip_to_hf(oc_state, module.config).keys()
