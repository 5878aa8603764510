"""The evaluation job (mode `eval`, configs/eval.py): systems x SD models x metrics -> the paper's tables.

    python -m diffchat_jax.main --config=configs/eval.py[:tiny] --workdir=DIR

Stages, each resumable (what is on disk and still matches is kept, so a rerun after an interruption computes only
what is missing and ends with the same files):
  1. rows        eval.data (eval.holdout_fraction, eval.limit)
  2. prompts     prompts/<system>.jsonl: row, x, i, target
  3. images      images/<model>/<system>/<row>_<n>.png (raw images, from x, under `raw`), prompt, seed and model in
                 the PNG metadata; image n of row r uses seed render.seed + r * images_per_prompt + n for the raw
                 image and every system's, so they differ only by the prompt
  4. scores      scores.jsonl: one line per (system, model, row) with every metric (CI in units of 100)
  5. results     results.csv, results.json, report.md, grids/<row>.png
"""
import dataclasses
import json
import os

import jax
import numpy as np
import tqdm
from PIL import Image

from diffchat_jax.configs.eval import HPS
from diffchat_jax.data import examples as examples_lib
from diffchat_jax.diffusion import images as images_lib, pipeline as sd_pipeline, render as render_lib
from diffchat_jax.errors import ConfigError
from diffchat_jax.eval import metrics as metrics_lib, results, systems as systems_lib
from diffchat_jax.text import keywords
from diffchat_jax.train import run_config
from diffchat_jax.utils import files, mesh as mesh_lib
from diffchat_jax.utils.validate import DTYPES, check_data_source, check_model_source, names, one_of, require

RAW = "raw"


def validate_config(config) -> dict[str, systems_lib.Spec]:
    e = config.eval
    require(bool(e.data), "eval.data", "is empty: set the test rows (an InstructPE or InstructPix2Pix file)")
    check_data_source(e.data, "eval.data")
    require(0 <= e.holdout_fraction < 1, "eval.holdout_fraction", f"must be in [0, 1), got {e.holdout_fraction}")
    require(e.limit >= 0, "eval.limit", f"must be >= 0 (0 = all), got {e.limit}")
    one_of(e.on_bad_row, ("skip", "error"), "eval.on_bad_row")
    one_of(e.score_text, ("target", "reference"), "eval.score_text")
    one_of(e.rank_ties, results.TIES, "eval.rank_ties")
    one_of(e.scorers.hps_version, tuple(HPS), "eval.scorers.hps_version")
    metric_names(config)  # its check
    specs = systems_lib.parse_systems(dict(e.systems))
    require(RAW not in specs, f"eval.systems.{RAW}", "is reserved for the raw images; name the system otherwise")
    require(len(e.models) > 0 or not image_metrics(config), "eval.models", "is empty but image metrics are asked for")
    for name, path in e.models.items():
        check_model_source(path, f"eval.models.{name}", "a Stable Diffusion 1.x pipeline or single file")
    render_lib.validate_settings(config.render)
    if jax.process_count() > 1:
        raise ConfigError("config.distributed: the eval runs on one process for now (each host can run its own "
                          "eval.limit slice); several processes are not split yet")
    return specs


def metric_names(config) -> tuple[str, ...]:
    """eval.metrics as typed (a tuple, or "a,b" on the command line), checked."""
    return names(config.eval.metrics, "eval.metrics", results.METRICS)


def image_metrics(config) -> tuple[str, ...]:
    return tuple(m for m in metric_names(config) if m != "ci")


def load_rows(config) -> list[examples_lib.Example]:
    e = config.eval
    rows, report = examples_lib.load_examples(e.data, on_bad_row=e.on_bad_row, max_chars=e.max_chars)
    print(f"eval data: {report.summary()}")
    if e.holdout_fraction:
        rows = examples_lib.split_examples(rows, e.holdout_fraction, config.seed)[1]
    rows = rows[:e.limit] if e.limit else rows
    require(len(rows) > 0, "eval.data", "has no usable rows")
    return rows


def scorer_paths(config) -> dict[str, str]:
    s = config.eval.scorers
    weights, architecture = HPS[s.hps_version]
    return {"clip_model": s.clip_model, "mlp_weights": s.mlp_weights, "pickscore_model": s.pickscore_model,
            "pickscore_processor": s.pickscore_processor, "hps_weights": s.hps_weights or weights,
            "hps_config": s.hps_config or architecture}


def seeds(config, row: int) -> list[int]:
    n = config.render.images_per_prompt
    return [config.render.seed + row * n + k for k in range(n)]


def write_jsonl(path: str, rows: list[dict]) -> None:
    files.write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Images: cached as PNGs, keyed by their metadata.
# ---------------------------------------------------------------------------------------------------------------
def image_path(workdir: str, model: str, system: str, row: int, n: int) -> str:
    return os.path.join(workdir, "images", model, system, f"{row:05d}_{n}.png")


def cached_image(path: str, meta: dict) -> np.ndarray | None:
    """The PNG at `path` when its metadata is `meta` (same prompt, seed, model, settings), else None."""
    try:
        with Image.open(path) as image:
            if {k: image.text.get(k) for k in meta} != {k: str(v) for k, v in meta.items()}:
                return None
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError):  # missing, or cut short by a kill
        return None


def render_system(renderer, workdir: str, model: str, model_path: str, system: str, prompts: list[str],
                  config, settings_key: str) -> tuple[np.ndarray, int]:
    """[R, N, H, W, 3] uint8 images of `prompts` with the rows' seeds; renders only the missing ones (each saved as
    it comes). Returns (images, how many were rendered)."""
    n = config.render.images_per_prompt
    jobs, images = [], [[None] * n for _ in prompts]
    for r, prompt in enumerate(prompts):
        for k, seed in enumerate(seeds(config, r)):
            meta = {"prompt": prompt, "seed": seed, "model": model_path, "settings": settings_key}
            images[r][k] = cached_image(image_path(workdir, model, system, r, k), meta)
            if images[r][k] is None:
                jobs.append((r, k, prompt, seed, meta))
    chunk = config.render.batch_size
    for start in tqdm.trange(0, len(jobs), chunk, desc=f"render {model}/{system}", unit="batch", leave=False,
                             disable=not jobs):
        part = jobs[start:start + chunk]
        rendered = renderer([j[2] for j in part], [j[3] for j in part])
        for (r, k, _, _, meta), image in zip(part, rendered):
            images_lib.save_png(image_path(workdir, model, system, r, k), image, meta)
            images[r][k] = image
    return np.stack([np.stack(row) for row in images]), len(jobs)


# ---------------------------------------------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------------------------------------------
def run(config, workdir: str, allow_config_change: bool = False) -> dict:
    """Runs (or resumes) the evaluation in `workdir`; returns {"rendered": images rendered by this run,
    "scored": (system, model) pairs scored by this run, "avg_rank": {(system, model): rank}}."""
    specs = validate_config(config)
    workdir = os.path.abspath(workdir)
    del allow_config_change  # every setting is part of the cache keys: a changed one recomputes what it touches
    os.makedirs(workdir, exist_ok=True)
    e = config.eval
    metrics = metric_names(config)
    rows = load_rows(config)
    keyword_config = keywords.from_config(config.ci)
    print(f"{len(rows)} rows x {len(specs)} systems x {len(e.models)} SD model(s); metrics {list(metrics)}")

    # ----- prompts -----
    targets = {}
    for name, spec in specs.items():
        targets[name] = systems_lib.target_prompts(spec, rows)
        write_jsonl(os.path.join(workdir, "prompts", f"{name}.jsonl"),
                    [{"row": r, "x": ex.x, "i": ex.i, "target": t} for r, (ex, t) in enumerate(zip(rows, targets[name]))])

    # ----- images and scores -----
    wanted_images = image_metrics(config)
    settings = render_lib.RenderSettings.from_config(config.render)
    settings_key = json.dumps(dataclasses.asdict(settings), sort_keys=True)
    scores_path = os.path.join(workdir, "scores.jsonl")
    cached = {(s["system"], s["model"], s["row"]): s for s in read_jsonl(scores_path)}
    score_texts = {name: (t if e.score_text == "target" else [ex.y for ex in rows]) for name, t in targets.items()}
    done, rendered, scored = [], 0, 0
    models = dict(e.models) if wanted_images else {"-": ""}
    scorer = None
    with tqdm.tqdm(total=len(models) * len(specs), desc="eval", unit="pair") as bar:
        for model, model_path in models.items():
            renderer = raw = None
            for name in specs:
                keys = [{"x": ex.x, "target": t, "score_text": st, "settings": settings_key, "model_path": model_path,
                         "metrics": list(metrics)} for ex, t, st in zip(rows, targets[name], score_texts[name])]
                lines = [cached.get((name, model, r)) for r in range(len(rows))]
                if all(line is not None and line.get("key") == k for line, k in zip(lines, keys)):
                    done += lines  # scored before with these prompts and settings
                    bar.update(1)
                    continue
                values = {}
                if wanted_images:
                    if renderer is None:
                        sd, params = sd_pipeline.load_pretrained(model_path, dtype=DTYPES[config.render.dtype],
                                                                 config_from=config.render.config_from or None)
                        renderer = render_lib.Renderer(sd, params, settings, batch_size=config.render.batch_size,
                                                       mesh=mesh_lib.make_mesh(jax.local_devices()))
                    if raw is None:
                        raw, n = render_system(renderer, workdir, model, model_path, RAW, [ex.x for ex in rows],
                                               config, settings_key)
                        rendered += n
                    target_images, n = render_system(renderer, workdir, model, model_path, name, targets[name],
                                                     config, settings_key)
                    rendered += n
                    if scorer is None:
                        scorer = metrics_lib.ImageMetrics.load(scorer_paths(config), wanted_images,
                                                               batch_size=e.scorers.batch_size)
                    values = scorer(raw, target_images, [ex.x for ex in rows], score_texts[name], targets[name])
                if "ci" in metrics:
                    values["ci"] = np.asarray(systems_lib.ci_scores(rows, targets[name], keyword_config))
                done += [{"system": name, "model": model, "row": r, **{m: float(values[m][r]) for m in metrics},
                          "key": keys[r]} for r in range(len(rows))]
                scored += 1
                merged = {(s["system"], s["model"], s["row"]): s for s in [*cached.values(), *done]}
                write_jsonl(scores_path, list(merged.values()))  # after each pair: a kill loses at most one
                bar.update(1)
    # Keep only what this config asks for, in its order.
    write_jsonl(scores_path, done)

    # ----- results -----
    summaries = results.summarize(done, metrics)
    avg = results.average_ranks(summaries, e.rank_ties, metrics)
    shown = {"systems": dict(e.systems), "models": dict(e.models), "metrics": list(metrics),
             "score_text": e.score_text, "rank_ties": e.rank_ties, "rows": len(rows), "data": e.data,
             "render": dataclasses.asdict(settings), "hps_version": e.scorers.hps_version}
    results.write_results(workdir, summaries, avg, e.rank_ties, shown)
    write_report(workdir, config, summaries, avg, list(specs), list(models), shown)
    if wanted_images:
        write_grids(workdir, config, list(specs), list(models), min(e.grid_rows, len(rows)))
    run_config.save(config, workdir, [])
    print(f"rendered {rendered} image(s), scored {scored} (system, model) pair(s) this run\n"
          f"results: {os.path.join(workdir, 'results.csv')}\nreport: {os.path.join(workdir, 'report.md')}")
    return {"rendered": rendered, "scored": scored, "avg_rank": avg}


def write_report(workdir, config, summaries, avg, systems, models, shown) -> None:
    e = config.eval
    parts = ["# Evaluation\n",
             f"{shown['rows']} rows of `{e.data}`; image-text metrics against the **{e.score_text}** text; "
             f"Avg. Rank: ties share the {'best rank' if e.rank_ties == 'min' else 'mean of their ranks'}.\n"]
    for model in ([results.ALL_MODELS] if len(models) > 1 else []) + models:
        if model == "-":
            model = results.ALL_MODELS
        title = "All SD models (Table 1: the mean over models)" if model == results.ALL_MODELS else f"`{model}`"
        parts += [f"\n## {title}\n\n", results.markdown_table(summaries, avg, model, systems, metric_names(config))]
    parts.append("\n## Settings\n\n```json\n" + json.dumps(shown, indent=2) + "\n```\n")
    if "tiny" in str(e.models):
        parts.append("\nThe tiny models are random: these numbers test the pipeline, they say nothing about "
                     "prompt quality.\n")
    files.write_atomic(os.path.join(workdir, "report.md"), "".join(parts))


def write_grids(workdir, config, systems, models, count: int) -> None:
    """grids/<row>.png: a line per model, raw then each system (their first image)."""
    for r in range(count):
        lines = []
        for model in models:
            paths = [image_path(workdir, model, s, r, 0) for s in [RAW, *systems]]
            lines.append(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]))
        images = np.concatenate(lines)
        grid = images_lib.grid(images, columns=len(systems) + 1)
        images_lib.save_png(os.path.join(workdir, "grids", f"{r:05d}.png"), grid,
                            {"columns": ", ".join([RAW, *systems]), "lines": ", ".join(models)})
