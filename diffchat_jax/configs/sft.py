"""Supervised fine-tuning on InstructPE (paper section 3.2; Table 3 column SFT).

  python -m diffchat_jax.main --config=configs/sft.py --config.data.train=/path/to/instructpe.json
  python -m diffchat_jax.main --config=configs/sft.py:tiny      # tiny random BLOOM on the shipped sample, CPU
"""
import ml_collections

from diffchat_jax.configs import base
from diffchat_jax.errors import ConfigError
from diffchat_jax.data import SAMPLE_PATH


def get_config(arg=None):
    c = base.get_config()
    c.mode = "sft"
    c.train = ml_collections.ConfigDict()
    c.train.epochs = 3
    c.train.batch_size = 64  # global batch (all devices, all accumulation micro-batches)
    c.train.grad_accum = 1  # micro-batches per update: batch_size / grad_accum examples per forward pass
    c.train.lr = 2e-5
    c.train.warmup_steps = 100
    c.train.min_lr_ratio = 0.0  # cosine decays to lr * min_lr_ratio
    c.train.weight_decay = 0.0
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.eps = 1e-8
    c.train.grad_clip = 1.0  # global-norm clipping; 0 disables
    c.train.logprob_chunk = 32  # positions per LM-head chunk in the loss: the [B, chunk, V] logits are the peak

    if arg == "tiny":
        c.model.name_or_path = ""
        c.model.random = ml_collections.ConfigDict({"n_layer": 2, "hidden_size": 64, "n_head": 4})
        c.model.compute_dtype = "float32"
        c.tokenizer.train_vocab_size = 1024
        c.data.train = SAMPLE_PATH
        c.data.eval_fraction = 0.1
        c.data.max_length = 192
        c.train.epochs = 25
        c.train.batch_size = 16
        c.train.lr = 3e-3
        c.train.warmup_steps = 20
        c.log_every = 20
        c.eval_every = 100
        c.checkpoint_every = 100
    elif arg:
        raise ConfigError(f"--config=configs/sft.py: unknown variant {arg!r}; known: 'tiny'")
    return c
