"""diffchat-jax: DiffChat (prompt rewriting for text-to-image models, SFT + PPO) in JAX/Flax."""
import setuptools

setuptools.setup(
    name="diffchat_jax",
    version="0.1.0",
    description="DiffChat in JAX/Flax: learning to chat with text-to-image models (SFT + PPO with ADM and VCI).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["diffchat_jax", "diffchat_jax.*"]),
    package_data={"diffchat_jax.data": ["sample/*.jsonl"], "diffchat_jax.llm": ["templates/*.txt"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "ml_collections>=1.1",
        "absl-py>=2.0",
        "numpy>=1.26",
        "transformers>=5.0",  # tokenizers + PyTorch references
        "tokenizers>=0.22",
        "diffusers>=0.42",
        "datasets>=4.0",
        "safetensors>=0.6",
        "huggingface_hub>=1.0",
        "nltk>=3.9",
        "textblob>=0.19",  # offline POS tagger fallback (PatternTagger)
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "tqdm>=4.66",
        "ml_dtypes>=0.5",  # bf16 tensors in safetensors files (single-file SD checkpoints)
        "pillow>=10",  # PNG files of rendered images (prompt in the metadata)
        "openai>=1.40",  # OpenAI-compatible chat endpoints (the eval's openai: system; diffchat_jax/llm)
        "matplotlib>=3.8",  # the eval's bar charts
        "gradio>=6.0",  # the chat's browser app (python -m diffchat_jax.chat --web)
    ],
    extras_require={
        # PyTorch reads .pth/.ckpt checkpoints (the LAION aesthetic MLP, HPS, old single-file SD models), builds the
        # tiny models (`python -m diffchat_jax.tiny_models`) and runs the reference models of tests and benchmarks;
        # without it those say `pip install 'diffchat_jax[torch]'` (diffchat_jax/utils/torch_dep.py, which repeats
        # the pin). The pin matters: an unpinned torch resolves to a multi-GB CUDA build on machines that have the
        # CPU wheel locally.
        "torch": ["torch==2.13.0"],
        "test": ["torch==2.13.0", "pytest>=8", "pytest-xdist>=3.5", "filelock>=3.12", "chex>=0.1.90", "nbmake>=1.5",
                 "ipykernel>=6", "playwright>=1.50"],  # playwright drives Debian's chromium (no browser download)
    },
    entry_points={"console_scripts": ["diffchat-jax=diffchat_jax.main:run"]},
)
