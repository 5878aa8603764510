"""Scorers and the image reward components on tiny random checkpoints: the aesthetic MLP vs its torch layout,
each score's formula by hand on reference (PyTorch) embeddings, a RewardBatch end to end."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pickle
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from numpy.testing import assert_allclose, assert_array_equal
from safetensors.numpy import save_file

from diffchat_jax.models import clip
from diffchat_jax.rewards import base, image, scorers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def published_mlp(input_size=768) -> torch.nn.Module:
    """The LAION predictor's module layout (improved-aesthetic-predictor's MLP: `self.layers = nn.Sequential`)."""
    model = torch.nn.Module()
    model.layers = torch.nn.Sequential(
        torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return image.build_tiny_models(str(tmp_path_factory.mktemp("scorers")))


def reward_config(tiny, batch_size=4, dtype="float32"):
    c = ml_collections.ConfigDict()
    c.reward = ml_collections.ConfigDict()
    c.reward.aesthetic = dict(clip_model=tiny["clip"], mlp_weights=tiny["mlp_weights"], dtype=dtype,
                              batch_size=batch_size)
    c.reward.pickscore = dict(model=tiny["pickscore"], processor="", dtype=dtype, batch_size=batch_size)
    return c


def random_images(seed, n, height=40, width=50):
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Evil:
    """A pickled object that is not a tensor: weights_only loading must refuse it."""


def test_aesthetic_mlp_matches_published_torch_layout(tmp_path):
    torch.manual_seed(0)
    model = published_mlp()
    path = str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    torch.save(model.state_dict(), path)
    x = unit(np.random.default_rng(0).normal(size=(5, 768))).astype(np.float32)
    with torch.no_grad():
        theirs = model.layers(torch.from_numpy(x)).numpy()
    for weights in (path, str(tmp_path / "mlp.safetensors")):
        if weights.endswith(".safetensors"):
            save_file({k: v.numpy() for k, v in model.state_dict().items()}, weights)
        ours = scorers.AestheticMLP().apply({"params": scorers.load_aesthetic_mlp(weights)}, x)
        assert_allclose(ours, theirs, atol=1e-5, rtol=0)

    del model.layers[7]
    torch.save(model.state_dict(), tmp_path / "short.pth")
    with pytest.raises(ValueError, match="not a LAION aesthetic MLP"):
        scorers.load_aesthetic_mlp(str(tmp_path / "short.pth"))
    torch.save({"layers.0.weight": torch.zeros(2), "payload": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        scorers.load_aesthetic_mlp(str(tmp_path / "evil.pth"))
    with pytest.raises(FileNotFoundError):
        scorers.load_aesthetic_mlp(str(tmp_path / "missing.pth"))


def test_cosine_by_hand():
    a = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    b = np.array([[4.0, 3.0], [-2.0, 0.0], [1.0, 1.0]])
    assert_allclose(scorers.cosine(a, b), [24 / 25, -1.0, 0.0], atol=1e-7)


def torch_embeds(model, pixels, ids, mask):
    """Reference L2-normalised (image, text) embeddings of a transformers CLIPModel."""
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=torch.from_numpy(np.array(pixels))).pooler_output
        text_features = model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                                attention_mask=torch.from_numpy(mask)).pooler_output
    return unit(image_features.numpy()), unit(text_features.numpy())


def test_scores_match_formulas_by_hand(tiny):
    tokenizer = image.tiny_clip_tokenizer()
    prompts = ["a red cat", "a blue house by the sea", "", "portrait of an old man, oil on canvas",
               "a bowl of fruit", "city at night", "a dog", "mountains"]
    edited = ["a red cat wearing a hat", "a blue house by the lake", "a tree", "portrait of an old woman",
              "a bowl of apples", "city at dawn", "a dog running", "mountains"]  # the last prompt unchanged
    ids, mask = clip.tokenize(tokenizer, prompts)
    ids1, mask1 = clip.tokenize(tokenizer, edited)
    images0, images1 = random_images(0, 8), random_images(1, 8)
    images1[6] = images0[6]  # an unchanged image

    # Same pixels on both sides: this checks the formulas, test_clip.py checks preprocessing.
    preprocess = jax.jit(clip.preprocess, static_argnums=1)
    module, params = clip.load_pretrained(tiny["clip"])
    hf = transformers.CLIPModel.from_pretrained(tiny["clip"]).eval()
    size = module.config.vision.image_size
    img0, txt0 = torch_embeds(hf, preprocess(images0, size), ids, mask)
    img1, txt1 = torch_embeds(hf, preprocess(images1, size), ids1, mask1)
    cos = np.sum(img0 * txt0, axis=-1)
    assert (cos < 0).any() and (cos > 0).any()  # the clamp is exercised
    assert_allclose(scorers.clip_score(module, params, images0, ids, mask), 100 * np.maximum(cos, 0), atol=1e-3)
    d_img, d_txt = img1[:6] - img0[:6], txt1[:6] - txt0[:6]
    expected = 100 * np.sum(d_img * d_txt, -1) / np.linalg.norm(d_img, axis=-1) / np.linalg.norm(d_txt, axis=-1)
    directional = np.asarray(scorers.directional_clip(module, params, images0, images1, ids, mask, ids1, mask1))
    assert_allclose(directional[:6], expected, atol=1e-3)
    assert_array_equal(directional[6:], [0.0, 0.0])  # no change: 0, not the direction of float noise

    mlp = published_mlp(input_size=16)
    mlp.load_state_dict(torch.load(tiny["mlp_weights"], weights_only=True))
    with torch.no_grad():
        expected = mlp.layers(torch.from_numpy(img0)).numpy()[:, 0]
    mlp_params = scorers.load_aesthetic_mlp(tiny["mlp_weights"])
    assert_allclose(scorers.aesthetic_score(module, params, mlp_params, images0), expected, atol=1e-5)

    module, params = clip.load_pretrained(tiny["pickscore"])
    hf = transformers.CLIPModel.from_pretrained(tiny["pickscore"]).eval()
    img, txt = torch_embeds(hf, preprocess(images0, module.config.vision.image_size), ids, mask)
    logit_scale = hf.logit_scale.item()
    assert_allclose(logit_scale, np.log(100.0), rtol=1e-6)
    assert_allclose(scorers.pick_score(module, params, images0, ids, mask),
                    np.exp(logit_scale) * np.sum(img * txt, -1), atol=1e-3)

    # HPS: the open_clip-layout checkpoint, architecture from the pickscore config; reference = the same tensors
    # in a transformers CLIPModel.
    module, params = clip.load_openclip(tiny["hps"], tiny["pickscore"])
    state = {k: v.numpy() for k, v in torch.load(tiny["hps"], weights_only=True)["state_dict"].items()}
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in clip.openclip_to_hf(state, module.config).items()})
    img, txt = torch_embeds(hf, preprocess(images0, module.config.vision.image_size), ids, mask)
    assert_allclose(scorers.hps_score(module, params, images0, ids, mask), 100 * np.sum(img * txt, -1), atol=1e-3)


def reference_component_scores(tiny, images, responses):
    """The PyTorch pipeline per image (CLIPProcessor from the saved folders, transformers CLIPModel, the torch
    MLP), then the mean over each response's N images -> {"aesthetic": [B], "pickscore": [B]}."""
    batch, n = images.shape[:2]
    flat = list(images.reshape(-1, *images.shape[2:]))
    prompts = [r for r in responses for _ in range(n)]
    out = {}
    for name, folder in (("aesthetic", tiny["clip"]), ("pickscore", tiny["pickscore"])):
        processor = transformers.CLIPProcessor.from_pretrained(folder)
        model = transformers.CLIPModel.from_pretrained(folder).eval()
        enc = processor(text=prompts, images=flat, padding="max_length", truncation=True, max_length=77,
                        return_tensors="np")
        img, txt = torch_embeds(model, enc["pixel_values"], enc["input_ids"], enc["attention_mask"])
        if name == "aesthetic":
            mlp = published_mlp(input_size=16)
            mlp.load_state_dict(torch.load(tiny["mlp_weights"], weights_only=True))
            with torch.no_grad():
                scores = mlp.layers(torch.from_numpy(img)).numpy()[:, 0]
        else:
            scores = model.logit_scale.exp().item() * np.sum(img * txt, -1)
        out[name] = scores.reshape(batch, n).mean(axis=1)
    return out


def reward_batch(images, responses):
    n = len(responses)
    return base.RewardBatch(x_o=["x"] * n, i=["i"] * n, y_o=[None] * n, x=["x"] * n, responses=responses,
                            images=images)


@pytest.mark.slow
def test_components_score_a_reward_batch_end_to_end(tiny):
    assert {"aesthetic", "pickscore"} <= set(base.registered())
    responses = ["a red cat on a sofa", "", "a castle on a hill " * 30]  # empty and over-long prompts
    images = np.stack([random_images(seed, 2) for seed in range(3)])  # [B=3, N=2, 40, 50, 3]
    reference = reference_component_scores(tiny, images, responses)
    for name in ("aesthetic", "pickscore"):
        component = base.make_component(name, reward_config(tiny))
        assert component.name == name and component.needs_images
        scores = component.score(reward_batch(images, responses))
        assert scores.shape == (3,) and scores.dtype == np.float32
        # Preprocessing differs from PIL by at most one uint8 level (test_clip.py); the rest is float error.
        assert_allclose(scores, reference[name], rtol=1e-3, atol=1e-3, err_msg=name)
        # Chunks of 4 images (the last padded) vs one chunk: the same numbers.
        whole = base.make_component(name, reward_config(tiny, batch_size=64)).score(reward_batch(images, responses))
        assert_allclose(scores, whole, rtol=1e-6, atol=1e-6)

    bf16 = base.make_component("aesthetic", reward_config(tiny, dtype="bfloat16"))
    assert_allclose(bf16.score(reward_batch(images, responses)), reference["aesthetic"], rtol=0.05)


def test_components_reject_bad_batches(tiny):
    component = base.make_component("pickscore", reward_config(tiny))
    with pytest.raises(ValueError, match="batch.images is None"):
        component.score(reward_batch(None, ["a", "b"]))
    with pytest.raises(ValueError, match=r"\[B=2, N, H, W, 3\]"):
        component.score(reward_batch(random_images(0, 2), ["a", "b"]))  # N axis missing
    with pytest.raises(ValueError, match="uint8"):
        component.score(reward_batch(random_images(0, 2)[:, None].astype(np.int32), ["a", "b"]))


MULTI_DEVICE_SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from test_scorers import reward_batch, reward_config, random_images
from diffchat_jax.rewards import base
assert jax.local_device_count() == 8, jax.devices()
tiny = json.loads(sys.argv[1])
images = np.stack([random_images(seed, 2) for seed in range(3)])
batch = reward_batch(images, ["a red cat on a sofa", "", "a dog"])
print(json.dumps({name: base.make_component(name, reward_config(tiny, batch_size=8)).score(batch).tolist()
                  for name in ("aesthetic", "pickscore")}))
"""


@pytest.mark.slow
def test_components_on_8_devices_match_1_device(tiny):
    import json
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT, json.dumps(tiny)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    eight = json.loads(proc.stdout.strip().splitlines()[-1])
    images = np.stack([random_images(seed, 2) for seed in range(3)])
    batch = reward_batch(images, ["a red cat on a sofa", "", "a dog"])
    for name in ("aesthetic", "pickscore"):
        one = base.make_component(name, reward_config(tiny, batch_size=8)).score(batch)
        assert_allclose(eight[name], one, rtol=1e-5, atol=1e-5)
