"""Repo-root conftest: puts the root on sys.path (for `configs/`) and keeps every test offline."""
import json
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One XLA compilation cache for the whole run, shared by the xdist workers and the `python -m diffchat_jax.main`
# processes the end-to-end tests start: the same tiny steps are compiled by many tests and processes, and a cache
# hit skips XLA (a PPO run starts in ~20 s instead of ~50 s). Keys are the HLO, the flags and the JAX version, so a
# hit is the same executable. The first process (pytest, or xdist's controller: its workers inherit the variable)
# makes a fresh directory, so runs stay apart, and removes it at the end.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="diffchat-jax-test-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


# The notebooks (colabs/, run by nbmake): Jupyter's and IPython's own folders, and the notebooks' outputs, in a
# temporary folder, not the user's home or the repository.
_NOTEBOOK_DIR = tempfile.mkdtemp(prefix="diffchat-jax-test-notebooks-")
for _name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
    os.environ.setdefault(_name, os.path.join(_NOTEBOOK_DIR, _name.lower()))
os.environ.setdefault("DIFFCHAT_NOTEBOOK_DIR", os.path.join(_NOTEBOOK_DIR, "work"))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Test files with the most `slow` tests run first (each file's tests kept together and in order, so module
    fixtures are built once): with xdist worksteal (.ci/run), long tests start early and
    the run ends on short ones instead of one worker finishing a long end-to-end run while the other waits."""
    slow = {}
    for item in items:
        if item.fspath.ext == ".ipynb":  # each notebook is a minute or more of real runs
            item.add_marker(pytest.mark.slow)
        slow[item.fspath] = slow.get(item.fspath, 0) + (item.get_closest_marker("slow") is not None)
    order = {path: rank for rank, path in enumerate(dict.fromkeys(item.fspath for item in items))}
    items.sort(key=lambda item: (-slow[item.fspath], order[item.fspath]))


def pytest_unconfigure(config):
    """The process that made the run's compilation cache removes it."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    shutil.rmtree(_NOTEBOOK_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_sft_run(tmp_path_factory):
    """(workdir, console output) of the uninterrupted tiny SFT run, `main --config=configs/sft.py:tiny` with
    helpers.TINY_SFT_FLAGS (104 steps): the reference of SFT's kill/resume test and the start of the PPO tests."""
    from tests import helpers

    def make(workdir):
        out, _ = helpers.start_main("configs/sft.py:tiny", workdir, *helpers.TINY_SFT_FLAGS).communicate(timeout=900)
        assert "transformers export:" in out, out
        (workdir / "console.txt").write_text(out, encoding="utf-8")

    workdir = helpers.once_per_run(tmp_path_factory, "tiny_sft", make)
    return workdir, (workdir / "console.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_model_paths(tmp_path_factory) -> dict[str, str]:
    """`python -m diffchat_jax.tiny_models` (tiny random SD pipeline + scorers), once per run: name -> path."""
    from diffchat_jax import tiny_models
    from tests import helpers

    def make(folder):
        (folder / "paths.json").write_text(json.dumps(tiny_models.build(str(folder / "models"))))

    return json.loads((helpers.once_per_run(tmp_path_factory, "tiny_models", make) / "paths.json").read_text())


@pytest.fixture(scope="session")
def tiny_sd(tiny_model_paths) -> str:
    """The random tiny SD 1.x pipeline folder in the diffusers layout (diffchat_jax.diffusion.tiny, size "tiny")."""
    return tiny_model_paths["sd"]


@pytest.fixture(scope="session")
def tiny_ip2p(tiny_model_paths) -> str:
    """The random tiny InstructPix2Pix pipeline folder in the diffusers layout (diffchat_jax.diffusion.tiny)."""
    return tiny_model_paths["ip2p"]


@pytest.fixture(scope="session")
def sft_dir(tiny_sft_run) -> str:
    """The tiny SFT model to start PPO from (the 8-epoch run above: PPO only needs a sensible start)."""
    return str(tiny_sft_run[0])


@pytest.fixture(scope="session")
def tiny_models(tiny_model_paths) -> dict[str, str]:
    """The tiny random SD pipeline and scorers of `python -m diffchat_jax.tiny_models`, as the one config override
    ppo.py:tiny needs (`tiny_models`: the folder; the five model paths follow it)."""
    return {"tiny_models": os.path.dirname(tiny_model_paths["sd"])}
