"""Bad model files and folders get one line naming the file (and tensor), never another exception type; config
fields left to defaults that no tensor shape confirms are warned about; PyTorch is asked for by name (issue 13).

Every model here is tiny and built in tmp_path (BLOOM by our own save_pretrained; SD and scorers by
diffchat_jax.tiny_models, once per run); nothing reaches the hub (HF_HUB_OFFLINE=1, conftest.py).
"""
import json
import os
import pickle
import re
import shutil
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import pytest
import torch
from huggingface_hub import constants as hub_constants
from numpy.testing import assert_array_equal
from safetensors.numpy import load_file, save_file

from diffchat_jax import errors, tiny_models
from diffchat_jax.diffusion import pipeline
from diffchat_jax.models import bloom, clip, hf_io, ldm
from diffchat_jax.rewards import scorers
from diffchat_jax.utils import torch_dep
from tests.test_ldm import to_ldm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BLOOM = bloom.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)


class Evil:
    """Pickled next to the tensors: an object the weights-only loader must refuse (it could run code)."""


def one_line(error: BaseException) -> str:
    """The line `error: ...` that errors.run_command prints, checked to be one line."""
    text = errors.describe(error)
    assert "\n" not in text, text
    return text


def edit_json(path, **changes):
    """Rewrite a JSON file with top-level keys changed (None deletes the key)."""
    with open(path) as f:
        content = json.load(f)
    for key, value in changes.items():
        if value is None:
            content.pop(key, None)
        else:
            content[key] = value
    with open(path, "w") as f:
        json.dump(content, f)


def copy(src, dst) -> str:
    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
    return str(dst)


# ----------------------------------------------------------------------------------------------------------
# Ways to break a checkpoint file, and the models they break.
# ----------------------------------------------------------------------------------------------------------
def truncate(path):
    """The first half of a real file (a download cut off)."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def empty(path):
    open(path, "wb").close()


def random_bytes(path):
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(4096))


CORRUPTIONS = {"truncated": truncate, "empty": empty, "random bytes": random_bytes}


@pytest.fixture(scope="module")
def bloom_folder(tmp_path_factory) -> str:
    """A tiny random BLOOM (hidden 32, 4 heads) as our save_pretrained writes it (transformers' layout)."""
    folder = str(tmp_path_factory.mktemp("bloom"))
    bloom.save_pretrained(TINY_BLOOM, bloom.init_params(TINY_BLOOM, jax.random.key(0)), folder)
    return folder


@pytest.fixture(scope="module")
def single_file(tiny_sd, tmp_path_factory) -> str:
    """The tiny SD pipeline as one LDM-layout .safetensors file (tests/test_ldm.py's independent renamer)."""
    weights = {part: load_file(os.path.join(tiny_sd, part, file)) for part, file in (
        ("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"))}
    configs = {part: hf_io.read_json(os.path.join(tiny_sd, part, "config.json")) for part in ("unet", "vae")}
    state = to_ldm(weights["unet"], weights["vae"], weights["text_encoder"], configs["unet"], configs["vae"])
    path = str(tmp_path_factory.mktemp("single") / "tiny-ldm.safetensors")
    save_file(state, path)
    return path


# name -> (what to copy from the fixtures, the file that gets broken, the file whose config.json gets a width
# its weights do not have (with the tensor the error must name), how to load).
def _cases(fixtures: dict) -> dict:
    sd, models = fixtures["tiny_sd"], fixtures["tiny_model_paths"]
    load_sd = lambda root: pipeline.load_pretrained(os.path.join(root, "model"))
    load_single = lambda root: pipeline.load_pretrained(os.path.join(root, "model.safetensors"),
                                                        config_from=os.path.join(root, "configs"))
    load_hps = lambda root: clip.load_openclip(os.path.join(root, "hps.pt"), os.path.join(root, "config"))
    return {
        "bloom": dict(copy={"model": fixtures["bloom_folder"]}, broken="model/model.safetensors",
                      config=("model/config.json", {"hidden_size": 48}, "transformer.h.0.input_layernorm.bias"),
                      load=lambda root: bloom.load_pretrained(os.path.join(root, "model"))),
        "sd folder": dict(copy={"model": sd}, broken="model/unet/diffusion_pytorch_model.safetensors",
                          config=("model/unet/config.json", {"cross_attention_dim": 48}, "attn2.to_k.weight"),
                          load=load_sd),
        "sd single file": dict(copy={"model.safetensors": fixtures["single_file"], "configs": sd},
                               broken="model.safetensors",
                               config=("configs/text_encoder/config.json", {"hidden_size": 48},
                                       "text_model/embeddings/token_embedding/embedding"),
                               load=load_single),
        "clip": dict(copy={"model": models["clip"]}, broken="model/model.safetensors",
                     config=("model/config.json", {"projection_dim": 8}, "visual_projection/kernel"),
                     load=lambda root: clip.load_pretrained(os.path.join(root, "model"))),
        "aesthetic mlp": dict(copy={"mlp.pth": models["mlp_weights"]}, broken="mlp.pth", config=None,
                              load=lambda root: scorers.load_aesthetic_mlp(os.path.join(root, "mlp.pth"))),
        "hps": dict(copy={"hps.pt": models["hps"], "config": models["pickscore"]}, broken="hps.pt",
                    config=("config/config.json", {"projection_dim": 8}, "text_projection/kernel"), load=load_hps),
    }


CASES = ("bloom", "sd folder", "sd single file", "clip", "aesthetic mlp", "hps")


@pytest.fixture
def case(request, tmp_path, bloom_folder, single_file, tiny_sd, tiny_model_paths):
    """(root, spec) of one model kind, copied into tmp_path so it can be broken."""
    spec = _cases(dict(bloom_folder=bloom_folder, single_file=single_file, tiny_sd=tiny_sd,
                       tiny_model_paths=tiny_model_paths))[request.param]
    for name, src in spec["copy"].items():
        copy(src, tmp_path / name)
    return str(tmp_path), spec


@pytest.mark.parametrize("case", CASES, indirect=True)
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_broken_checkpoint_is_one_line_naming_the_file(case, corruption):
    root, spec = case
    broken = os.path.join(root, spec["broken"])
    CORRUPTIONS[corruption](broken)
    with pytest.raises(errors.ModelFileError) as e:
        spec["load"](root)
    line = one_line(e.value)
    if broken.endswith(".safetensors"):
        assert re.fullmatch(re.escape(broken) + r": not a readable safetensors file \(Error while deserializing "
                            r"header: [^)]+\); re-download or re-convert it", line), line
    else:  # torch's zip reader (truncated), its unpickler (empty, random bytes)
        assert re.match(re.escape(broken) + r": (not a readable PyTorch checkpoint \((RuntimeError|EOFError)[^)]*\); "
                        r"re-download it$|PyTorch's weights-only loader refused it \(Unsupported operand \d+\): it "
                        r"is corrupt, .*; re-download it, or if you trust its source, convert it to \.safetensors)",
                        line), line


@pytest.mark.parametrize("case", [c for c in CASES if c != "aesthetic mlp"], indirect=True)
def test_config_of_other_width_is_one_line_naming_the_folder_and_tensor(case):
    root, spec = case
    spec["load"](root)  # intact, it loads
    config, changes, tensor = spec["config"]
    edit_json(os.path.join(root, config), **changes)
    with pytest.raises(errors.ModelFileError) as e:
        spec["load"](root)
    line = one_line(e.value)
    assert re.match(re.escape(root) + r"/[^:]+: checkpoint does not match the \w+ config: ", line), line
    assert re.search(re.escape(tensor) + r" has shape \([\d, ]+\), expected \([\d, ]+\)", line), line
    assert line.endswith("use the config that came with these weights")


def test_aesthetic_mlp_of_other_width_names_the_file_and_tensor(tiny_model_paths):
    path = tiny_model_paths["mlp_weights"]  # on 16-wide embeddings
    with pytest.raises(hf_io.BadModelFile, match=re.escape(path) + r": checkpoint does not match the aesthetic "
                       r"MLP config: layers\.0\.weight has shape \(16, 1024\), expected \(768, 1024\)"):
        scorers.load_aesthetic_mlp(path, in_features=768)
    assert scorers.load_aesthetic_mlp(path, in_features=16)["layers_0"]["kernel"].shape == (16, 1024)


def test_errors_keep_the_types_callers_catch(tmp_path, bloom_folder):
    with pytest.raises(FileNotFoundError):
        bloom.load_pretrained(str(tmp_path / "nowhere"))
    folder = copy(bloom_folder, tmp_path / "b")
    random_bytes(os.path.join(folder, "model.safetensors"))
    with pytest.raises(ValueError):
        bloom.load_pretrained(folder)


def test_run_command_prints_the_line_and_exits_2(tmp_path, capsys):
    missing = str(tmp_path / "no-bloom")
    with pytest.raises(SystemExit) as e:
        errors.run_command(bloom.load_pretrained, missing)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {missing}: no such model folder; check the path\n"


# ----------------------------------------------------------------------------------------------------------
# Finding 1: config fields left to defaults that no tensor shape confirms.
# ----------------------------------------------------------------------------------------------------------
def test_bloom_config_without_n_head_warns_naming_the_field_and_file(tmp_path, bloom_folder):
    folder = copy(bloom_folder, tmp_path / "b")
    config_path = os.path.join(folder, "config.json")
    edit_json(config_path, n_head=None)
    with pytest.warns(hf_io.DefaultedConfigWarning) as caught:
        module, _ = bloom.load_pretrained(folder)
    assert module.config.n_head == 8  # transformers' default, kept: 32 / 8 fits the weights' shapes
    (warning,) = caught
    assert str(warning.message).startswith(f"{config_path} does not set n_head: using the defaults of "
                                           "transformers (n_head=8)")
    edit_json(config_path, layer_norm_epsilon=None, apply_residual_connection_post_layernorm=None)
    with pytest.warns(hf_io.DefaultedConfigWarning, match=re.escape(
            "does not set n_head, layer_norm_epsilon, apply_residual_connection_post_layernorm: using the defaults "
            "of transformers (n_head=8, layer_norm_epsilon=1e-05, apply_residual_connection_post_layernorm=False)")):
        bloom.load_pretrained(folder)


def test_bloom_config_with_its_heads_does_not_warn(tmp_path, bloom_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf_io.DefaultedConfigWarning)
        assert bloom.load_pretrained(bloom_folder)[0].config.n_head == 4
        folder = copy(bloom_folder, tmp_path / "b")
        # bigscience/bloom-* spell it num_attention_heads; shape fields (hidden_size, n_layer) need no warning.
        edit_json(os.path.join(folder, "config.json"), n_head=None, num_attention_heads=4, n_layer=None,
                  vocab_size=None)
        with pytest.raises(hf_io.BadModelFile, match="word_embeddings"):  # vocab_size: the default does not fit
            bloom.load_pretrained(folder)
        edit_json(os.path.join(folder, "config.json"), vocab_size=64, n_layer=2)
        assert bloom.load_pretrained(folder)[0].config.n_head == 4


def test_clip_config_without_heads_warns_naming_the_tower_field(tmp_path, tiny_model_paths):
    folder = copy(tiny_model_paths["clip"], tmp_path / "clip")
    config_path = os.path.join(folder, "config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf_io.DefaultedConfigWarning)
        clip.load_pretrained(folder)  # transformers writes every field
    with open(config_path) as f:
        hf = json.load(f)
    del hf["text_config"]["num_attention_heads"], hf["vision_config"]["layer_norm_eps"]
    with open(config_path, "w") as f:
        json.dump(hf, f)
    with pytest.warns(hf_io.DefaultedConfigWarning, match=re.escape(
            f"{config_path} does not set text_config.num_attention_heads, vision_config.layer_norm_eps: using the "
            "defaults of transformers (text_config.num_attention_heads=8, vision_config.layer_norm_eps=1e-05)")):
        module, _ = clip.load_pretrained(folder)
    assert module.config.text.num_attention_heads == 8


# ----------------------------------------------------------------------------------------------------------
# Findings 3 and 4: what a render model may be.
# ----------------------------------------------------------------------------------------------------------
def test_render_folder_that_is_no_pipeline_says_what_is_expected(tmp_path, bloom_folder):
    (tmp_path / "empty").mkdir()
    for folder in (bloom_folder, str(tmp_path / "empty")):
        with pytest.raises(hf_io.BadModelFile) as e:
            pipeline.load_pretrained(folder)
        line = one_line(e.value)
        assert line.startswith(f"{folder}: not a diffusers pipeline folder (no model_index.json); pass a diffusers "
                               "SD 1.x pipeline folder or hub id"), line
        assert line.endswith("or a single-file checkpoint (.safetensors, .ckpt, .pt, .pth)")
        with pytest.raises(hf_io.BadModelFile, match=re.escape(f"{folder}: not a diffusers pipeline folder")):
            pipeline.load_pretrained(str(tmp_path / "x.safetensors"), config_from=folder, abstract=True)
    with pytest.raises(hf_io.BadModelFile, match=re.escape(f"{bloom_folder}/config.json: not a Stable Diffusion "
                                                           "checkpoint file")):
        pipeline.load_pretrained(os.path.join(bloom_folder, "config.json"))


def test_single_file_without_config_from_offline_says_to_pass_one(single_file, monkeypatch, tmp_path):
    # A tokenizer id that no cache holds, offline: what SD 1.5's tokenizer is on a machine that never downloaded it.
    monkeypatch.setattr(pipeline, "SD15_TOKENIZER", "diffchat-jax-tests/no-such-tokenizer")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hf_io.MissingModelFile) as e:
        pipeline.load_pretrained(single_file)
    assert one_line(e.value) == (
        f"{single_file}: a single-file checkpoint needs the pipeline configs and tokenizer of SD 1.5; the configs are "
        "built in, but the tokenizer (diffchat-jax-tests/no-such-tokenizer) is not in the local hub cache while the "
        "hub is offline (HF_HUB_OFFLINE=1); pass config_from=<a local diffusers SD 1.x pipeline folder> "
        "(config.render.config_from; txt2img --config_from)")
    with pytest.raises(hf_io.MissingModelFile, match=re.escape(f"{tmp_path}/gone.safetensors: no such file")):
        pipeline.load_pretrained(str(tmp_path / "gone.safetensors"))  # the file is looked for first


# ----------------------------------------------------------------------------------------------------------
# Finding 5: missing local paths and hub ids out of reach.
# ----------------------------------------------------------------------------------------------------------
def test_missing_local_path_is_named_by_every_loader(tmp_path):
    gone = str(tmp_path / "gone")
    loaders = [bloom.load_pretrained, clip.load_pretrained, pipeline.load_pretrained,
               lambda p: pipeline.load_pretrained(p + ".safetensors"), lambda p: scorers.load_aesthetic_mlp(p + ".pth"),
               lambda p: ldm.read_checkpoint(hf_io.resolve_file(p + ".ckpt")),
               lambda p: clip.load_openclip(p + ".pt", p)]
    for load in loaders:
        with pytest.raises(hf_io.MissingModelFile, match=re.escape(gone) + r"(\.\w+)?: no such (model folder|file)"):
            load(gone)


def test_hub_id_out_of_reach_offline_is_one_line(monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    name = "diffchat-jax-tests/not-cached"
    with pytest.raises(hf_io.MissingModelFile) as e:
        hf_io.resolve_folder(name, ["config.json"])
    assert one_line(e.value) == (f"{name}: no such local folder, and as a hub id it is not in the local cache while "
                                 "the hub is offline (HF_HUB_OFFLINE=1); check the path, or download it once with "
                                 "the hub online")
    with pytest.raises(hf_io.MissingModelFile, match=re.escape(f"{name}/weights.pth: no such local file, and as a hub "
                                                               "file it is not in the local cache while the hub is "
                                                               "offline")):
        hf_io.resolve_file(f"{name}/weights.pth")
    with pytest.raises(hf_io.MissingModelFile, match=re.escape(f"{name}: no such local folder, and as a hub id")):
        bloom.load_pretrained(name)


# ----------------------------------------------------------------------------------------------------------
# Finding 6: PyTorch files that pickle more than tensors.
# ----------------------------------------------------------------------------------------------------------
def test_pth_pickling_an_object_is_refused_saying_how_to_convert_it(tmp_path, tiny_model_paths, monkeypatch):
    state = torch.load(tiny_model_paths["mlp_weights"], weights_only=True)
    evil = str(tmp_path / "evil.pth")
    torch.save({**state, "payload": Evil()}, evil)
    hps = str(tmp_path / "hps.pt")
    torch.save({"state_dict": torch.load(tiny_model_paths["hps"], weights_only=True)["state_dict"],
                "payload": Evil()}, hps)
    for load, path in ((scorers.load_aesthetic_mlp, evil),
                       (lambda p: clip.load_openclip(p, tiny_model_paths["pickscore"]), hps),
                       (ldm.read_checkpoint, hps)):
        with pytest.raises(hf_io.RefusedPickle) as e:
            load(path)
        assert isinstance(e.value, pickle.UnpicklingError) and isinstance(e.value, errors.ModelFileError)
        line = one_line(e.value)
        assert line.startswith(f"{path}: pickles more than tensors (tests.test_input_errors_models.Evil), which we do "
                               "not unpickle (it could run code); if you trust its source, convert it to "
                               ".safetensors and load that: python -c \""), line
        assert "weights_only=False" not in line.split("python -c")[0]  # torch's own advice is not passed on

    # The conversion the message gives, run as it says (in-process): the tensors, and nothing else, come back.
    out = str(tmp_path / "mlp.safetensors")
    monkeypatch.setattr(sys, "argv", ["-c", evil, out])
    exec(hf_io.CONVERT_TO_SAFETENSORS, {})
    converted, original = scorers.load_aesthetic_mlp(out), scorers.load_aesthetic_mlp(tiny_model_paths["mlp_weights"])
    jax.tree.map(assert_array_equal, converted, original)


# ----------------------------------------------------------------------------------------------------------
# Finding 7: PyTorch at run time.
# ----------------------------------------------------------------------------------------------------------
def test_missing_torch_says_how_to_install_it(monkeypatch, tmp_path, tiny_model_paths):
    path = tiny_model_paths["mlp_weights"]
    as_safetensors = str(tmp_path / "mlp.safetensors")
    save_file({k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}, as_safetensors)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    message = "needs PyTorch: pip install 'diffchat_jax[torch]' (torch==2.13.0)"
    with pytest.raises(torch_dep.MissingPyTorch) as e:
        hf_io.read_torch_state_dict(path)
    assert one_line(e.value) == f"reading {path} {message}"
    assert isinstance(e.value, errors.UserError) and isinstance(e.value, ImportError)
    with pytest.raises(errors.UserError, match=re.escape(f"reading {path} {message}")):
        scorers.load_aesthetic_mlp(path)
    with pytest.raises(errors.UserError, match=re.escape(f"building the tiny models (python -m "
                                                         f"diffchat_jax.tiny_models) {message}")):
        tiny_models.build(str(tmp_path / "tiny"))
    assert not (tmp_path / "tiny").exists()
    scorers.load_aesthetic_mlp(as_safetensors)  # safetensors files need no torch


def test_torch_pin_is_setup_pys_extra():
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup = f.read()
    assert f'"torch": ["{torch_dep.TORCH_REQUIREMENT}"]' in setup
    assert f'"test": ["{torch_dep.TORCH_REQUIREMENT}"' in setup
