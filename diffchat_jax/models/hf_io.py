"""Checkpoint files shared by the model converters: hub ids -> local paths, safetensors folders, PyTorch files.

Every reader returns numpy arrays keyed by the checkpoint's own tensor names; the converters rename them.
"""
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file


def resolve_folder(path_or_id: str, allow_patterns: list[str]) -> str:
    """A local folder as is; a hub id (`owner/name`) is downloaded, only the files matching allow_patterns."""
    folder = os.fspath(path_or_id)
    if os.path.isdir(folder):
        return folder
    if os.path.isabs(folder) or folder.startswith("."):
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    from huggingface_hub import snapshot_download  # only for hub ids
    return snapshot_download(folder, allow_patterns=allow_patterns)


def resolve_file(path_or_hub_file: str) -> str:
    """A local file as is; `owner/name/path/in/repo` is fetched from the hub with hf_hub_download."""
    path = os.fspath(path_or_hub_file)
    if os.path.exists(path):
        return path
    parts = path.split("/")
    if os.path.isabs(path) or path.startswith(".") or len(parts) < 3:
        raise FileNotFoundError(f"{path} is neither a local file nor a hub file `owner/name/file`")
    from huggingface_hub import hf_hub_download  # only for hub files
    try:
        return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
    except Exception as e:  # offline, no such repo or file: say that the local path was tried too
        raise FileNotFoundError(f"{path} is not a local file and could not be fetched from the hub: {e}") from e


def read_safetensors(folder: str, stem: str = "model") -> dict[str, np.ndarray]:
    """{stem}.safetensors, or the shards listed in {stem}.safetensors.index.json (transformers names its files
    `model`, diffusers `diffusion_pytorch_model`)."""
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, f"{stem}.safetensors")):
        files = [f"{stem}.safetensors"]
    else:
        raise FileNotFoundError(f"no {stem}.safetensors or {stem}.safetensors.index.json in {folder}")
    state = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint shard {path} is missing")
        state.update(load_file(path))
    return state


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """A PyTorch state dict (.pt/.pth/.bin), optionally wrapped as {"state_dict": ...}, as float32 numpy.

    Loaded with `weights_only=True`: tensors and plain containers only, never arbitrary pickled objects.
    Non-tensor entries (e.g. an epoch counter next to the state dict) are dropped.
    """
    import torch  # only for PyTorch files
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k: v.float().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}


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
    """Raise naming the tensors (`name(flax_path)`) that are missing, unexpected or of the wrong shape."""
    got, want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(expected)
    problems = [f"missing tensor {name(p)}" for p in want if p not in got]
    problems += [f"unexpected tensor {name(p)}" for p in got if p not in want]
    problems += [f"{name(p)} has shape {got[p].shape}, expected {want[p].shape}"
                 for p in want if p in got and got[p].shape != want[p].shape]
    if problems:
        raise ValueError(f"checkpoint does not match the {model} config: " + "; ".join(problems))


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
        raise ValueError(f"unexpected tensor {key!r} in a {model} checkpoint")
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
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} is missing")
    with open(config_path) as f:
        config = json.load(f)
    return config, read_safetensors(folder, stem=stem)
