"""Random Stable Diffusion 1.x pipelines saved in the diffusers layout (tests, tiny configs, benchmarks; needs torch).

`build_pipeline(out_dir, size)` writes what `StableDiffusionPipeline.save_pretrained` writes for a hub model
(model_index.json; unet/, vae/, text_encoder/, tokenizer/, scheduler/ with config.json and safetensors), with the
tensor names of SD 1.5 and SD 1.5's scheduler config, at one of these sizes:

    tiny   UNet (32, 64) with 2 heads, 2 blocks per level; VAE (16, 32) (x2 down); CLIP text 2x32; 32x32 images
    mid    UNet (64, 128, 256, 256) with 8 heads, SD 1.5's block types; VAE (32, 64, 128, 128) (x8); CLIP text
           4x128; 256x256 images (32x32 latents: the deepest level is 4x4; at 2x2 XLA:CPU rewrites its 3x3 convs
           into slow reversed-kernel ones, which SD 1.5's 8x8 never meets)
    sd15   SD 1.5's architecture with random weights (860M UNet); 512x512 images (GPU benchmarks)

`build_ip2p_pipeline(out_dir)` writes a tiny random InstructPix2Pix pipeline (StableDiffusionInstructPix2PixPipeline:
the same, with a UNet of 8 input channels) for diffusion/ip2p.py.
"""
import os

from diffchat_jax.models.ldm import SD15_SCHEDULER

_CROSS_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_CROSS_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
SIZES = {
    "tiny": dict(
        unet=dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32,
                  attention_head_dim=2, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        vae=dict(sample_size=32, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)),
    "mid": dict(
        unet=dict(sample_size=32, block_out_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=128,
                  attention_head_dim=8, norm_num_groups=32, down_block_types=_CROSS_DOWN, up_block_types=_CROSS_UP),
        vae=dict(sample_size=256, block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=32,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)),
    "sd15": dict(
        unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                  cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, down_block_types=_CROSS_DOWN,
                  up_block_types=_CROSS_UP),
        vae=dict(sample_size=512, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)),
}


def build_pipeline(out_dir: str, size: str = "tiny", seed: int = 0) -> str:
    """Writes a random SD 1.x pipeline of `size` (see SIZES) to out_dir in the diffusers layout; returns out_dir.

    The tokenizer is the byte-level tiny CLIP tokenizer (no merges: real SD uses openai/clip-vit-large-patch14's),
    so any size builds offline; its vocabulary (514) sets the text encoder's.
    """
    import diffusers

    parts = _components(size, seed, unet_in_channels=4)
    pipe = diffusers.StableDiffusionPipeline(**parts, scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHEDULER),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    return _save(pipe, out_dir)


def build_ip2p_pipeline(out_dir: str, seed: int = 0) -> str:
    """Writes a random InstructPix2Pix pipeline (StableDiffusionInstructPix2PixPipeline) at the "tiny" size to
    out_dir in the diffusers layout; returns out_dir. As build_pipeline's, but its UNet takes 8 input channels (the
    noisy latents and the source image's latents) and the scheduler is timbrooks/instruct-pix2pix's
    (Euler-ancestral, SD 1.5's schedule)."""
    import diffusers

    parts = _components("tiny", seed, unet_in_channels=8)
    scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(SD15_SCHEDULER)
    pipe = diffusers.StableDiffusionInstructPix2PixPipeline(**parts, scheduler=scheduler, safety_checker=None,
                                                            feature_extractor=None, requires_safety_checker=False)
    return _save(pipe, out_dir)


def _components(size: str, seed: int, unet_in_channels: int) -> dict:
    """Random {vae, text_encoder, tokenizer, unet} of `size` (torch seeded with `seed`)."""
    import diffusers
    import torch
    import transformers

    from diffchat_jax.rewards.image import tiny_clip_tokenizer
    if size not in SIZES:
        raise ValueError(f"unknown pipeline size {size!r}; known: {sorted(SIZES)}")
    spec = SIZES[size]
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(in_channels=unet_in_channels, out_channels=4, **spec["unet"])
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **spec["vae"])
    text_config = transformers.CLIPTextConfig(vocab_size=514, max_position_embeddings=77, hidden_act="quick_gelu",
                                              bos_token_id=512, eos_token_id=513, pad_token_id=513, **spec["text"])
    text_encoder = transformers.CLIPTextModel(text_config)
    tokenizer = tiny_clip_tokenizer()
    tokenizer.model_max_length = 77
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet)


def _save(pipe, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
