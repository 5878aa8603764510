"""Image scorer throughput: our jitted scorers vs the same computation with transformers' PyTorch CLIPModel.

Both sides get the same random weights (a transformers CLIPModel saved and loaded into Flax), the same uint8
images and token ids, and run the whole scorer: ours jitted with preprocessing on device (inputs already on the
device, as the renderer leaves them), PyTorch as the reference pipelines do it (CLIPImageProcessor, whose PIL
backend is what runs without torchvision, then the model). Prints images/s per scorer, the ratio ours / PyTorch,
and apart: PyTorch's model-only images/s (pixels given) and our compile time; the first row times the
preprocessing alone (ours vs the image processor). torch runs with the fastest of the --threads counts.
aesthetic, CLIP score and directional CLIP run on the ViT-L/14-shaped model, PickScore and HPS on the
ViT-H/14-shaped one (HPS is the same computation as PickScore); directional CLIP embeds two images and two
prompts per pair.

  python -m bench.scorers                                           # tiny models, CPU
  python -m bench.scorers --models=real --batch=32 --dtype=bfloat16  # ViT-L/14 and ViT-H/14 shapes, GPU
"""
import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from bench.timing import timed, torch_rate
from diffchat_jax.models import clip
from diffchat_jax.rewards import scorers

# (text layers, width, heads), (vision layers, width, heads, patch), activation, projection.
SHAPES = {
    "tiny-l": ((2, 64, 4), (2, 64, 4, 32), "quick_gelu", 64),
    "tiny-h": ((2, 64, 4), (2, 96, 4, 32), "gelu", 64),
    "vit-l-14": ((12, 768, 12), (24, 1024, 16, 14), "quick_gelu", 768),  # openai/clip-vit-large-patch14
    "vit-h-14": ((24, 1024, 16), (32, 1280, 16, 14), "gelu", 1024),  # laion CLIP-H: PickScore, HPS v2
}
MODELS = {"tiny": ("tiny-l", "tiny-h"), "real": ("vit-l-14", "vit-h-14")}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny", choices=sorted(MODELS), help="tiny shapes or the real sizes")
    p.add_argument("--batch", type=int, default=16, help="images per call")
    p.add_argument("--image-size", type=int, default=512, help="input images are square uint8 (SD 1.5: 512)")
    p.add_argument("--steps", type=int, default=5, help="timed calls per side (after warm-up)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype, both sides")
    p.add_argument("--threads", default=f"1,{os.cpu_count()}",
                   help="torch intra-op thread counts to try; the fastest is reported (XLA uses all cores)")
    return p.parse_args()


def hf_model(shape: str) -> transformers.CLIPModel:
    (t_layers, t_width, t_heads), (v_layers, v_width, v_heads, patch), act, projection = SHAPES[shape]
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(num_hidden_layers=t_layers, hidden_size=t_width, num_attention_heads=t_heads,
                         intermediate_size=4 * t_width, hidden_act=act),
        vision_config=dict(num_hidden_layers=v_layers, hidden_size=v_width, num_attention_heads=v_heads,
                           intermediate_size=4 * v_width, patch_size=patch, image_size=224, hidden_act=act),
        projection_dim=projection)
    return transformers.CLIPModel(config).eval()


def torch_scorers(model, mlp, pixels_of, device, autocast):
    """name -> fn(images, images1, ids, mask, ids1, mask1) -> [B], the PyTorch side; pixels_of(images) gives
    the model's pixel_values (the image processor, or nothing when the images already are pixels)."""
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)

    def embed_image(images):
        with torch.no_grad(), autocast:
            return unit(model.get_image_features(pixel_values=pixels_of(images)).pooler_output.float())

    def embed_text(ids, mask):
        with torch.no_grad(), autocast:
            return unit(model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output.float())

    def aesthetic(images, *_):
        with torch.no_grad():
            return mlp(embed_image(images))[:, 0]

    def cosine(images, _, ids, mask, *__):
        return model.logit_scale.exp() * (embed_image(images) * embed_text(ids, mask)).sum(-1)

    def directional(images, images1, ids, mask, ids1, mask1):
        return torch.nn.functional.cosine_similarity(embed_image(images1) - embed_image(images),
                                                     embed_text(ids1, mask1) - embed_text(ids, mask))

    sync = (lambda x: (torch.cuda.synchronize(), x)[1]) if device.type == "cuda" else (lambda x: x)
    return {name: (lambda f: lambda *a: sync(f(*a)))(f) for name, f in
            (("aesthetic", aesthetic), ("clip_score", cosine), ("directional", directional),
             ("pickscore", cosine), ("hps", cosine))}


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} on {device} "
          f"(threads: best of {args.threads}); batch {args.batch}, {args.image_size}x{args.image_size} uint8 images, "
          f"{args.dtype}")
    print(f"{'scorer':>12} {'model':>9} {'ours img/s':>11} {'torch img/s':>12} {'ratio':>6} "
          f"{'torch model-only':>17} {'compile s':>10}")

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, args.image_size, args.image_size, 3), dtype=np.uint8)
    images1 = images[::-1].copy()
    tokenizer_ids = rng.integers(0, 49406, (args.batch, 77)).astype(np.int32)
    lengths = rng.integers(5, 77, args.batch)
    mask = (np.arange(77)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, tokenizer_ids, 49407)
    ids[np.arange(args.batch), lengths - 1] = 49407  # EOS
    ids[:, 0] = 49406  # BOS
    ids1, mask1 = ids[::-1].copy(), mask[::-1].copy()

    torch.manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Linear(SHAPES[MODELS[args.models][0]][3], 1024), torch.nn.Linear(1024, 128),
                              torch.nn.Linear(128, 64), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()
    mlp_params = {f"layers_{i}": {"kernel": jnp.asarray(layer.weight.detach().numpy().T),
                                  "bias": jnp.asarray(layer.bias.detach().numpy())}
                  for i, layer in zip((0, 2, 4, 6, 7), mlp)}
    for shape, names in zip(MODELS[args.models], (("aesthetic", "clip_score", "directional"), ("pickscore", "hps"))):
        model = hf_model(shape)
        with tempfile.TemporaryDirectory() as path:
            model.save_pretrained(path)
            module, params = clip.load_pretrained(path, dtype=dtype)
        x, x1, i, m, i1, m1 = jax.device_put((images, images1, ids, mask, ids1, mask1))
        ours = {
            "aesthetic": lambda: scorers.aesthetic_score(module, params, mlp_params, x),
            "clip_score": lambda: scorers.clip_score(module, params, x, i, m),
            "directional": lambda: scorers.directional_clip(module, params, x, x1, i, m, i1, m1),
            "pickscore": lambda: scorers.pick_score(module, params, x, i, m),
            "hps": lambda: scorers.hps_score(module, params, x, i, m),
        }
        model, mlp = model.to(device), mlp.to(device)
        processor = transformers.CLIPImageProcessorPil()
        to_pixels = lambda x: processor(images=list(x), return_tensors="pt")["pixel_values"].to(device)
        pipeline = torch_scorers(model, mlp, to_pixels, device, autocast)
        model_only = torch_scorers(model, mlp, lambda pixels: pixels, device, autocast)
        tokens = [torch.from_numpy(x).long().to(device) for x in (ids, mask, ids1, mask1)]
        pixels = [to_pixels(images), to_pixels(images1)]
        rate = lambda fn: max(torch_rate(fn, args.steps, n) for n in map(int, args.threads.split(",")))
        if shape == MODELS[args.models][0]:
            preprocess = jax.jit(clip.preprocess, static_argnums=1)
            ours_rate, compile_s = timed(lambda: preprocess(x, module.config.vision.image_size), args.steps)
            theirs_rate = rate(lambda: to_pixels(images))
            print(f"{'preprocess':>12} {'-':>9} {ours_rate * args.batch:>11.4g} {theirs_rate * args.batch:>12.4g} "
                  f"{ours_rate / theirs_rate:>6.2f} {'-':>17} {compile_s:>10.1f}")
        for name in names:
            ours_rate, compile_s = timed(ours[name], args.steps)
            theirs_rate = rate(lambda: pipeline[name](images, images1, *tokens))
            model_rate = rate(lambda: model_only[name](*pixels, *tokens))
            ours_ips, theirs_ips = ours_rate * args.batch, theirs_rate * args.batch
            print(f"{name:>12} {shape:>9} {ours_ips:>11.4g} {theirs_ips:>12.4g} {ours_ips / theirs_ips:>6.2f} "
                  f"{model_rate * args.batch:>17.4g} {compile_s:>10.1f}")
        model.cpu()


if __name__ == "__main__":
    main()
