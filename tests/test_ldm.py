"""Single-file (LDM layout) SD 1.x checkpoints -> diffusers names (diffchat_jax.models.ldm).

The LDM files are written here from the tiny diffusers pipeline by an independent diffusers -> LDM renamer,
itself validated against diffusers' own single-file converters; `split_checkpoint` must then give back every
original tensor, exactly. The SD 1.5 configs are checked against diffusers / transformers models on the meta
device (names and shapes of all 1.1B parameters, no memory).
"""
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers
import numpy as np
import pytest
import torch
import transformers
from diffusers.loaders import single_file_utils
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch_file

from diffchat_jax.models import clip, ldm

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."


# ----------------------------------------------------------------------------------------------------------
# diffusers -> LDM, written independently of ldm.py (regex rewrites of the diffusers names).
# ----------------------------------------------------------------------------------------------------------
_UNET_FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_ldm(key: str, layers: int, up_attention: set[int]) -> str:
    module, leaf = key.rsplit(".", 1)
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{leaf}"
    m = re.fullmatch(r"(down|up|mid)_blocks?\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)",
                     key)
    kind, i, part, j, rest = m[1], int(m[2] or 0), m[3], int(m[4]), m[5]
    if part == "resnets":
        first, rest_of_it = rest.split(".", 1)
        rest = f"{_UNET_RESNET[first]}.{rest_of_it}"
    if kind == "mid":
        return f"middle_block.{2 * j if part == 'resnets' else 1}.{rest}"
    if kind == "down":
        if part == "downsamplers":  # rest = conv.{weight,bias}
            return f"input_blocks.{(i + 1) * (layers + 1)}.0.op.{leaf}"
        return f"input_blocks.{1 + i * (layers + 1) + j}.{0 if part == 'resnets' else 1}.{rest}"
    if part == "upsamplers":
        return f"output_blocks.{i * (layers + 1) + layers}.{2 if i in up_attention else 1}.{rest}"
    return f"output_blocks.{i * (layers + 1) + j}.{0 if part == 'resnets' else 1}.{rest}"


def vae_to_ldm(key: str, levels: int) -> str:
    top = levels - 1
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{top - int(m[1])}.block.", key)
    key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{top - int(m[1])}.upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    key = re.sub(r"mid_block\.attentions\.0\.(group_norm|to_[qkv]|to_out\.0)\.",
                 lambda m: f"mid.attn_1.{_VAE_ATTENTION[m[1]]}.", key)
    return key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")


def to_ldm(unet: dict, vae: dict, text: dict, unet_config: dict, vae_config: dict, text_model: bool = True) -> dict:
    """diffusers / transformers state dicts -> one LDM-named dict (VAE mid-attention linears as 1x1 convs)."""
    up_attention = {int(k.split(".")[1]) for k in unet if k.startswith("up_blocks.") and ".attentions." in k}
    out = {UNET + unet_to_ldm(k, unet_config["layers_per_block"], up_attention): x for k, x in unet.items()}
    for k, x in vae.items():
        name = vae_to_ldm(k, len(vae_config["block_out_channels"]))
        out[VAE + name] = x[:, :, None, None] if re.search(r"attn_1\.(q|k|v|proj_out)\.weight", name) else x
    for k, x in text.items():
        out[TEXT + ("text_model." if text_model else "") + k.removeprefix("text_model.")] = x
    return out


def assert_same(got: dict, want: dict):
    """Same names, dtypes, shapes and values."""
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert np.array_equal(got[k], want[k]), k


# ----------------------------------------------------------------------------------------------------------
# The tiny pipeline, with every tensor randomised (its norms are all 1 and 0: a swap would go unseen).
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_sd):
    """{"unet", "vae", "text"}: diffusers / transformers names (text with `text_model.`), and the configs."""
    rng = np.random.default_rng(0)
    files = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
             "text": "text_encoder/model.safetensors"}
    states = {}
    for part, file in files.items():
        state = load_file(os.path.join(tiny_sd, file))
        states[part] = {k: rng.standard_normal(x.shape).astype(np.float32) for k, x in sorted(state.items())}
    states["text"] = {"text_model." + k.removeprefix("text_model."): x for k, x in states["text"].items()}
    configs = {}
    for part in ("unet", "vae"):
        with open(os.path.join(tiny_sd, part, "config.json")) as f:
            configs[part] = json.load(f)
    return states, configs


@pytest.fixture(scope="module")
def ldm_state(tiny):
    states, configs = tiny
    return to_ldm(states["unet"], states["vae"], states["text"], configs["unet"], configs["vae"])


def split(state, configs):
    return ldm.split_checkpoint(state, configs["unet"], configs["vae"])


def assert_split_is(parts: dict, states: dict):
    assert sorted(parts) == ["text_encoder", "unet", "vae"]
    assert_same(parts["unet"], states["unet"])
    assert_same(parts["vae"], states["vae"])
    assert_same(parts["text_encoder"], states["text"])


def test_test_renamer_matches_diffusers_converters(tiny, ldm_state):
    """The test's LDM files are what diffusers' single-file loader reads back as the original model."""
    states, configs = tiny
    assert len(ldm_state) == sum(map(len, states.values()))
    assert_same(single_file_utils.convert_ldm_unet_checkpoint(ldm_state, configs["unet"]), states["unet"])
    assert_same(single_file_utils.convert_ldm_vae_checkpoint(ldm_state, configs["vae"]), states["vae"])
    assert_same(single_file_utils.convert_ldm_clip_checkpoint(ldm_state), states["text"])
    # The names the structure needs are there: down level 0 has attention, a downsampler at input_blocks.3, the
    # up level 0 (no attention) its upsampler at .1, the VAE's 1x1-conv attention.
    for name in (UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", UNET + "input_blocks.3.0.op.bias",
                 UNET + "output_blocks.2.1.conv.weight", UNET + "input_blocks.4.0.skip_connection.weight",
                 VAE + "decoder.up.1.upsample.conv.weight", VAE + "encoder.down.1.block.0.nin_shortcut.bias"):
        assert name in ldm_state, name
    assert ldm_state[VAE + "encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)


def test_split_checkpoint_gives_back_the_diffusers_state(tiny, ldm_state):
    states, configs = tiny
    parts = split(ldm_state, configs)
    assert_split_is(parts, states)
    # Renaming, not copying (a 4 GB checkpoint stays 4 GB); the VAE's attention weights are views.
    assert parts["unet"]["conv_in.weight"] is ldm_state[UNET + "input_blocks.0.0.weight"]
    assert np.shares_memory(parts["vae"]["encoder.mid_block.attentions.0.to_q.weight"],
                            ldm_state[VAE + "encoder.mid.attn_1.q.weight"])


def test_old_text_encoder_layout(tiny):
    """Files saved with transformers < 4.22 have no `text_model.` (nor then its position_ids)."""
    states, configs = tiny
    state = to_ldm(states["unet"], states["vae"], states["text"], configs["unet"], configs["vae"], text_model=False)
    assert TEXT + "final_layer_norm.weight" in state
    state[TEXT + "embeddings.position_ids"] = np.arange(77)[None]
    assert_split_is(split(state, configs), states)
    state[TEXT + "text_model.final_layer_norm.weight"] = state[TEXT + "final_layer_norm.weight"]
    with pytest.raises(ValueError, match="both with and without"):
        split(state, configs)


def _ignored_extras(ldm_state) -> dict:
    """What real files carry besides the models: EMA copies (flattened names), schedule buffers, position ids."""
    steps = np.linspace(1e-4, 0.02, 1000)
    extras = {"model_ema.decay": np.array(0.9999, np.float32), "model_ema.num_updates": np.array(5, np.int32),
              "model_ema.diffusion_modelinput_blocks00weight": ldm_state[UNET + "input_blocks.0.0.weight"] + 1,
              "betas": steps, "alphas_cumprod": np.cumprod(1 - steps), "alphas_cumprod_prev": steps,
              "sqrt_alphas_cumprod": steps, "sqrt_one_minus_alphas_cumprod": steps, "logvar": steps,
              "log_one_minus_alphas_cumprod": steps, "posterior_variance": steps, "posterior_mean_coef1": steps,
              TEXT + "text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None]}
    return {k: np.asarray(x, np.float32) if x.dtype == np.float64 else x for k, x in extras.items()}


def test_read_checkpoint_safetensors_with_ignored_keys(tiny, ldm_state, tmp_path):
    states, configs = tiny
    path = str(tmp_path / "model.safetensors")
    save_file({**ldm_state, **_ignored_extras(ldm_state)}, path)
    state = ldm.read_checkpoint(path)
    assert state[TEXT + "text_model.embeddings.position_ids"].dtype == np.int64  # integers stay integers
    assert_split_is(split(state, configs), states)


def test_single_file_pipeline_loads_the_same_params_as_the_diffusers_folder(tiny_sd, tiny, tmp_path):
    """pipeline.load_pretrained on an LDM .safetensors (configs and tokenizer from `config_from`) and on the
    diffusers folder: the same Flax params, leaf for leaf."""
    from flax import traverse_util
    from diffchat_jax.diffusion import pipeline
    _, configs = tiny
    files = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
             "text": "text_encoder/model.safetensors"}
    original = {part: load_file(os.path.join(tiny_sd, file)) for part, file in files.items()}
    path = str(tmp_path / "tiny-ldm.safetensors")
    save_file({**to_ldm(original["unet"], original["vae"], original["text"], configs["unet"], configs["vae"]),
               **_ignored_extras(to_ldm(original["unet"], {}, {}, configs["unet"], configs["vae"]))}, path)
    single_model, single = pipeline.load_pretrained(path, config_from=tiny_sd)
    folder_model, folder = pipeline.load_pretrained(tiny_sd)
    assert single_model.unet.config == folder_model.unet.config and single_model.vae.config == folder_model.vae.config
    single, folder = traverse_util.flatten_dict(single), traverse_util.flatten_dict(folder)
    assert sorted(single) == sorted(folder)
    for name in folder:
        np.testing.assert_array_equal(np.asarray(single[name]), np.asarray(folder[name]), err_msg="/".join(name))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_read_checkpoint_half_precision(tiny, ldm_state, tmp_path, dtype):
    """Most Civitai files are fp16 (some bf16): read as float32, the stored values exactly."""
    states, configs = tiny
    path = str(tmp_path / "model.safetensors")
    save_torch_file({k: torch.from_numpy(x).to(dtype) for k, x in ldm_state.items()}, path)
    parts = split(ldm.read_checkpoint(path), configs)
    for part, name in (("unet", "unet"), ("vae", "vae"), ("text_encoder", "text")):
        want = {k: torch.from_numpy(x).to(dtype).float().numpy() for k, x in states[name].items()}
        assert_same(parts[part], want)
        assert any(not np.array_equal(want[k], x) for k, x in states[name].items())  # rounding happened


class LightningCallback:  # stands for the training state pickled in old .ckpt files
    pass


def test_read_checkpoint_torch(tiny, ldm_state, tmp_path):
    states, configs = tiny
    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": {k: torch.from_numpy(x) for k, x in ldm_state.items()}, "global_step": 470000}, path)
    assert_split_is(split(ldm.read_checkpoint(path), configs), states)
    torch.save({"state_dict": {"betas": torch.zeros(3)}, "callbacks": LightningCallback()}, path)
    with pytest.raises(ValueError, match=r"convert it to \.safetensors"):
        ldm.read_checkpoint(path)


def test_unknown_and_missing_tensors(tiny, ldm_state):
    _, configs = tiny
    unknown = [UNET + "input_blocks.99.0.in_layers.0.weight", "cond_stage_model.model.token_embedding.weight",
               "first_stage_model.loss.logvar"]
    with pytest.raises(ValueError, match=r"3 unknown tensors: " + re.escape(", ".join(unknown))) as e:
        split({**ldm_state, **{k: np.zeros(1) for k in unknown}}, configs)
    assert "missing" not in str(e.value)
    gone = [VAE + "decoder.mid.attn_1.proj_out.bias", UNET + "output_blocks.5.1.transformer_blocks.0.attn1.to_q.weight",
            TEXT + "text_model.encoder.layers.0.mlp.fc1.bias"]
    with pytest.raises(ValueError, match="3 missing tensors") as e:
        split({k: x for k, x in ldm_state.items() if k not in gone}, configs)
    assert all(name in str(e.value) for name in gone) and "unknown" not in str(e.value)


def test_config_must_match_the_file(tiny, ldm_state):
    _, configs = tiny
    # One resnet per level instead of two: the file's extra blocks are unknown, its numbering shifts.
    with pytest.raises(ValueError, match=r"\d+ unknown tensors: .*; \d+ missing tensors: "):
        ldm.split_checkpoint(ldm_state, {**configs["unet"], "layers_per_block": 1}, configs["vae"])
    no_attention = {**configs["vae"], "mid_block_add_attention": False}
    with pytest.raises(ValueError, match=r"20 unknown tensors: .*mid\.attn_1"):
        ldm.split_checkpoint(ldm_state, configs["unet"], no_attention)
    for key, value in (("class_embed_type", "timestep"), ("addition_embed_type", "text_time"),
                       ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn")):
        with pytest.raises(ValueError, match=f"unsupported {key}="):
            ldm.split_checkpoint(ldm_state, {**configs["unet"], key: value}, configs["vae"])
    with pytest.raises(ValueError, match="unsupported UNet blocks"):
        ldm.split_checkpoint(ldm_state, {**configs["unet"], "up_block_types": ["UpBlock2D", "SkipUpBlock2D"]},
                             configs["vae"])


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def test_sd15_configs_build_sd15_and_name_all_its_tensors():
    """diffusers / transformers accept the SD 1.5 configs as written (every key a real field, same values) and
    the split of an SD 1.5-shaped LDM file (zero-stride arrays) gives every tensor of those models, shaped."""
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(ldm.SD15_UNET_CONFIG)
        vae = diffusers.AutoencoderKL.from_config(ldm.SD15_VAE_CONFIG)
        text_config = transformers.CLIPTextConfig.from_dict(ldm.SD15_TEXT_CONFIG)
        text = transformers.CLIPTextModel(text_config)
    for model, config in ((unet, ldm.SD15_UNET_CONFIG), (vae, ldm.SD15_VAE_CONFIG)):
        for key, value in config.items():
            assert key == "_class_name" or _plain(model.config[key]) == _plain(value), key
    for key, value in ldm.SD15_TEXT_CONFIG.items():
        assert _plain(getattr(text_config, key)) == value, key
    assert clip.CLIPConfig.from_hf(ldm.SD15_TEXT_CONFIG).text.num_hidden_layers == 12
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964

    def shapes(model):
        return {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}

    states = {"unet": shapes(unet), "vae": shapes(vae), "text": {"text_model." + k.removeprefix("text_model."): x
                                                                 for k, x in shapes(text).items()}}
    state = to_ldm(states["unet"], states["vae"], states["text"], ldm.SD15_UNET_CONFIG, ldm.SD15_VAE_CONFIG)
    assert len(state) == 686 + 248 + 196
    # The renamer agrees with diffusers at SD 1.5's size too (4 levels, upsamplers at output_blocks.{2,5,8}.{1,2}).
    assert sorted(single_file_utils.convert_ldm_unet_checkpoint(state, ldm.SD15_UNET_CONFIG)) == sorted(states["unet"])
    assert sorted(single_file_utils.convert_ldm_vae_checkpoint(state, ldm.SD15_VAE_CONFIG)) == sorted(states["vae"])
    assert UNET + "output_blocks.2.1.conv.weight" in state and UNET + "output_blocks.8.2.conv.weight" in state
    parts = ldm.split_checkpoint(state, ldm.SD15_UNET_CONFIG, ldm.SD15_VAE_CONFIG)
    for part, name in (("unet", "unet"), ("vae", "vae"), ("text_encoder", "text")):
        assert {k: x.shape for k, x in parts[part].items()} == {k: x.shape for k, x in states[name].items()}
