"""Flax UNet vs diffusers' UNet2DConditionModel: the tiny SD 1.x pipeline's UNet and an SD 2.x-style config built
here (linear projections, per-block head counts); the state dict conversion; checkpoint and config errors; bf16."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from numpy.testing import assert_array_equal
from safetensors.numpy import load_file

from diffchat_jax.models import unet

BATCH, TOKENS = 2, 7
# SD 1.5's unet/config.json (runwayml/stable-diffusion-v1-5), the keys that matter.
SD15 = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
# SD 2.x's differences (stabilityai/stable-diffusion-2-1).
SD21 = {**SD15, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True,
        "upcast_attention": True, "dual_cross_attention": False, "num_class_embeds": None, "sample_size": 96}
# Tiny SD 2.x-style UNet: linear proj_in/proj_out, 2 heads in the first block and 4 in the second and the mid
# block (the up blocks take them reversed: head counts change no shape, only the parity test can tell).
LINEAR_TINY = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                   cross_attention_dim=24, attention_head_dim=(2, 4), norm_num_groups=4, use_linear_projection=True,
                   down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2)


def torch_unet(sample, timestep, context, model):
    t = torch.from_numpy(timestep) if isinstance(timestep, np.ndarray) else timestep
    with torch.no_grad():
        return model(torch.from_numpy(sample), t, torch.from_numpy(context)).sample.numpy()


def random_inputs(config: unet.UNetConfig, height: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sample = rng.normal(size=(BATCH, config.in_channels, height, width)).astype(np.float32)
    return sample, rng.normal(size=(BATCH, TOKENS, config.cross_attention_dim)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tiny_sd):
    """(torch UNet2DConditionModel, our UNet, params) of the tiny pipeline's unet/."""
    model = diffusers.UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    return (model, *unet.load_pretrained(tiny_sd))


def test_config_from_diffusers():
    config = unet.UNetConfig.from_diffusers(SD15)
    assert config == unet.UNetConfig(cross_attention_dim=768)  # our defaults are SD 1.5's but for diffusers' 1280
    assert config.num_heads == (8, 8, 8, 8)  # attention_head_dim is the head count
    sd21 = unet.UNetConfig.from_diffusers(SD21)
    assert sd21.num_heads == (5, 10, 20, 20) and sd21.use_linear_projection and sd21.sample_size == 96
    params = jax.eval_shape(lambda: unet.init_params(config, jax.random.key(0)))
    assert sum(x.size for x in jax.tree.leaves(params)) == 859_520_964  # SD 1.5's UNet
    unsupported = {
        "_class_name": "UNet2DModel",
        "class_embed_type": "timestep",
        "addition_embed_type": "text_time",  # SDXL
        "transformer_layers_per_block": [1, 2, 10],  # SDXL
        "num_attention_heads": 8,
        "only_cross_attention": [False, True, False, False],
        "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4,
        "cross_attention_dim": [768] * 4,
        "attention_head_dim": [8, 8],
        "norm_num_groups": None,
        "time_cond_proj_dim": 256,  # LCM
    }
    for key, value in unsupported.items():
        with pytest.raises(ValueError, match=key):
            unet.UNetConfig.from_diffusers({**SD15, key: value})


@pytest.mark.slow
def test_matches_diffusers(tiny):
    model, module, params = tiny
    forward = jax.jit(module.apply)
    sample, context = random_inputs(module.config, 16, 16)
    outputs = []
    for timestep in (999, np.array([3, 500]), 250.7):
        theirs = torch_unet(sample, timestep, context, model)
        ours = forward({"params": params}, sample, timestep, context)
        assert ours.shape == sample.shape and ours.dtype == jnp.float32
        assert np.abs(theirs).max() > 0.5  # not a degenerate model
        assert np.abs(ours - theirs).max() < 1e-4, timestep
        outputs.append(ours)
    assert np.abs(outputs[0] - outputs[2]).max() > 1e-2  # the timestep matters


def test_linear_projection_per_block_heads_odd_size(tmp_path):
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**LINEAR_TINY).eval()
    # Norm scales are 1 and biases 0 at init: randomise every tensor so every mapping is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(float("norm" in name and name.endswith("weight")) + 0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    module, params = unet.load_pretrained(str(tmp_path))
    assert module.config.num_heads == (2, 4) and module.config.use_linear_projection
    assert params["mid_block"]["attentions_0"]["proj_in"]["kernel"].shape == (32, 32)  # a Dense, not a 1x1 conv
    # 17 x 15 is no multiple of the total downscale (2): the upsampler resizes to the skip's 17 x 15, as diffusers.
    sample, context = random_inputs(module.config, 17, 15, seed=1)
    timestep = np.array([10, 700])
    ours = jax.jit(module.apply)({"params": params}, sample, timestep, context)
    theirs = torch_unet(sample, timestep, context, model)
    assert ours.shape == sample.shape and np.abs(theirs).max() > 0.5
    assert np.abs(ours - theirs).max() < 1e-4


def test_state_dict_round_trip_and_folders(tiny_sd):
    state = load_file(os.path.join(tiny_sd, "unet", "diffusion_pytorch_model.safetensors"))
    back = unet.params_to_diffusers(unet.diffusers_to_params(state))
    assert back.keys() == state.keys()
    for key, x in state.items():
        assert back[key].dtype == x.dtype and back[key].shape == x.shape, key
        assert_array_equal(back[key], x, err_msg=key)
    _, from_pipeline = unet.load_pretrained(tiny_sd)
    _, from_unet = unet.load_pretrained(os.path.join(tiny_sd, "unet"))
    flat, flat_unet = traverse_util.flatten_dict(from_pipeline), traverse_util.flatten_dict(from_unet)
    assert flat.keys() == flat_unet.keys() and all(np.array_equal(flat[k], flat_unet[k]) for k in flat)
    assert flat[("time_embedding", "linear_1", "kernel")].shape == (32, 128)  # linear_1 is a name, not an index
    assert flat[("down_blocks_0", "attentions_0", "proj_in", "kernel")].shape == (1, 1, 32, 32)  # HWIO


def test_checkpoint_and_config_errors(tiny_sd, tmp_path):
    state = load_file(os.path.join(tiny_sd, "unet", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(tiny_sd, "unet", "config.json")) as f:
        config = json.load(f)
    bad = {k: v for k, v in state.items() if k != "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight"}
    bad["mid_block.resnets.1.time_emb_proj.weight"] = np.zeros((64, 7), np.float32)
    bad["down_blocks.0.resnets.0.extra.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(ValueError) as error:
        unet.from_state(config, bad)
    for expected in ("missing tensor up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight",
                     "unexpected tensor down_blocks.0.resnets.0.extra.weight",
                     "mid_block.resnets.1.time_emb_proj.weight has shape (7, 64), expected (128, 64)"):
        assert expected in str(error.value)
    with pytest.raises(ValueError, match="unexpected tensor 'conv_in.running_mean'"):
        unet.from_state(config, {**state, "conv_in.running_mean": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="class_embed_type"):
        unet.from_state({**config, "class_embed_type": "projection"}, state)
    with pytest.raises(FileNotFoundError):
        unet.load_pretrained(str(tmp_path / "nowhere"))
    module, params = unet.from_state(config, state)
    sample, context = random_inputs(module.config, 8, 8)
    with pytest.raises(ValueError, match=r"sample must be \[B, 4, H, W\]"):
        module.apply({"params": params}, sample.transpose(0, 2, 3, 1), 1, context)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \[2, T, 32\]"):
        module.apply({"params": params}, sample, 1, context[..., :16])


def test_bfloat16_close_to_float32(tiny, tiny_sd):
    model, module, _ = tiny
    bf16, params = unet.load_pretrained(tiny_sd, dtype=jnp.bfloat16)
    assert bf16.config.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    sample, context = random_inputs(module.config, 16, 16)
    ours = jax.jit(bf16.apply)({"params": params}, sample, 500, context)
    theirs = torch_unet(sample, 500, context, model)
    assert ours.dtype == jnp.float32
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per op) in weights and activations through ~40
    # layers; the statistics and softmax are float32. Measured: ~1.5% of the output range.
    error = np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max()
    assert error < 0.05, error
