"""The evaluation job (mode `eval`, configs/eval.py): systems x SD models x metrics -> the paper's tables.

    python -m diffchat_jax.main --config=configs/eval.py[:tiny] --workdir=DIR

Stages, each resumable (what is on disk and still matches is kept, so a rerun after an interruption computes only
what is missing and ends with the same files):
  1. rows        eval.data (eval.holdout_fraction, eval.limit)
  2. prompts     prompts/<system>.jsonl: row, x, i, target (model: and openai: lines carry their key: model
                 weights and decoding, or the LLM request settings; rows whose key matches are not redone)
  3. images      images/<model>/<system>/<row>_<n>.png (raw images, from x, under `raw`), prompt, seed and model in
                 the PNG metadata; image n of row r uses seed render.seed + r * images_per_prompt + n for the raw
                 image and every system's, so they differ only by the prompt
  4. scores      scores.jsonl: one line per (system, model, row) with every metric (CI in units of 100)
  5. results     results.csv, results.json, report.md, grids/<row>.png, charts/<metric>.png

Several processes (config.distributed): each takes a contiguous block of the rows (distributed.process_block) for
model: rewriting, rendering, editing and scoring on its own devices; rows are gathered so every process holds the
whole table, and process 0 writes every shared file (the workdir is one folder all processes see). A row's prompt,
seeds and images do not depend on the split, so 2 processes give the files of 1.
"""
import dataclasses
import json
import os
from typing import Sequence

import jax
import numpy as np
import tqdm
from PIL import Image

from diffchat_jax.configs.eval import HPS
from diffchat_jax.data import examples as examples_lib
from diffchat_jax.diffusion import images as images_lib, ip2p as ip2p_lib, pipeline as sd_pipeline
from diffchat_jax.diffusion import render as render_lib, schedulers
from diffchat_jax.eval import charts, metrics as metrics_lib, results, systems as systems_lib
from diffchat_jax.llm import client as llm_client, rewrite as llm_rewrite
from diffchat_jax.models import bloom
from diffchat_jax.sampling import rewriter as rewriter_lib
from diffchat_jax.text import keywords
from diffchat_jax.train import run_config
from diffchat_jax.utils import distributed, files, mesh as mesh_lib
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
    for name, spec in specs.items():
        field = f"eval.systems.{name}"
        if spec.kind == "model":
            check_model_source(spec.arg, field, "an SFT or PPO workdir, its export/, or a transformers BLOOM folder")
            rewriter_lib.Decoding.from_config(e.decoding)  # its checks
        elif spec.kind == "ip2p":
            check_model_source(spec.arg, field, "an InstructPix2Pix pipeline folder in the diffusers layout")
            require(bool(image_metrics(config)), field, "is an image editor: it needs an image metric in eval.metrics")
            one_of(e.ip2p.solver, schedulers.SOLVERS, "eval.ip2p.solver")
            require(e.ip2p.num_steps >= 1, "eval.ip2p.num_steps", f"must be >= 1, got {e.ip2p.num_steps}")
        elif spec.kind == "openai":
            llm_settings(config, spec.arg).api_key()  # a missing key stops the job now, not after the renders
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
# Target prompts: fixed systems computed, the others (model:, openai:) cached in prompts/<system>.jsonl by key.
# ---------------------------------------------------------------------------------------------------------------
def model_fingerprint(path: str) -> dict:
    """What identifies a model's weights cheaply: its resolved folder's config and weight files (names, sizes,
    modification times); a hub id as it is."""
    folder = bloom.resolve_model_dir(path)
    if not os.path.isdir(folder):
        return {"id": path}
    found = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".json")))
    return {"folder": os.path.abspath(folder),
            "files": [[f, os.path.getsize(os.path.join(folder, f)), os.stat(os.path.join(folder, f)).st_mtime_ns]
                      for f in found]}


def prompt_key(spec: systems_lib.Spec, config) -> dict:
    if spec.kind == "model":
        decoding = dataclasses.asdict(rewriter_lib.Decoding.from_config(config.eval.decoding))
        del decoding["batch_size"]  # a row's text does not depend on it
        return {"system": f"model:{spec.arg}", "decoding": decoding, "weights": model_fingerprint(spec.arg)}
    return {"system": f"openai:{spec.arg}", **llm_rewrite.request_settings(llm_settings(config, spec.arg))}


def llm_settings(config, model: str):
    return llm_client.LLMSettings.from_config(config.eval.llm, model)


def system_targets(spec: systems_lib.Spec, rows: list, mine: range, config, workdir: str) -> list[str] | None:
    """Every row's target prompt for this system (None for an image editor), on every process. model: rows are
    split over the processes (each rewrites its block), openai: requests are made by process 0 (one cache);
    rows whose prompt, instruction and key match prompts/<system>.jsonl are taken from there."""
    if spec.edits_images:
        return None
    if spec.kind in (*systems_lib.FIXED, "file"):
        return systems_lib.fixed_targets(spec, rows)
    key = prompt_key(spec, config)
    lines = read_jsonl(os.path.join(workdir, "prompts", f"{spec.name}.jsonl"))
    targets = {l["row"]: l["target"] for l in lines if l.get("key") == key and l["row"] < len(rows)
               and (l["x"], l["i"]) == (rows[l["row"]].x, rows[l["row"]].i)}
    missing = [r for r in range(len(rows)) if r not in targets]
    if not missing:
        return [targets[r] for r in range(len(rows))]
    if spec.kind == "model":
        todo = [r for r in missing if r in mine]
        made = []
        if todo:
            decoding = rewriter_lib.Decoding.from_config(config.eval.decoding)
            rewriter = rewriter_lib.Rewriter.load(spec.arg, decoding)
            out = rewriter.rewrite([rows[r].x for r in todo], [rows[r].i for r in todo], positions=todo)
            if any(out.truncated):
                print(f"{spec.name}: {sum(out.truncated)} prompt(s) longer than eval.decoding.max_prompt_tokens "
                      f"({decoding.max_prompt_tokens}): x was cut to fit")
            made = [[r, text] for r, text in zip(todo, out.texts)]
    else:
        made = []
        if jax.process_index() == 0:
            texts = llm_rewrite.rewrite_prompts([rows[r] for r in missing], llm_settings(config, spec.arg),
                                                os.path.join(workdir, "llm_cache.sqlite"), row_numbers=missing)
            made = [[r, text] for r, text in zip(missing, texts)]
    targets.update({r: text for r, text in distributed.gather_objects(made)})
    return [targets[r] for r in range(len(rows))]


# ---------------------------------------------------------------------------------------------------------------
# Images: cached as PNGs, keyed by their metadata; each process renders the rows of its block.
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


def cached_images(workdir: str, model: str, system: str, row_ids: Sequence[int], metas: Sequence[list[dict]],
                  make, chunk: int) -> tuple[np.ndarray, int]:
    """[R, N, H, W, 3] uint8 images of rows `row_ids` (metas[r][k]: image k of row r's metadata); the missing ones
    made by make(jobs) -> images, jobs = [(r, k)] local indices, in chunks of `chunk` (each saved as it comes).
    Returns (images, how many were made)."""
    images = [[cached_image(image_path(workdir, model, system, row, k), meta) for k, meta in enumerate(row_metas)]
              for row, row_metas in zip(row_ids, metas)]
    jobs = [(r, k) for r, row in enumerate(images) for k, image in enumerate(row) if image is None]
    for start in tqdm.trange(0, len(jobs), chunk, desc=f"images {model}/{system}", unit="batch", leave=False,
                             disable=not jobs):
        part = jobs[start:start + chunk]
        for (r, k), image in zip(part, make(part)):
            images_lib.save_png(image_path(workdir, model, system, row_ids[r], k), image, metas[r][k])
            images[r][k] = image
    return np.stack([np.stack(row) for row in images]), len(jobs)


def render_rows(renderer, workdir: str, model: str, model_path: str, system: str, prompts: list[str],
                row_ids: Sequence[int], config, settings_key: str) -> tuple[np.ndarray, int]:
    """The images of `prompts` (rows `row_ids`) with the rows' seeds; renders only the missing ones."""
    metas = [[{"prompt": prompt, "seed": seed, "model": model_path, "settings": settings_key}
              for seed in seeds(config, row)] for prompt, row in zip(prompts, row_ids)]
    make = lambda jobs: renderer([metas[r][k]["prompt"] for r, k in jobs], [metas[r][k]["seed"] for r, k in jobs])
    return cached_images(workdir, model, system, row_ids, metas, make, config.render.batch_size)


def edit_rows(editor, workdir: str, model: str, model_path: str, spec: systems_lib.Spec, raw: np.ndarray,
              rows: list, row_ids: Sequence[int], config, settings_key: str) -> tuple[np.ndarray, int]:
    """An image editor's images: image k of row r is raw[r, k] edited with the row's instruction and seed."""
    editor_key = json.dumps({"editor": spec.arg, **dataclasses.asdict(editor.settings)}, sort_keys=True)
    metas = [[{"instruction": rows[row].i, "source_prompt": rows[row].x, "seed": seed, "model": model_path,
               "settings": settings_key, "editor": editor_key} for seed in seeds(config, row)] for row in row_ids]
    make = lambda jobs: editor(np.stack([raw[r, k] for r, k in jobs]), [metas[r][k]["instruction"] for r, k in jobs],
                               [metas[r][k]["seed"] for r, k in jobs])
    return cached_images(workdir, model, spec.name, row_ids, metas, make, config.render.batch_size)


def load_editor(spec: systems_lib.Spec, config):
    e = config.eval.ip2p
    settings = ip2p_lib.EditSettings(solver=e.solver, num_steps=e.num_steps, guidance_scale=e.guidance_scale,
                                     image_guidance_scale=e.image_guidance_scale,
                                     negative_prompt=config.render.negative_prompt)
    sd, params = ip2p_lib.load_pretrained(spec.arg, dtype=DTYPES[config.render.dtype])
    return ip2p_lib.Editor(sd, params, settings, batch_size=config.render.batch_size,
                           mesh=mesh_lib.make_mesh(jax.local_devices()))


# ---------------------------------------------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------------------------------------------
def run(config, workdir: str, allow_config_change: bool = False) -> dict:
    """Runs (or resumes) the evaluation in `workdir`; returns {"rendered": images made by this run (all
    processes'), "scored": (system, model) pairs scored by this run, "avg_rank": {(system, model): rank}}.
    Under several processes each renders and scores its block of rows, process 0 writes the files (the workdir
    must be one shared folder, as for checkpoints)."""
    specs = validate_config(config)
    workdir = os.path.abspath(workdir)
    del allow_config_change  # every setting is part of the cache keys: a changed one recomputes what it touches
    os.makedirs(workdir, exist_ok=True)
    e = config.eval
    metrics = metric_names(config)
    rows = load_rows(config)
    mine = distributed.process_block(len(rows))
    writer = jax.process_index() == 0
    keyword_config = keywords.from_config(config.ci)
    print(f"{len(rows)} rows x {len(specs)} systems x {len(e.models)} SD model(s); metrics {list(metrics)}"
          + (f"; this process: rows {mine.start} .. {mine.stop - 1}" if jax.process_count() > 1 else ""))

    # ----- prompts -----
    targets = {}
    for name, spec in tqdm.tqdm(specs.items(), desc="prompts", unit="system", leave=False):
        targets[name] = system_targets(spec, rows, mine, config, workdir)
        if writer and targets[name] is not None:
            key = prompt_key(spec, config) if spec.kind in ("model", "openai") else None
            write_jsonl(os.path.join(workdir, "prompts", f"{name}.jsonl"),
                        [{"row": r, "x": ex.x, "i": ex.i, "target": t, **({"key": key} if key else {})}
                         for r, (ex, t) in enumerate(zip(rows, targets[name]))])

    # ----- images and scores -----
    wanted_images = image_metrics(config)
    settings = render_lib.RenderSettings.from_config(config.render)
    settings_key = json.dumps(dataclasses.asdict(settings), sort_keys=True)
    scores_path = os.path.join(workdir, "scores.jsonl")
    cached = {(s["system"], s["model"], s["row"]): s for s in read_jsonl(scores_path)}
    distributed.barrier("eval: caches read")  # before process 0 writes any of them again
    # An editor has no target prompt: its image-text metrics use the row's y.
    score_texts = {name: ([ex.y for ex in rows] if t is None or e.score_text == "reference" else t)
                   for name, t in targets.items()}
    local = lambda values: [values[r] for r in mine]
    done, rendered, scored = [], 0, 0
    models = dict(e.models) if wanted_images else {"-": ""}
    scorer, editors = None, {}
    with tqdm.tqdm(total=len(models) * len(specs), desc="eval", unit="pair", disable=not writer) as bar:
        for model, model_path in models.items():
            renderer = raw = None
            for name, spec in specs.items():
                keys = [{"x": ex.x, "target": t, "score_text": st, "settings": settings_key, "model_path": model_path,
                         "metrics": list(metrics), **({"editor": spec.arg, **dict(e.ip2p)} if spec.edits_images
                                                      else {})}
                        for ex, t, st in zip(rows, targets[name] or [None] * len(rows), score_texts[name])]
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
                        raw, n = render_rows(renderer, workdir, model, model_path, RAW, local([ex.x for ex in rows]),
                                             mine, config, settings_key)
                        rendered += n
                    if spec.edits_images:
                        if spec.arg not in editors:
                            editors[spec.arg] = load_editor(spec, config)
                        target_images, n = edit_rows(editors[spec.arg], workdir, model, model_path, spec, raw, rows,
                                                     mine, config, settings_key)
                    else:
                        target_images, n = render_rows(renderer, workdir, model, model_path, name,
                                                       local(targets[name]), mine, config, settings_key)
                    rendered += n
                    if scorer is None:
                        scorer = metrics_lib.ImageMetrics.load(scorer_paths(config), wanted_images,
                                                               batch_size=e.scorers.batch_size)
                    values = scorer(raw, target_images, local([ex.x for ex in rows]), local(score_texts[name]),
                                    local(targets[name] or score_texts[name]))
                if "ci" in metrics and targets[name] is not None:
                    values["ci"] = np.asarray(systems_lib.ci_scores(local(rows), local(targets[name]),
                                                                    keyword_config))
                mine_lines = [{"system": name, "model": model, "row": r,
                               **{m: (float(values[m][j]) if m in values else None) for m in metrics}, "key": keys[r]}
                              for j, r in enumerate(mine)]
                done += distributed.gather_objects(mine_lines)
                scored += 1
                if writer:
                    merged = {(s["system"], s["model"], s["row"]): s for s in [*cached.values(), *done]}
                    write_jsonl(scores_path, list(merged.values()))  # after each pair: a kill loses at most one
                bar.update(1)

    # ----- results (process 0) -----
    rendered = sum(distributed.gather_objects([rendered]))  # every process's, for the job's count
    summaries = results.summarize(done, metrics)
    avg = results.average_ranks(summaries, e.rank_ties, metrics)
    if writer:
        write_jsonl(scores_path, done)  # only what this config asks for, in its order
        shown = {"systems": dict(e.systems), "models": dict(e.models), "metrics": list(metrics),
                 "score_text": e.score_text, "rank_ties": e.rank_ties, "rows": len(rows), "data": e.data,
                 "render": dataclasses.asdict(settings), "hps_version": e.scorers.hps_version}
        if any(spec.kind == "model" for spec in specs.values()):
            shown["decoding"] = dataclasses.asdict(rewriter_lib.Decoding.from_config(e.decoding))
        if any(spec.edits_images for spec in specs.values()):
            shown["ip2p"] = dict(e.ip2p)
        results.write_results(workdir, summaries, avg, e.rank_ties, shown)
        charts.write_charts(os.path.join(workdir, "charts"), summaries, list(specs), list(models), metrics)
        write_report(workdir, config, summaries, avg, specs, list(models), shown)
        if wanted_images:
            write_grids(workdir, config, list(specs), list(models), min(e.grid_rows, len(rows)))
        run_config.save(config, workdir, [])
        print(f"rendered {rendered} image(s), scored {scored} (system, model) pair(s) this run\n"
              f"results: {os.path.join(workdir, 'results.csv')}\nreport: {os.path.join(workdir, 'report.md')}")
    distributed.barrier("eval: written")
    return {"rendered": rendered, "scored": scored, "avg_rank": avg}


TINY_NOTE = """
## What the tiny numbers mean

The tiny models are random: the SD pipeline, the scorers and the BLOOM trained for a few minutes on 200 rows. The
table tests the pipeline end to end; it says nothing about prompt quality. PickScore, aesthetic and HPS here are
random functions of the images, so a system's image scores are noise; the tiny PPO run was trained against such
random scorers (and CI), which it can please by shortening its responses, so a PPO system below SFT on CI here
is what that training signal gives, not a property of the method. CI is the one real metric at this size.
"""


def write_report(workdir, config, summaries, avg, specs, models, shown) -> None:
    e = config.eval
    systems = list(specs)
    lines = "".join(f"- `{name}`: `{e.systems[name]}`" + (" (an image editor: no target prompt, so no CI; its "
                                                          "image-text metrics use the row's y)\n"
                                                          if spec.edits_images else "\n")
                    for name, spec in specs.items())
    parts = ["# Evaluation\n\n",
             f"{shown['rows']} rows of `{e.data}`; image-text metrics against the **{e.score_text}** text; "
             f"Avg. Rank: the mean of a system's ranks over the metrics it has (1 = best), ties share the "
             f"{'best rank' if e.rank_ties == 'min' else 'mean of their ranks'}. Best **bold**, second "
             f"<u>underlined</u>.\n\nSystems:\n{lines}"]
    for model in ([results.ALL_MODELS] if len(models) > 1 else []) + models:
        if model == "-":
            model = results.ALL_MODELS
        title = "All SD models (Table 1: the mean over models)" if model == results.ALL_MODELS else f"`{model}`"
        parts += [f"\n## {title}\n\n", results.markdown_table(summaries, avg, model, systems, metric_names(config))]
    parts.append("\n## Charts\n\n" + "".join(f"![{m}](charts/{m}.png)\n" for m in metric_names(config)))
    if image_metrics(config) and e.grid_rows:
        parts.append("\n## Images\n\nraw | " + " | ".join(systems) + ", a line per SD model:\n\n"
                     + "".join(f"![row {r}](grids/{r:05d}.png)\n" for r in range(min(e.grid_rows, shown["rows"]))))
    parts.append("\n## Settings\n\n```json\n" + json.dumps(shown, indent=2) + "\n```\n")
    if "tiny" in str(dict(e.models)):
        parts.append(TINY_NOTE)
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
