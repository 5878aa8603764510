"""Supervised fine-tuning (paper section 3.2, eq. 1): cross-entropy on the target-prompt tokens y only.

`train_and_evaluate(config, workdir)` is the whole job: data -> tokenizer -> model -> jitted data-parallel
steps with periodic eval, metrics and orbax checkpoints (resumed automatically) -> export in transformers format.
"""
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax.training import train_state

from diffchat_jax.data import examples as examples_lib
from diffchat_jax.data import tokenize as tokenize_lib
from diffchat_jax.data import tokenizer as tokenizer_lib
from diffchat_jax.models import bloom
from diffchat_jax.utils import checkpoint, mesh as mesh_lib, metrics as metrics_lib, optim
from diffchat_jax.utils.batching import split_microbatches
from diffchat_jax.utils.validate import require, one_of

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


# ---------------------------------------------------------------------------------------------------------------
# Config checks.
# ---------------------------------------------------------------------------------------------------------------
def check_data_source(source: str, field: str) -> None:
    """A local file must exist; anything that is not a path-like string is taken as a hub dataset id."""
    looks_local = source.endswith(DATA_SUFFIXES) or source.startswith((".", "/", "~"))
    require(not looks_local or os.path.isfile(os.path.expanduser(source)), field, f"file not found: {source}")


def validate_config(config, num_devices: int) -> None:
    """Raises ConfigError naming the first impossible field."""
    t, d, m = config.train, config.data, config.model
    require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    require(t.epochs > 0, "train.epochs", f"must be > 0, got {t.epochs}")
    require(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    require(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    require(0 <= t.b1 < 1 and 0 <= t.b2 < 1, "train.b1/b2", f"must be in [0, 1), got {t.b1}, {t.b2}")
    require(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
    require(t.batch_size > 0 and t.batch_size % (t.grad_accum * num_devices) == 0, "train.batch_size",
            f"must be a positive multiple of grad_accum x devices = {t.grad_accum} x {num_devices}, "
            f"got {t.batch_size}")
    require(d.max_length >= 16, "data.max_length", f"must be >= 16, got {d.max_length}")
    require(0 <= d.eval_fraction < 1, "data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
    one_of(d.on_bad_row, ("skip", "error"), "data.on_bad_row")
    require(bool(d.train), "data.train", "is empty: set an InstructPE/InstructPix2Pix file or hub dataset id")
    check_data_source(d.train, "data.train")
    if d.eval:
        check_data_source(d.eval, "data.eval")
    one_of(m.compute_dtype, DTYPES, "model.compute_dtype")
    one_of(m.param_dtype, DTYPES, "model.param_dtype")
    r = m.random
    if not m.name_or_path:
        require(min(r.n_layer, r.hidden_size, r.n_head) > 0, "model.random",
                "needs n_layer, hidden_size, n_head > 0 when model.name_or_path is empty")
        require(r.hidden_size % r.n_head == 0, "model.random.hidden_size", "must be divisible by n_head")
    require(bool(m.name_or_path or config.tokenizer.name_or_path or config.tokenizer.train_vocab_size),
            "tokenizer", "needs name_or_path or train_vocab_size when the model is random")
    for field in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        require(config[field] > 0, field, f"must be > 0, got {config[field]}")


# ---------------------------------------------------------------------------------------------------------------
# Loss and steps (pure; jitted at the call site).
# ---------------------------------------------------------------------------------------------------------------
def summed_response_nll(logits, input_ids, loss_mask):
    """Sum of -log p(token) over response tokens, and their count.

    logits [B, T, V] (position t predicts token t+1); input_ids, loss_mask [B, T] (1 on y tokens and EOS).
    Returns (sum_nll, n_tokens), both float32 scalars.
    """
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), input_ids[:, 1:])
    weights = loss_mask[:, 1:].astype(jnp.float32)
    return (nll * weights).sum(), weights.sum()


def batch_nll(params, apply_fn, batch):
    logits = apply_fn({"params": params}, batch["input_ids"], batch["attention_mask"]).logits
    return summed_response_nll(logits, batch["input_ids"], batch["loss_mask"])


def train_step(state: train_state.TrainState, batch, grad_accum: int):
    """One optimizer update on a global batch, accumulating gradients over `grad_accum` micro-batches.

    The loss is the mean over all response tokens of the global batch, whatever grad_accum and the device count.
    """
    grad_fn = jax.value_and_grad(batch_nll, has_aux=True)

    def accumulate(carry, micro):
        grads, nll, count = carry
        (micro_nll, micro_count), micro_grads = grad_fn(state.params, state.apply_fn, micro)
        return (jax.tree.map(jnp.add, grads, micro_grads), nll + micro_nll, count + micro_count), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, nll, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), split_microbatches(batch, grad_accum))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    metrics = {"train_loss": nll / count, "grad_norm": optax.global_norm(grads), "response_tokens": count}
    return state.apply_gradients(grads=grads), metrics


def eval_step(params, apply_fn, batch):
    return batch_nll(params, apply_fn, batch)


# ---------------------------------------------------------------------------------------------------------------
# Set-up pieces.
# ---------------------------------------------------------------------------------------------------------------
def load_tokenizer(config, workdir: str, train_examples):
    """The configured tokenizer; for tiny configs a BPE trained on the training data, kept in the workdir."""
    if config.tokenizer.train_vocab_size:
        path = os.path.join(workdir, "tokenizer")
        if os.path.isdir(path):  # a resumed run must keep the exact same vocabulary
            return tokenizer_lib.load_tokenizer(path)
        corpus = tokenizer_lib.sample_corpus(train_examples)
        return tokenizer_lib.train_bpe_tokenizer(corpus, config.tokenizer.train_vocab_size, path)
    return tokenizer_lib.load_tokenizer(config.tokenizer.name_or_path or config.model.name_or_path)


def load_model(config, vocab_size: int, rng):
    """(module, params): a pretrained BLOOM or a random one; params in param_dtype, compute in compute_dtype."""
    m = config.model
    param_dtype, compute_dtype = DTYPES[m.param_dtype], DTYPES[m.compute_dtype]
    if m.name_or_path:
        module, params = bloom.load_pretrained(m.name_or_path, dtype=param_dtype, compute_dtype=compute_dtype)
        model_config = module.config
    else:
        model_config = bloom.BloomConfig(vocab_size=vocab_size, hidden_size=m.random.hidden_size,
                                         n_layer=m.random.n_layer, n_head=m.random.n_head, dtype=compute_dtype)
        params = jax.tree.map(lambda p: p.astype(param_dtype), bloom.init_params(model_config, rng))
    return bloom.Bloom(dataclasses.replace(model_config, remat=m.remat)), params


def tokenized_splits(config, tokenizer, train_examples, eval_examples):
    """Tokenises both splits and prints what was truncated or skipped."""
    out = []
    for name, examples in (("train", train_examples), ("eval", eval_examples)):
        tokenized, report = tokenize_lib.tokenize_examples(
            examples, tokenizer, config.data.max_length, on_overlong=config.data.on_bad_row)
        print(f"tokenized {name}: {report.summary()}")
        out.append(tokenized)
    return out


def load_splits(config):
    """(train, eval) example lists, with the load reports printed."""
    train, report = examples_lib.load_examples(
        config.data.train, on_bad_row=config.data.on_bad_row, max_chars=config.data.max_chars)
    print(f"data: {report.summary()}")
    if config.data.eval:
        evals, report = examples_lib.load_examples(
            config.data.eval, on_bad_row=config.data.on_bad_row, max_chars=config.data.max_chars)
        print(f"eval data: {report.summary()}")
        return train, evals
    return examples_lib.split_examples(train, config.data.eval_fraction, config.seed)


def padded_eval_batches(data, batch_size: int):
    """Eval batches of exactly `batch_size` rows; the last is filled with copies of row 0 with no loss weight."""
    for start in range(0, len(data.input_ids), batch_size):
        batch = {k: getattr(data, k)[start:start + batch_size] for k in ("input_ids", "attention_mask", "loss_mask")}
        missing = batch_size - len(batch["input_ids"])
        if missing:
            batch = {k: np.concatenate([v, np.repeat(v[:1], missing, axis=0)]) for k, v in batch.items()}
            batch["loss_mask"][-missing:] = 0
        yield batch


def evaluate(params, apply_fn, data, batch_size: int, mesh) -> float:
    """Mean response-token NLL over a whole split."""
    step = jax.jit(eval_step, static_argnums=1)
    total, count = 0.0, 0.0
    for batch in padded_eval_batches(data, batch_size):
        nll, n = step(params, apply_fn, mesh_lib.shard_batch(batch, mesh))
        total, count = total + float(nll), count + float(n)
    return total / max(count, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str, mesh=None) -> dict[str, float]:
    """Runs (or resumes) SFT in `workdir`; returns the first and last eval losses and the final step."""
    mesh = mesh or mesh_lib.make_mesh()
    validate_config(config, mesh.size)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0

    # ----- data and tokenizer -----
    train_examples, eval_examples = load_splits(config)
    tokenizer = load_tokenizer(config, workdir, train_examples)
    train_data, eval_data = tokenized_splits(config, tokenizer, train_examples, eval_examples)
    t = config.train
    steps_per_epoch = tokenize_lib.num_batches(len(train_data.input_ids), t.batch_size)
    require(steps_per_epoch > 0, "train.batch_size",
            f"({t.batch_size}) exceeds the {len(train_data.input_ids)} usable training examples")
    total_steps = t.epochs * steps_per_epoch
    print(f"{len(train_data.input_ids)} train / {len(eval_data.input_ids)} eval examples, {steps_per_epoch} "
          f"steps per epoch, {total_steps} steps on {mesh.size} device(s)")

    # ----- model, optimizer, state (fresh or resumed) -----
    rng = jax.random.PRNGKey(config.seed)
    module, params = load_model(config, len(tokenizer), rng)
    schedule = optim.make_schedule(t, total_steps)
    state = train_state.TrainState.create(apply_fn=module.apply, params=params,
                                          tx=optim.make_optimizer(t, schedule))
    state = mesh_lib.replicate(state, mesh)
    ckpt = checkpoint.manager(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
    state, start_step = checkpoint.restore_latest(ckpt, state)
    if start_step:
        print(f"resumed from checkpoint at step {start_step}")
    writer = metrics_lib.MetricWriter(workdir) if is_main else None
    eval_batch = t.batch_size // t.grad_accum
    p_train_step = jax.jit(train_step, static_argnums=2, donate_argnums=0)

    def run_eval(step):
        loss = evaluate(state.params, state.apply_fn, eval_data, eval_batch, mesh) if len(eval_data.input_ids) \
            else float("nan")
        if writer:
            writer.write(step, {"eval_loss": loss})
        return loss

    # ----- train loop -----
    first_eval = run_eval(start_step) if start_step == 0 else float("nan")
    last_eval, window_tokens, window_start = first_eval, 0.0, time.perf_counter()
    with tqdm.tqdm(total=total_steps, initial=start_step, desc="sft", disable=not is_main) as bar:
        for step in range(start_step + 1, total_steps + 1):
            epoch, index = divmod(step - 1, steps_per_epoch)
            if index == 0 or step == start_step + 1:  # a new epoch, or resuming mid-epoch where it stopped
                batches = tokenize_lib.batches(train_data, t.batch_size, seed=config.seed, epoch=epoch, start=index)
            batch = next(batches)
            batch = {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}
            state, metrics = p_train_step(state, mesh_lib.shard_batch(batch, mesh), t.grad_accum)
            window_tokens += float(batch["attention_mask"].sum())
            bar.update(1)
            if step % config.log_every == 0 or step == total_steps:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - window_start
                if writer:
                    writer.write(step, {"train_loss": metrics["train_loss"], "grad_norm": metrics["grad_norm"],
                                        "lr": schedule(step - 1),
                                        "tokens_per_s": window_tokens / elapsed, "epoch": epoch})
                window_tokens, window_start = 0.0, time.perf_counter()
            if step % config.eval_every == 0 or step == total_steps:
                last_eval = run_eval(step)
            if step % config.checkpoint_every == 0 or step == total_steps:
                checkpoint.save(ckpt, step, state)
    ckpt.wait_until_finished()

    # ----- export -----
    export_dir = os.path.join(workdir, "export")
    if is_main:
        params = jax.device_get(state.params)
        bloom.save_pretrained(module.config, params, export_dir)
        tokenizer.save_pretrained(export_dir)
        writer.close()
        print(f"checkpoints: {ckpt.directory}\nmetrics (TensorBoard + metrics.jsonl): {workdir}\n"
              f"transformers export: {export_dir}")
    return {"first_eval_loss": first_eval, "eval_loss": last_eval, "step": total_steps}
