"""diffchat_jax/eval/metrics.py on the tiny scorer checkpoints: every row's value is the mean over its images of
the scorer called directly, whatever the chunking; identity (same prompt, same images) has directional CLIP 0."""
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from diffchat_jax.errors import ConfigError
from diffchat_jax.eval import metrics as metrics_lib
from diffchat_jax.models import clip
from diffchat_jax.rewards import scorers
from diffchat_jax.utils import mesh as mesh_lib


@pytest.mark.slow
def test_rows_are_means_of_direct_scores(tiny_model_paths):
    paths = {"clip_model": tiny_model_paths["clip"], "mlp_weights": tiny_model_paths["mlp_weights"],
             "pickscore_model": tiny_model_paths["pickscore"], "hps_weights": tiny_model_paths["hps"],
             "hps_config": tiny_model_paths["pickscore"]}
    scorer = metrics_lib.ImageMetrics.load(paths, metrics_lib.IMAGE_METRICS, batch_size=4,
                                           mesh=mesh_lib.make_mesh())
    rng = np.random.default_rng(0)
    raw, target = (rng.integers(0, 256, (3, 2, 32, 32, 3), dtype=np.uint8) for _ in range(2))
    x = ["a castle", "a cat", "a dog"]
    y = ["a snowy castle, winter", "a cat in a hat", "a dog"]
    got = scorer(raw, target, x, y)

    def direct(model_path, hps=False):
        module, params = clip.load_openclip(paths["hps_weights"], model_path) if hps else clip.load_pretrained(
            model_path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
        return module, params, lambda texts: clip.tokenize(tokenizer, texts, module.config.text.max_position_embeddings)

    cm, cp, ctok = direct(paths["clip_model"])
    pm, pp, ptok = direct(paths["pickscore_model"])
    hm, hp, htok = direct(paths["hps_config"], hps=True)
    mlp = scorers.load_aesthetic_mlp(paths["mlp_weights"], in_features=cm.config.projection_dim)
    expected = {name: np.zeros(3) for name in metrics_lib.IMAGE_METRICS}
    for r in range(3):
        for n in range(2):
            img, img0 = jnp.asarray(target[r, n][None]), jnp.asarray(raw[r, n][None])
            expected["aesthetic"][r] += float(scorers.aesthetic_score(cm, cp, mlp, img)[0]) / 2
            expected["clip_score"][r] += float(scorers.clip_score(cm, cp, img, *ctok([y[r]]))[0]) / 2
            expected["pickscore"][r] += float(scorers.pick_score(pm, pp, img, *ptok([y[r]]))[0]) / 2
            expected["hps"][r] += float(scorers.hps_score(hm, hp, img, *htok([y[r]]))[0]) / 2
            expected["directional_clip"][r] += float(scorers.directional_clip(
                cm, cp, img0, img, *ctok([x[r]]), *ctok([y[r]]))[0]) / 2
    for name in metrics_lib.IMAGE_METRICS:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-4, err_msg=name)
    assert np.abs(got["directional_clip"]).max() > 0  # the rows did move

    same = scorer(raw, raw, x, x, target_prompts=x)
    assert np.all(same["directional_clip"] == 0.0)  # identity: no change of prompt or image


def test_missing_checkpoint_names_the_field():
    with pytest.raises(ConfigError, match="config.eval.scorers.hps_weights is empty"):
        metrics_lib.ImageMetrics.load({"hps_weights": "", "hps_config": "x"}, ["hps"])
    with pytest.raises(ConfigError, match=r"config.eval.metrics: \['ssim'\] are not image metrics"):
        metrics_lib.ImageMetrics.load({}, ["ssim"])
