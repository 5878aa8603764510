"""PyTorch, the optional run-time dependency: every import of torch outside tests and benchmarks goes through here.

torch reads .pth/.ckpt/.pt checkpoints (the LAION aesthetic MLP, HPS, old single-file SD checkpoints) and builds the
tiny random models (`python -m diffchat_jax.tiny_models`). It is the `torch` extra of setup.py, pinned because an
unpinned torch resolves to a multi-GB CUDA build.
"""
from diffchat_jax import errors

TORCH_REQUIREMENT = "torch==2.13.0"  # setup.py's `torch` extra (tests/test_input_errors_models.py keeps them equal)


class MissingPyTorch(errors.UserError, ImportError):
    """PyTorch is not installed; still an ImportError for callers that fall back without it."""


def require_torch(what: str):
    """The torch module; MissingPyTorch saying how to install it when it is not there. what: the task that needs it,
    as the start of a sentence ("reading /x/model.ckpt")."""
    try:
        import torch
    except ImportError as e:
        raise MissingPyTorch(f"{what} needs PyTorch: pip install 'diffchat_jax[torch]' ({TORCH_REQUIREMENT})") from e
    return torch
