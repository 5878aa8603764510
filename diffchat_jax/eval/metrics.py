"""The image metrics of the evaluation (paper section 4.1), per test row, from rendered images and prompts.

    scorer = ImageMetrics.load(paths, metrics=("pickscore", "aesthetic", "hps", "clip_score", "directional_clip"))
    scores = scorer(raw_images, target_images, raw_prompts, score_texts)   # metric -> [R] float64

raw_images, target_images: [R, N, H, W, 3] uint8, the N images of each row rendered from its input prompt x and
from a system's target prompt with the same seeds. A row's value is the mean over its N images of:
  pickscore         PickScore(target image, score text)
  aesthetic         the LAION aesthetic predictor on the target image
  hps               100 cos(target image, score text) with HPS weights
  clip_score        100 max(cos(target image, score text), 0) with CLIP ViT-L/14
  directional_clip  100 cos(e_img(target) - e_img(raw), e_txt(target prompt) - e_txt(x)), 0 where nothing moved
The score text is each system's target prompt or the row's reference y (`eval.score_text`); directional CLIP
always compares x with the target prompt itself. CI is text-only: eval/systems.ci_scores.

`paths` (the `eval.scorers` config section): clip_model (a transformers CLIP for aesthetic, clip_score and
directional_clip), mlp_weights (the aesthetic MLP), pickscore_model (+ pickscore_processor, its tokenizer; "" = the
model's folder), hps_weights (an open_clip checkpoint) and hps_config (the transformers config of its
architecture). Only the models the requested metrics need are loaded. Jitted calls run on chunks of `batch_size`
images split over `mesh` (default: this host's devices).
"""
import dataclasses
from typing import Mapping, Sequence

import jax
import numpy as np
import transformers

from diffchat_jax.errors import ConfigError
from diffchat_jax.models import clip
from diffchat_jax.rewards import scorers
from diffchat_jax.utils.mesh import make_mesh, map_in_chunks, replicate

IMAGE_METRICS = ("pickscore", "aesthetic", "hps", "clip_score", "directional_clip")
NEEDS = {"pickscore": "pickscore", "aesthetic": "clip", "hps": "hps", "clip_score": "clip",
         "directional_clip": "clip"}  # metric -> the model it runs on


@dataclasses.dataclass
class _Model:
    module: clip.CLIP
    params: object
    tokenizer: object
    text_length: int


@dataclasses.dataclass
class ImageMetrics:
    metrics: tuple[str, ...]
    models: dict[str, _Model]
    mlp: object
    batch_size: int
    mesh: object

    @classmethod
    def load(cls, paths: Mapping[str, str], metrics: Sequence[str], batch_size: int = 16, mesh=None):
        unknown = [m for m in metrics if m not in IMAGE_METRICS]
        if unknown:
            raise ConfigError(f"config.eval.metrics: {unknown} are not image metrics; use {list(IMAGE_METRICS)} "
                              f"(and ci)")
        mesh = mesh or make_mesh(jax.local_devices())
        needed = {NEEDS[m] for m in metrics}
        models, mlp = {}, None

        def field(name: str) -> str:
            if not paths.get(name):
                raise ConfigError(f"config.eval.scorers.{name} is empty but the metrics {list(metrics)} need it")
            return paths[name]

        def add(key: str, module, params, tokenizer_source: str):
            tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_source)
            models[key] = _Model(module, replicate(params, mesh), tokenizer,
                                 module.config.text.max_position_embeddings)

        if "clip" in needed:
            module, params = clip.load_pretrained(field("clip_model"))
            add("clip", module, params, paths["clip_model"])
            if "aesthetic" in metrics:
                mlp = replicate(scorers.load_aesthetic_mlp(field("mlp_weights"),
                                                           in_features=module.config.projection_dim), mesh)
        if "pickscore" in needed:
            module, params = clip.load_pretrained(field("pickscore_model"))
            add("pickscore", module, params, paths.get("pickscore_processor") or paths["pickscore_model"])
        if "hps" in needed:
            module, params = clip.load_openclip(field("hps_weights"), field("hps_config"))
            add("hps", module, params, paths["hps_config"])
        return cls(tuple(metrics), models, mlp, batch_size, mesh)

    def _tokens(self, key: str, texts: Sequence[str]):
        model = self.models[key]
        return clip.tokenize(model.tokenizer, list(texts), model.text_length)

    def __call__(self, raw_images: np.ndarray, target_images: np.ndarray, raw_prompts: Sequence[str],
                 score_texts: Sequence[str], target_prompts: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """metric -> [R] float64 (see the module docstring); target_prompts default to score_texts."""
        rows, n = target_images.shape[:2]
        if raw_images.shape != target_images.shape or len(raw_prompts) != rows or len(score_texts) != rows:
            raise ValueError(f"raw {raw_images.shape} and target {target_images.shape} images must match, with "
                             f"{rows} prompts of each")
        target_prompts = score_texts if target_prompts is None else target_prompts
        flat = lambda images: images.reshape(rows * n, *images.shape[2:])
        per_image = lambda rows_array: np.repeat(rows_array, n, axis=0)
        out = {}
        for metric in self.metrics:
            model = self.models[NEEDS[metric]]
            m, p = model.module, model.params
            if metric == "aesthetic":
                fn, arrays = (lambda im: scorers.aesthetic_score(m, p, self.mlp, im)), [flat(target_images)]
            elif metric == "directional_clip":
                ids0, mask0 = self._tokens("clip", raw_prompts)
                ids1, mask1 = self._tokens("clip", target_prompts)
                fn = lambda im0, im1, a, b, c, d: scorers.directional_clip(m, p, im0, im1, a, b, c, d)
                arrays = [flat(raw_images), flat(target_images), *map(per_image, (ids0, mask0, ids1, mask1))]
            else:
                ids, mask = self._tokens(NEEDS[metric], score_texts)
                score = {"pickscore": scorers.pick_score, "hps": scorers.hps_score,
                         "clip_score": scorers.clip_score}[metric]
                fn = lambda im, a, b, score=score: score(m, p, im, a, b)
                arrays = [flat(target_images), per_image(ids), per_image(mask)]
            values = map_in_chunks(fn, arrays, self.batch_size, self.mesh).astype(np.float64)
            out[metric] = values.reshape(rows, n).mean(axis=1)
        return out
