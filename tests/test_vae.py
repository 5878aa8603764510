"""Flax AutoencoderKL vs diffusers' on the tiny SD pipeline's VAE and on other tiny configs built here (3 levels,
no quant convs, no mid attention); the state-dict converter; loading from pipeline and vae/ folders; errors; bf16."""
import copy
import functools
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from numpy.testing import assert_allclose
from safetensors.numpy import load_file, save_file

from diffchat_jax.models import vae

# Architectures beyond the tiny pipeline's (16, 32) x 1 layer: more levels and layers, a level without a channel
# change (no conv_shortcut), 3 latent channels, and each optional part turned off once.
EXTRA_CONFIGS = {
    "3-levels-no-quant-conv": dict(block_out_channels=(8, 16, 16), layers_per_block=2, latent_channels=3,
                                   use_quant_conv=False),
    "no-mid-attention-no-post-quant-conv": dict(block_out_channels=(8, 16), mid_block_add_attention=False,
                                                use_post_quant_conv=False),
}


@functools.partial(jax.jit, static_argnames=("module", "method"))
def run(module, params, x, method):
    return module.apply({"params": params}, x, method=method)


def random_inputs(config: vae.VAEConfig, seed=0):
    """(latents [2, C, 8, 6], images [2, 3, 8f, 6f] in [-1, 1]): non-square to catch a height/width mix-up."""
    rng, f = np.random.default_rng(seed), vae.latent_downscale(config)
    latents = rng.normal(size=(2, config.latent_channels, 8, 6)).astype(np.float32)
    images = rng.uniform(-1, 1, size=(2, config.in_channels, 8 * f, 6 * f)).astype(np.float32)
    return latents, images


def torch_outputs(model, latents, images):
    """{decode, mean, logvar} of the diffusers model."""
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(images)).latent_dist
        decoded = model.decode(torch.from_numpy(latents)).sample
    return {"decode": decoded.numpy(), "mean": dist.mean.numpy(), "logvar": dist.logvar.numpy()}


def flax_outputs(module, params, latents, images):
    mean, logvar = run(module, params, images, "encode")
    return {"decode": run(module, params, latents, "decode"), "mean": mean, "logvar": logvar}


def assert_matches_torch(model, module, params, seed=0):
    latents, images = random_inputs(module.config, seed)
    ours, theirs = flax_outputs(module, params, latents, images), torch_outputs(model, latents, images)
    for name in theirs:
        assert ours[name].dtype == jnp.float32 and ours[name].shape == theirs[name].shape, name
        assert np.abs(theirs[name]).max() > 0.1, name  # not a degenerate model
        assert_allclose(ours[name], theirs[name], atol=1e-4, rtol=0, err_msg=name)


def assert_same_params(a, b):
    a, b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny(tiny_sd):
    """(torch AutoencoderKL, flax module, params) of the tiny pipeline's vae/."""
    model = diffusers.AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae").eval()
    return model, *vae.load_pretrained(os.path.join(tiny_sd, "vae"))


@pytest.fixture(scope="module", params=sorted(EXTRA_CONFIGS))
def extra(request, tmp_path_factory):
    """(torch AutoencoderKL, folder written by save_pretrained) of an EXTRA_CONFIGS architecture."""
    sizes = EXTRA_CONFIGS[request.param]
    levels = len(sizes["block_out_channels"])
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * levels,
                                    up_block_types=("UpDecoderBlock2D",) * levels, **sizes)
    # diffusers inits GroupNorms to (1, 0), which would hide a scale/bias mix-up; convs and linears are random.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(float(name.endswith("weight")) + 0.3 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(request.param)
    model.eval().save_pretrained(folder)
    return model, str(folder)


def test_tiny_pipeline_vae_matches_diffusers(tiny):
    assert_matches_torch(*tiny)


def test_other_architectures_match_diffusers(extra):
    model, folder = extra
    module, params = vae.load_pretrained(folder)
    assert ("quant_conv" in params) == module.config.use_quant_conv
    assert ("post_quant_conv" in params) == module.config.use_post_quant_conv
    assert ("attentions_0" in params["decoder"]["mid_block"]) == module.config.mid_block_add_attention
    assert_matches_torch(model, module, params)


def test_init_and_call(tiny):
    _, module, params = tiny
    # An rbg key: the same tree, and XLA compiles the initialisers 4x faster on CPU than with threefry.
    fresh = vae.init_params(module.config, jax.random.key(0, impl="rbg"))
    assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, params)
    _, images = random_inputs(module.config)
    reconstruction = jax.jit(module.apply)({"params": fresh}, images)  # __call__: decode(encode(images).mean)
    assert reconstruction.shape == images.shape and np.isfinite(reconstruction).all()


def test_logvar_is_clipped_like_diffusers(tiny):
    model, module, params = tiny
    latent = module.config.latent_channels
    model = copy.deepcopy(model)
    # Push half the logvar channels far above 20, the other half far below -30.
    push = np.where(np.arange(latent) < latent // 2, 100.0, -100.0).astype(np.float32)
    with torch.no_grad():
        model.quant_conv.bias[latent:] += torch.from_numpy(push)
    params = {**params, "quant_conv": {**params["quant_conv"],
                                       "bias": params["quant_conv"]["bias"].at[latent:].add(push)}}
    _, images = random_inputs(module.config)
    _, logvar = run(module, params, images, "encode")
    theirs = torch_outputs(model, *random_inputs(module.config))["logvar"]
    assert_allclose(logvar, theirs, atol=1e-4, rtol=0)
    assert np.all(logvar[:, :latent // 2] == 20.0) and np.all(logvar[:, latent // 2:] == -30.0)


def test_converter_round_trip_and_legacy_attention_names(tiny):
    model, _, params = tiny
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    back = vae.params_to_diffusers(vae.diffusers_to_params(state))
    assert back.keys() == state.keys() and all(np.array_equal(back[k], state[k]) for k in state)
    assert_same_params(vae.diffusers_to_params(vae.params_to_diffusers(params)), params)
    # Checkpoints saved before diffusers 0.14 name the mid-block attention query/key/value/proj_attn.
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, x in state.items():
        for new, old in legacy_names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[key] = x
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert_same_params(vae.diffusers_to_params(legacy), vae.diffusers_to_params(state))


def test_pipeline_folder_and_vae_folder_load_the_same(tiny_sd, tiny):
    _, module, params = tiny
    pipe_module, pipe_params = vae.load_pretrained(tiny_sd)
    assert pipe_module.config == module.config
    assert_same_params(pipe_params, params)


def test_config_from_diffusers(tiny):
    _, module, _ = tiny
    assert module.config.scaling_factor == 0.18215 and module.config.shift_factor is None
    assert vae.latent_downscale(module.config) == 2
    # runwayml/stable-diffusion-v1-5's vae/config.json (the keys that matter).
    sd15 = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "out_channels": 3, "sample_size": 512}
    config = vae.VAEConfig.from_diffusers(sd15)
    assert config.block_out_channels == (128, 256, 512, 512) and config.layers_per_block == 2
    assert config.scaling_factor == 0.18215 and config.use_quant_conv and vae.latent_downscale(config) == 8
    shifted = vae.VAEConfig.from_diffusers({**sd15, "scaling_factor": 1.5305, "shift_factor": 0.0609})
    assert (shifted.scaling_factor, shifted.shift_factor) == (1.5305, 0.0609)
    unsupported = [("_class_name", "AutoencoderTiny"), ("act_fn", "gelu"),
                   ("down_block_types", ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]),
                   ("up_block_types", ["UpDecoderBlock2D"] * 3)]
    for key, value in unsupported:
        with pytest.raises(ValueError, match=key):
            vae.VAEConfig.from_diffusers({**sd15, key: value})


def test_load_errors_name_the_tensor(tiny_sd, tmp_path):
    folder = os.path.join(tiny_sd, "vae")
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    del state["decoder.conv_out.bias"]
    state["encoder.mid_block.attentions.0.to_q.weight"] = np.zeros((3, 32), np.float32)
    state["encoder.extra.weight"] = np.zeros((1,), np.float32)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"missing tensor decoder\.conv_out\.bias.*unexpected tensor encoder\.extra"
                                         r"\.weight.*encoder\.mid_block\.attentions\.0\.to_q\.weight has shape"):
        vae.load_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="unexpected tensor 'encoder.mid_block.resnets.0.norm1.running_mean'"):
        vae.diffusers_to_params({"encoder.mid_block.resnets.0.norm1.running_mean": np.zeros(3)})
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    with pytest.raises(ValueError, match="up_block_types"):
        vae.from_state({**config, "up_block_types": ["UpDecoderBlock2D"]}, state)
    with pytest.raises(FileNotFoundError):
        vae.load_pretrained(str(tmp_path / "nowhere"))


def test_wrong_input_layout_is_rejected(tiny):
    _, module, params = tiny
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        module.apply({"params": params}, np.zeros((1, 32, 32, 3), np.float32), method=module.encode)
    with pytest.raises(ValueError, match=r"latents must be \[B, 4, H, W\]"):
        module.apply({"params": params}, np.zeros((1, 16, 16, 4), np.float32), method=module.decode)


def test_bf16_stays_close_to_fp32(tiny_sd, tiny):
    _, module, params = tiny
    latents, images = random_inputs(module.config)
    reference = flax_outputs(module, params, latents, images)
    # bf16 params and compute, and float32 params with bf16 compute.
    for dtype, compute_dtype in [(jnp.bfloat16, None), (jnp.float32, jnp.bfloat16)]:
        bf16_module, bf16_params = vae.load_pretrained(tiny_sd, dtype=dtype, compute_dtype=compute_dtype)
        assert bf16_module.config.dtype == jnp.bfloat16
        assert all(x.dtype == dtype for x in jax.tree.leaves(bf16_params))
        ours = flax_outputs(bf16_module, bf16_params, latents, images)
        for name, ref in reference.items():
            diff = np.abs(np.asarray(ours[name]) - np.asarray(ref)).max()
            assert ours[name].dtype == jnp.float32, name
            # bf16 keeps 8 bits of mantissa (0.4% per rounding); after ~20 layers, allow 3% of the output range.
            assert 0 < diff < 0.03 * np.abs(ref).max(), (name, dtype, diff)
