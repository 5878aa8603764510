"""The chat's engine: a session, a DiffChat rewriter and SD renderers. The terminal (chat/terminal.py) and the
browser app (chat/web.py) are two faces of this one class.

    chat = Chat.from_config(config)                 # configs/chat.py
    chat.start("a cat on a sofa")                   # turn 0: the prompt rendered
    chat.instruct("make it snow", on_text=print)    # turn 1: T(x, i) -> y streamed, y rendered with the turn's seed

A turn's image depends on (its prompt, seed, model, steps, render settings) only, so a loaded session re-renders
the same images (`render_turn`). Every change is saved to the session folder at once.
"""
import dataclasses
import datetime
import os
import re
import shutil
from typing import Callable

import numpy as np
from PIL import Image

from diffchat_jax.chat.session import ChatError, Session, Turn
from diffchat_jax.errors import ConfigError
from diffchat_jax.utils import validate

Listener = Callable[[str], None]
LINE_BREAKS = re.compile(r"\s*[\r\n\v\f\u2028\u2029]+\s*")  # the template's fields are one line each
MAX_INSTRUCTION_SHARE = 2  # an instruction may take at most 1/2 of decoding.max_prompt_tokens


def one_line(text: str, what: str) -> tuple[str, list[str]]:
    """text with line breaks as spaces, stripped; and a note when it had any. The template T ends with
    "\\nOutput:": a typed "\\nOutput:" (or "\\nModification:") would end the input early, so no field keeps a
    line break."""
    cleaned = LINE_BREAKS.sub(" ", text).strip()
    notes = [f"line breaks in the {what} were replaced by spaces"] if LINE_BREAKS.search(text.strip()) else []
    return cleaned, notes


def parse_models(spec: str) -> dict[str, str]:
    """"name=path,name2=path2" -> {name: path}; a bare path is named by its folder or file name."""
    models = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep:
            name, path = os.path.splitext(os.path.basename(item.rstrip("/")))[0] or item, item
        if not name or not path or name in models:
            raise ConfigError(f"render.models: {item!r} is not NAME=PATH with a new NAME (got {spec!r})")
        models[name.strip()] = path.strip()
    if not models:
        raise ConfigError("render.models is empty: give NAME=PATH[,NAME=PATH...] of Stable Diffusion checkpoints")
    return models


@dataclasses.dataclass
class Settings:
    """What the next turn uses; /seed, /model and /steps change them."""
    seed: int
    model: str
    steps: int


class Chat:
    def __init__(self, rewriter, rewriter_name: str, models: dict[str, str], render_settings, folder: str,
                 settings: Settings, load_pipeline=None):
        """rewriter: a sampling.rewriter.Rewriter; models: SD name -> path; render_settings: a
        diffusion.render.RenderSettings (num_steps is replaced by settings.steps)."""
        if settings.model not in models:
            raise ConfigError(f"render.model {settings.model!r} is not one of render.models {sorted(models)}")
        self.rewriter, self.rewriter_name = rewriter, rewriter_name
        self.models, self.render_settings, self.settings = models, render_settings, settings
        self.folder, self.session = folder, Session()
        self._pipelines, self._renderers = {}, {}
        self._load_pipeline = load_pipeline

    @classmethod
    def from_config(cls, config, folder: str | None = None) -> "Chat":
        from diffchat_jax.diffusion import render
        from diffchat_jax.sampling.rewriter import Decoding, Rewriter
        models = parse_models(config.render.models)
        model = config.render.model or next(iter(models))
        validate.check_model_source(config.model, "model", "a DiffChat SFT/PPO workdir or export, or a BLOOM folder")
        for name, path in models.items():
            validate.check_model_source(path, f"render.models ({name})", "a Stable Diffusion checkpoint")
        rewriter = Rewriter.load(config.model, Decoding.from_config(config.decoding))
        settings = render.RenderSettings.from_config(config.render)
        folder = folder or config.session_dir or os.path.join(
            "workdirs", "chat", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        return cls(rewriter, config.model, models, settings, folder,
                   Settings(seed=int(config.seed), model=model, steps=int(config.render.num_steps)))

    # -----------------------------------------------------------------------------------------------------------
    # Rendering.
    # -----------------------------------------------------------------------------------------------------------
    def renderer(self, model: str, steps: int):
        """The renderer of a model at a step count, loaded and built once."""
        from diffchat_jax.diffusion import pipeline, render
        if model not in self._pipelines:
            self._pipelines[model] = (self._load_pipeline or pipeline.load_pretrained)(self.models[model])
        if (model, steps) not in self._renderers:
            sd, params = self._pipelines[model]
            settings = dataclasses.replace(self.render_settings, num_steps=steps)
            self._renderers[model, steps] = render.Renderer(sd, params, settings, batch_size=1)
        return self._renderers[model, steps]

    def render_turn(self, turn: Turn) -> np.ndarray:
        """[H, W, 3] uint8: the turn's prompt rendered with its seed, model and steps."""
        if turn.model not in self.models:
            raise ChatError(f"turn {turn.id} was rendered with model {turn.model!r}, which this chat does not have "
                            f"(render.models: {sorted(self.models)})")
        return self.renderer(turn.model, turn.steps)([turn.prompt], [turn.seed])[0]

    def _render_settings_json(self) -> dict:
        s = self.render_settings
        return {"solver": s.solver, "guidance_scale": s.guidance_scale, "negative_prompt": s.negative_prompt,
                "height": s.height, "width": s.width}

    def _add_rendered(self, **fields) -> Turn:
        from diffchat_jax.diffusion import images
        s = self.settings
        turn = Turn(id=len(self.session.turns), parent=None, seed=s.seed, model=s.model,
                    model_path=self.models[s.model], steps=s.steps, render=self._render_settings_json(),
                    image=f"turn_{len(self.session.turns):03d}.png",
                    time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **fields)
        image = self.render_turn(turn)
        images.save_png(os.path.join(self.folder, turn.image), image, {
            "prompt": turn.prompt, "negative_prompt": self.render_settings.negative_prompt, "seed": turn.seed,
            "model": turn.model_path, "model_name": turn.model, "solver": self.render_settings.solver,
            "steps": turn.steps, "guidance_scale": self.render_settings.guidance_scale,
            "instruction": turn.instruction or "", "source_prompt": turn.source or "", "turn": turn.id})
        added = self.session.add(**{k: v for k, v in dataclasses.asdict(turn).items() if k not in ("id", "parent")})
        self.save()
        return added

    # -----------------------------------------------------------------------------------------------------------
    # Turns.
    # -----------------------------------------------------------------------------------------------------------
    def start(self, prompt: str) -> Turn:
        """A start turn: `prompt` rendered. Starts a new branch tree beside any others in the session."""
        prompt, notes = one_line(prompt, "prompt")
        if not prompt:
            raise ChatError("the starting prompt is empty: type a prompt (or /open FILE.png)")
        self.session.head = None
        return self._add_rendered(prompt=prompt, notes=tuple(notes))

    def open_image(self, path: str) -> Turn:
        """A start turn from a PNG our renderer wrote: its prompt, and its seed and model when it names them; the
        file itself is the turn's image."""
        try:
            with Image.open(path) as image:
                text, size = dict(getattr(image, "text", {}) or {}), image.size
        except (OSError, ValueError) as e:
            raise ChatError(f"/open {path}: not a readable image ({e})") from None
        prompt, notes = one_line(text.get("prompt", ""), "prompt")
        if not prompt:
            raise ChatError(f"/open {path}: the image has no prompt in its metadata (only images rendered by "
                            "diffchat_jax, e.g. a chat's or txt2img's, carry one); type a starting prompt instead")
        if text.get("seed", "").isdigit():
            self.settings.seed = int(text["seed"])
        named = ([text["model_name"]] if text.get("model_name") in self.models else
                 [n for n, p in self.models.items() if text.get("model") in (p, n)])  # the name first: paths repeat
        if named:
            self.settings.model = named[0]
        elif text.get("model"):
            notes.append(f"its model {text['model']} is not one of render.models; using {self.settings.model}")
        if text.get("steps", "").isdigit():
            self.settings.steps = int(text["steps"])
        self.session.head = None
        turn_image = f"turn_{len(self.session.turns):03d}.png"
        os.makedirs(self.folder, exist_ok=True)
        shutil.copyfile(path, os.path.join(self.folder, turn_image))
        s = self.settings
        turn = self.session.add(prompt=prompt, seed=s.seed, model=s.model, model_path=self.models[s.model],
                                steps=s.steps, render=self._render_settings_json(), image=turn_image,
                                time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                notes=tuple(notes + [f"opened from {os.path.abspath(path)} ({size[0]}x{size[1]})"]))
        self.save()
        return turn

    def fit_instruction(self, instruction: str) -> tuple[str, list[str]]:
        """The instruction cut (token-wise) to half the model's prompt budget, with a note when cut."""
        tokenizer = self.rewriter.tokenizer
        budget = self.rewriter.decoding.max_prompt_tokens // MAX_INSTRUCTION_SHARE
        ids = tokenizer(instruction, add_special_tokens=False)["input_ids"]
        if len(ids) <= budget:
            return instruction, []
        cut = tokenizer.decode(ids[:budget], skip_special_tokens=True).rstrip("\ufffd").strip()
        return cut, [f"the instruction was cut to its first {budget} tokens (of {len(ids)}) to fit the model's "
                     f"context"]

    def instruct(self, instruction: str, on_text: Listener | None = None) -> Turn:
        """A turn that edits the current prompt with `instruction`: y streams to on_text, then is rendered."""
        current = self.session.current
        if current is None:
            raise ChatError("no prompt yet: the first line is the starting prompt (or /open FILE.png)")
        instruction, notes = one_line(instruction, "instruction")
        if not instruction:
            raise ChatError("the instruction is empty: no turn was made")
        instruction, cut = self.fit_instruction(instruction)
        notes += cut
        if on_text is None:
            result = self.rewriter.rewrite([current.prompt], [instruction])
        else:
            result = self.rewriter.rewrite_streamed(current.prompt, instruction, on_text)
        prompt = result.texts[0]
        if result.truncated[0]:
            notes.append("the current prompt was cut from its end to fit the model's context")
        if not prompt:
            prompt = current.prompt
            notes.append("the model wrote an empty prompt; the current prompt is rendered again")
        decoding = dataclasses.asdict(self.rewriter.decoding)
        return self._add_rendered(prompt=prompt, instruction=instruction, source=current.prompt,
                                  rewriter=self.rewriter_name, decoding=decoding, notes=tuple(notes))

    # -----------------------------------------------------------------------------------------------------------
    # Session actions.
    # -----------------------------------------------------------------------------------------------------------
    def undo(self) -> Turn:
        return self._changed(self.session.undo())

    def redo(self) -> Turn:
        return self._changed(self.session.redo())

    def branch(self, turn_id: int) -> Turn:
        return self._changed(self.session.branch(turn_id))

    def _changed(self, turn: Turn) -> Turn:
        self.save()
        return turn

    def set_model(self, name: str) -> None:
        if name not in self.models:
            raise ChatError(f"no model {name!r}: the models are {', '.join(sorted(self.models))}")
        self.settings.model = name

    def set_seed(self, seed: int) -> None:
        if not 0 <= seed < 2 ** 32:
            raise ChatError(f"the seed must be in [0, 2**32), got {seed}")
        self.settings.seed = seed

    def set_steps(self, steps: int) -> None:
        if not 1 <= steps <= 1000:
            raise ChatError(f"steps must be in [1, 1000], got {steps}")
        self.settings.steps = steps

    def save(self, folder: str | None = None) -> str:
        """session.json in the session folder; with `folder`, a copy of the whole session (json + images) there."""
        if folder is None or os.path.abspath(folder) == os.path.abspath(self.folder):
            return self.session.save(self.folder)
        if os.path.exists(os.path.join(folder, "session.json")):
            raise ChatError(f"{folder} already holds a session; choose an empty folder")
        os.makedirs(folder, exist_ok=True)
        for turn in self.session.turns:
            if turn.image:
                shutil.copyfile(os.path.join(self.folder, turn.image), os.path.join(folder, turn.image))
        return self.session.save(folder)

    def load(self, folder: str) -> Turn | None:
        """Continues the session in `folder` (new turns are saved there)."""
        session = Session.load(folder)
        self.session, self.folder = session, folder
        if session.current is not None:
            turn = session.current
            self.settings.seed, self.settings.steps = turn.seed, turn.steps
            if turn.model in self.models:
                self.settings.model = turn.model
        return session.current

    def image_path(self, turn: Turn) -> str:
        return os.path.join(self.folder, turn.image)
