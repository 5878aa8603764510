"""Checkpoint files shared by the model converters: hub ids -> local paths, safetensors folders, PyTorch files.

Every reader returns numpy arrays keyed by the checkpoint's own tensor names; the converters rename them. A model
file or folder that cannot be used raises an errors.ModelFileError whose one line names it (and the tensor):
MissingModelFile (also a FileNotFoundError) for one that is not there, BadModelFile (also a ValueError) for one
that is there but unreadable or does not fit its config, RefusedPickle (also a pickle.UnpicklingError) for a
PyTorch file that pickles more than tensors.
"""
import contextlib
import json
import os
import pickle
import shlex
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.numpy import load_file

from diffchat_jax import errors
from diffchat_jax.utils import torch_dep

_SHOWN = 8  # tensors listed per kind of problem in one error line


class MissingModelFile(errors.ModelFileError, FileNotFoundError):
    """A model file or folder that is not there, locally or in the hub cache (still a FileNotFoundError)."""


class BadModelFile(errors.ModelFileError, ValueError):
    """A model file or folder that is there but cannot be used: unreadable, or weights and config that do not fit.

    where: the file or folder the message starts with, or None when the raiser only saw arrays or a config dict;
    `naming` gives it one.
    """

    def __init__(self, message: str, where: str | None = None):
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


class RefusedPickle(BadModelFile, pickle.UnpicklingError):
    """A PyTorch file that torch's weights-only loader refuses (an UnpicklingError, as torch raises it)."""


class DefaultedConfigWarning(UserWarning):
    """A model config field left out of its file, so set to the library's default, which no tensor shape checks."""


@contextlib.contextmanager
def naming(where):
    """BadModelFile errors raised inside without a file or folder (converters see only arrays and config dicts) get
    `where` in front."""
    try:
        yield
    except BadModelFile as e:
        if e.where is not None:
            raise
        raise type(e)(str(e), where=os.fspath(where)) from e


# ----------------------------------------------------------------------------------------------------------
# Local paths and hub ids.
# ----------------------------------------------------------------------------------------------------------
def hub_unavailable() -> str:
    """Why the hub gave nothing, for a message: offline mode, or (as huggingface_hub reports it) unreachable."""
    from huggingface_hub import constants
    return "the hub is offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"


def _is_repo_id(name: str) -> bool:
    """`name` or `owner/name` as the hub spells repositories (not an absolute or ./ path, at most one slash)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(name)
        return True
    except HFValidationError:
        return False


@contextlib.contextmanager
def _hub_errors(name: str, kind: str):
    """huggingface_hub's errors for `name`, no local `kind` ("folder" or "file") and so tried on the hub -> one
    MissingModelFile line (instead of the library's paragraph)."""
    from huggingface_hub import errors as hub
    hub_name = "hub id" if kind == "folder" else "hub file"
    try:
        yield
    except hub.LocalEntryNotFoundError as e:  # offline or unreachable, and not in the cache
        raise MissingModelFile(f"{name}: no such local {kind}, and as a {hub_name} it is not in the local cache while "
                               f"{hub_unavailable()}; check the path, or download it once with the hub online") from e
    except hub.RepositoryNotFoundError as e:  # also gated or private ones we may not read
        raise MissingModelFile(f"{name}: no such local {kind}, nor a hub repository we can read (private or gated "
                               "ones need `hf auth login`); check the path or the hub id") from e
    except hub.EntryNotFoundError as e:
        raise MissingModelFile(f"{name}: no such local {kind}, and its hub repository has no such file; check the "
                               "file name") from e


def resolve_folder(path_or_id: str, allow_patterns: list[str]) -> str:
    """A local folder as is; a hub id (`owner/name`) is downloaded, only the files matching allow_patterns."""
    folder = os.fspath(path_or_id)
    if os.path.isdir(folder):
        return folder
    if os.path.exists(folder):
        raise BadModelFile("a file, where a model folder (config and weights, as save_pretrained writes them) is "
                           "expected; pass its folder", where=folder)
    if not _is_repo_id(folder):
        raise MissingModelFile(f"{folder}: no such model folder; check the path")
    from huggingface_hub import snapshot_download  # only for hub ids
    with _hub_errors(folder, "folder"):
        return snapshot_download(folder, allow_patterns=allow_patterns)


def resolve_file(path_or_hub_file: str) -> str:
    """A local file as is; `owner/name/path/in/repo` is fetched from the hub with hf_hub_download."""
    path = os.fspath(path_or_hub_file)
    if os.path.exists(path):
        return path
    parts = path.split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if not filename or not _is_repo_id(repo):
        raise MissingModelFile(f"{path}: no such file (nor a hub file `owner/name/path/in/repo`); check the path")
    from huggingface_hub import hf_hub_download  # only for hub files
    with _hub_errors(path, "file"):
        return hf_hub_download(repo, filename)


# ----------------------------------------------------------------------------------------------------------
# Files: JSON configs, safetensors, PyTorch pickles.
# ----------------------------------------------------------------------------------------------------------
def read_json(path: str) -> dict:
    """A model's JSON file (config.json, model_index.json, a shard index) as a dict."""
    if not os.path.isfile(path):
        raise MissingModelFile(f"{path} is missing; a model folder holds all that save_pretrained writes there")
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadModelFile(f"not a JSON file ({e}); re-download it or fix the file", where=path) from e
    if not isinstance(content, dict):
        raise BadModelFile(f"holds a JSON {type(content).__name__}, not an object; re-download it", where=path)
    return content


def read_safetensors_file(path: str) -> dict[str, np.ndarray]:
    """One .safetensors file -> {name: array}."""
    with safetensors_errors(path):
        return load_file(path)


@contextlib.contextmanager
def safetensors_errors(path: str):
    """A SafetensorError inside (a truncated or corrupt file) -> BadModelFile naming the file."""
    try:
        yield
    except SafetensorError as e:
        raise BadModelFile(f"not a readable safetensors file ({e}); re-download or re-convert it", where=path) from e


def read_safetensors(folder: str, stem: str = "model") -> dict[str, np.ndarray]:
    """{stem}.safetensors, or the shards listed in {stem}.safetensors.index.json (transformers names its files
    `model`, diffusers `diffusion_pytorch_model`)."""
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise BadModelFile("no `weight_map` of tensor names to shard files; re-download it", where=index)
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(folder, f"{stem}.safetensors")):
        files = [f"{stem}.safetensors"]
    else:
        others = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        raise MissingModelFile(
            f"no {stem}.safetensors or {stem}.safetensors.index.json in {folder}; only safetensors weights are read"
            + (f" (it has {', '.join(others)}: load and save it with save_pretrained to write safetensors)"
               if others else ""))
    state = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise MissingModelFile(f"checkpoint shard {path} is missing (listed in {index}); re-download it")
        state.update(read_safetensors_file(path))
    return state


# A one-line conversion of a trusted PyTorch checkpoint to safetensors, for error messages (tested as it is).
CONVERT_TO_SAFETENSORS = (
    "import sys, torch; from safetensors.torch import save_file; s = torch.load(sys.argv[1], weights_only=False); "
    "s = s.get('state_dict', s); "
    "save_file({k: v.clone().contiguous() for k, v in s.items() if isinstance(v, torch.Tensor)}, sys.argv[2])")


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """A PyTorch state dict (.pt/.pth/.bin), optionally wrapped as {"state_dict": ...}, as float32 numpy.

    Loaded with `weights_only=True`: tensors and plain containers only, never arbitrary pickled objects (those
    raise RefusedPickle). Non-tensor entries (e.g. an epoch counter next to the state dict) are dropped.
    """
    torch = torch_dep.require_torch(f"reading {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(torch, path, e) from e
    except (RuntimeError, EOFError) as e:  # torch's zip reader on a truncated file; an empty file
        raise BadModelFile(f"not a readable PyTorch checkpoint ({type(e).__name__}{_reason(e, ': ')}); "
                           "re-download it", where=path) from e
    if not isinstance(state, dict):
        raise BadModelFile(f"holds a {type(state).__name__}, not a state dict of tensors", where=path)
    state = state.get("state_dict", state)
    return {k: v.float().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}


def _refused(torch, path: str, error: pickle.UnpicklingError) -> RefusedPickle:
    """What to say about a file the weights-only loader refused: the classes it pickles when torch can list them
    (zip checkpoints, torch >= 1.6), else the unpickler's own reason."""
    how = (f"if you trust its source, convert it to .safetensors and load that: python -c "
           f"\"{CONVERT_TO_SAFETENSORS}\" {shlex.quote(path)} OUT.safetensors")
    try:
        pickled = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError):  # not a zip checkpoint
        pickled = []
    if pickled:
        return RefusedPickle(f"pickles more than tensors ({', '.join(pickled[:_SHOWN])}), which we do not unpickle "
                             f"(it could run code); {how}", where=path)
    reason = _reason(error.__context__ or error) or type(error).__name__
    return RefusedPickle(f"PyTorch's weights-only loader refused it ({reason}): it is corrupt, or an old-format "
                         f"file that pickles more than tensors, which we do not unpickle (it could run code); "
                         f"re-download it, or {how}", where=path)


def _reason(error: BaseException, prefix: str = "") -> str:
    """The first sentence of a library's message (torch's go on for a paragraph), after `prefix`; "" if none."""
    text = str(error).strip().split("\n")[0].split(". ")[0].rstrip(".")
    return prefix + text if text else ""


def warn_defaults(path: str, defaults: dict[str, object], library: str = "transformers") -> None:
    """A visible warning naming the config fields (name -> the default used) that `path` leaves out and no tensor
    shape confirms: a model trained with other values would load without error and compute something else."""
    if defaults:
        used = ", ".join(f"{name}={value!r}" for name, value in defaults.items())
        warnings.warn(f"{path} does not set {', '.join(defaults)}: using the defaults of {library} ({used}), which "
                      "the weights' shapes cannot confirm; add the model's real values to the file",
                      DefaultedConfigWarning, stacklevel=2)


def abstract_params(init: Callable[[], dict], dtype):
    """The tree `init()` builds as jax.ShapeDtypeStructs in `dtype`: shapes only, nothing allocated."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), jax.eval_shape(init))


def checked_params(params, init: Callable[[], dict], name: Callable[[tuple[str, ...]], str], model: str, dtype):
    """Converted params (numpy), checked against the tree `init()` builds (traced, nothing allocated), cast to
    dtype; raises as check_params. params None: the abstract tree (`abstract_params`), for the memory report."""
    if params is None:
        return abstract_params(init, dtype)
    check_params(params, jax.eval_shape(init), name, model)
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def check_params(params, expected, name: Callable[[tuple[str, ...]], str], model: str) -> None:
    """Raise BadModelFile naming the tensors (`name(flax_path)`) that are missing, unexpected or of the wrong shape
    (the first _SHOWN of each kind: a config of another size would list every tensor)."""
    got, want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(expected)
    kinds = ([f"missing tensor {name(p)}" for p in want if p not in got],
             [f"unexpected tensor {name(p)}" for p in got if p not in want],
             [f"{name(p)} has shape {got[p].shape}, expected {want[p].shape}"
              for p in want if p in got and got[p].shape != want[p].shape])
    problems = []
    for kind in kinds:
        problems += kind[:_SHOWN] + ([f"and {len(kind) - _SHOWN} more"] if len(kind) > _SHOWN else [])
    if problems:
        raise BadModelFile(f"checkpoint does not match the {model} config: {'; '.join(problems)}; use the config "
                           "that came with these weights")


# ----------------------------------------------------------------------------------------------------------
# diffusers models (UNet, VAE): state dict names <-> Flax param paths, and their folders.
# ----------------------------------------------------------------------------------------------------------
DIFFUSERS_STEM = "diffusion_pytorch_model"


def diffusers_key_to_path(key: str, lists: tuple[str, ...], model: str,
                          renames: dict[str, str] | None = None) -> tuple[str, ...]:
    """'up_blocks.1.resnets.0.conv1.weight' -> ('up_blocks_1', 'resnets_0', 'conv1', 'kernel'): an index joins
    the module list it follows when that list is one of `lists` (not every `_{digit}` is an index:
    time_embedding.linear_1); `renames` maps old module names to current ones; weight -> scale for norms, else
    kernel."""
    path = []
    for part in key.split("."):
        if part.isdigit() and path and path[-1] in lists:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    *modules, leaf = path
    if not modules or leaf not in ("weight", "bias"):
        raise BadModelFile(f"unexpected tensor {key!r} in a {model} checkpoint")
    modules[-1] = (renames or {}).get(modules[-1], modules[-1])
    if leaf == "weight":
        leaf = "scale" if "norm" in modules[-1] else "kernel"
    return (*modules, leaf)


def diffusers_path_to_key(path: tuple[str, ...], lists: tuple[str, ...]) -> str:
    """The inverse of diffusers_key_to_path (current names)."""
    *modules, leaf = path
    parts = []
    for module in modules:
        stem, _, index = module.rpartition("_")
        parts += [stem, index] if stem in lists and index.isdigit() else [module]
    return ".".join([*parts, "bias" if leaf == "bias" else "weight"])


def torch_to_flax_params(state: dict[str, np.ndarray], key_to_path: Callable[[str], tuple[str, ...]]) -> dict:
    """A torch-named state dict -> nested Flax params (numpy, the state's dtypes): conv OIHW -> HWIO, linear
    [out, in] -> [in, out]."""
    flat = {}
    for key, x in state.items():
        path = key_to_path(key)
        if path[-1] == "kernel":
            x = x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T
        flat[path] = np.asarray(x)
    return traverse_util.unflatten_dict(flat)


def flax_to_torch_state(params, path_to_key: Callable[[tuple[str, ...]], str]) -> dict[str, np.ndarray]:
    """The inverse of torch_to_flax_params (contiguous numpy, the params' dtypes)."""
    state = {}
    for path, x in traverse_util.flatten_dict(params).items():
        x = np.asarray(x)
        if path[-1] == "kernel":
            x = x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T
        state[path_to_key(path)] = np.ascontiguousarray(x)
    return state


def read_diffusers_model(path_or_id: str, subfolder: str) -> tuple[dict, dict[str, np.ndarray]]:
    """A diffusers model folder, or a pipeline folder holding it in `subfolder` (local or hub id) ->
    (config.json dict, state dict from diffusion_pytorch_model.safetensors or its shards)."""
    stem = DIFFUSERS_STEM
    files = ["config.json", f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}-*.safetensors"]
    folder = resolve_folder(path_or_id, files + [f"{subfolder}/{f}" for f in files])
    if os.path.isdir(os.path.join(folder, subfolder)):
        folder = os.path.join(folder, subfolder)
    return read_json(os.path.join(folder, "config.json")), read_safetensors(folder, stem=stem)
