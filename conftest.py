"""Repo-root conftest: puts the root on sys.path (for `configs/`) and keeps every test offline."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    """A random tiny SD 1.x pipeline folder in the diffusers layout (diffchat_jax.diffusion.tiny), once per worker."""
    from diffchat_jax.diffusion import tiny
    return tiny.build_pipeline(str(tmp_path_factory.mktemp("tiny_sd")), "tiny")
