"""Checkpoint files shared by the model converters: hub ids -> local paths, safetensors folders, PyTorch files.

Every reader returns numpy arrays keyed by the checkpoint's own tensor names; the converters rename them.
"""
import json
import os
from typing import Callable

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


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")
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


def check_params(params, expected, name: Callable[[tuple[str, ...]], str], model: str) -> None:
    """Raise naming the tensors (`name(flax_path)`) that are missing, unexpected or of the wrong shape."""
    got, want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(expected)
    problems = [f"missing tensor {name(p)}" for p in want if p not in got]
    problems += [f"unexpected tensor {name(p)}" for p in got if p not in want]
    problems += [f"{name(p)} has shape {got[p].shape}, expected {want[p].shape}"
                 for p in want if p in got and got[p].shape != want[p].shape]
    if problems:
        raise ValueError(f"checkpoint does not match the {model} config: " + "; ".join(problems))
