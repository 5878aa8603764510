"""Supervised fine-tuning (paper section 3.2, eq. 1): cross-entropy on the target-prompt tokens y only.

`train_and_evaluate(config, workdir)` is the whole job: data -> tokenizer -> model -> jitted data-parallel
steps (made once by `make_steps`) in the shared loop (diffchat_jax.train.loop: periodic eval, metrics, orbax
checkpoints, resumed automatically) -> export in transformers format.
"""
import dataclasses
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from diffchat_jax.data import examples as examples_lib
from diffchat_jax.data import tokenize as tokenize_lib
from diffchat_jax.data import tokenizer as tokenizer_lib
from diffchat_jax.models import bloom
from diffchat_jax.rl import logprobs
from diffchat_jax.train import loop, run_config
from diffchat_jax.utils import aot, mesh as mesh_lib, metrics as metrics_lib, optim
from diffchat_jax.utils.batching import split_microbatches
from diffchat_jax.utils.validate import DTYPES, check_data_source, check_model_source, one_of, require

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")


# ---------------------------------------------------------------------------------------------------------------
# Config checks.
# ---------------------------------------------------------------------------------------------------------------
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
    if m.name_or_path:
        check_model_source(m.name_or_path, "model.name_or_path", "a transformers BLOOM folder or hub id")
    else:
        require(min(r.n_layer, r.hidden_size, r.n_head) > 0, "model.random",
                "needs n_layer, hidden_size, n_head > 0 when model.name_or_path is empty")
        require(r.hidden_size % r.n_head == 0, "model.random.hidden_size", "must be divisible by n_head")
    require(bool(m.name_or_path or config.tokenizer.name_or_path or config.tokenizer.train_vocab_size),
            "tokenizer", "needs name_or_path or train_vocab_size when the model is random")
    for field in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        require(config[field] > 0, field, f"must be > 0, got {config[field]}")
    require(t.logprob_chunk >= 1, "train.logprob_chunk", f"must be >= 1, got {t.logprob_chunk}")
    require(config.memory_limit_gib >= 0, "memory_limit_gib",
            f"must be >= 0 (0 = no check), got {config.memory_limit_gib}")


# ---------------------------------------------------------------------------------------------------------------
# Loss and steps (pure; jitted once by make_steps).
# ---------------------------------------------------------------------------------------------------------------
def summed_response_nll(hidden, embedding, input_ids, loss_mask, *, dtype, chunk: int):
    """Sum of -log p(token) over response tokens, and their count, through the tied LM head in chunks of `chunk`
    positions (diffchat_jax.rl.logprobs: [B, T, V] logits never exist at once).

    hidden [B, T, H] (the ln_f output; position t predicts token t+1); embedding [V, H]; input_ids, loss_mask
    [B, T] (1 on y tokens and EOS). Returns (sum_nll, n_tokens), both float32 scalars.
    """
    logp, _ = logprobs.token_logprobs(hidden[:, :-1], embedding, input_ids[:, 1:], dtype=dtype, chunk=chunk)
    weights = loss_mask[:, 1:].astype(jnp.float32)
    return -(logp * weights).sum(), weights.sum()


def batch_nll(params, module: bloom.Bloom, batch, chunk: int):
    out = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"], head=False)
    return summed_response_nll(out.hidden, params["word_embeddings"]["embedding"], batch["input_ids"],
                               batch["loss_mask"], dtype=module.config.dtype, chunk=chunk)


def make_train_step(module: bloom.Bloom, grad_accum: int, chunk: int):
    """train_step(state, batch) -> (state, metrics): one optimizer update on a global batch, accumulating
    gradients over `grad_accum` micro-batches. The loss is the mean over all response tokens of the global batch,
    whatever grad_accum and the device count."""
    grad_fn = jax.value_and_grad(lambda params, micro: batch_nll(params, module, micro, chunk), has_aux=True)

    def train_step(state: train_state.TrainState, batch):
        def accumulate(carry, micro):
            grads, nll, count = carry
            (micro_nll, micro_count), micro_grads = grad_fn(state.params, micro)
            return (jax.tree.map(jnp.add, grads, micro_grads), nll + micro_nll, count + micro_count), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, nll, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), split_microbatches(batch, grad_accum))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        metrics = {"train_loss": nll / count, "grad_norm": optax.global_norm(grads), "response_tokens": count}
        return state.apply_gradients(grads=grads), metrics

    return train_step


class Steps(NamedTuple):
    train: object  # (state, batch) -> (state, metrics); donates state
    eval: object  # (params, batch) -> (sum_nll, n_tokens)


def make_steps(module: bloom.Bloom, grad_accum: int, chunk: int, mesh, state: train_state.TrainState) -> Steps:
    """Both steps, jitted once with explicit shardings (state as mesh.param_shardings gives it, batches split
    over the mesh, metrics replicated); `state` (arrays or ShapeDtypeStructs) gives the tree's shapes."""
    state_shardings = mesh_lib.param_shardings(state, mesh)
    data, scalar = mesh_lib.data_sharded(mesh), mesh_lib.replicated(mesh)
    train = jax.jit(make_train_step(module, grad_accum, chunk), in_shardings=(state_shardings, data),
                    out_shardings=(state_shardings, scalar), donate_argnums=0)
    evaluate = jax.jit(lambda params, batch: batch_nll(params, module, batch, chunk),
                       in_shardings=(state_shardings.params, data), out_shardings=scalar)
    return Steps(train, evaluate)


def device_steps(steps: Steps, state, batch_size: int, length: int, mesh) -> list[aot.Step]:
    """The train step on abstract arguments of the real shapes (the memory report)."""
    batch = mesh_lib.shard_batch({k: jax.ShapeDtypeStruct((batch_size, length), jnp.int32) for k in BATCH_KEYS},
                                 mesh)
    return [aot.Step("train_step", steps.train, (aot.abstract(state), batch), resident=(0,))]


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
    # A pretrained model given as its SFT workdir: the tokenizer of its export/.
    return tokenizer_lib.load_tokenizer(config.tokenizer.name_or_path
                                        or bloom.resolve_model_dir(config.model.name_or_path))


def load_model(config, vocab_size: int, rng, abstract: bool = False):
    """(module, params): a pretrained BLOOM or a random one; params in param_dtype, compute in compute_dtype.
    abstract=True: the params' shapes only (jax.ShapeDtypeStructs), for the memory report."""
    m = config.model
    param_dtype, compute_dtype = DTYPES[m.param_dtype], DTYPES[m.compute_dtype]
    if m.name_or_path:
        module, params = bloom.load_pretrained(bloom.resolve_model_dir(m.name_or_path), dtype=param_dtype, compute_dtype=compute_dtype,
                                               abstract=abstract)
        model_config = module.config
    else:
        model_config = bloom.BloomConfig(vocab_size=vocab_size, hidden_size=m.random.hidden_size,
                                         n_layer=m.random.n_layer, n_head=m.random.n_head, dtype=compute_dtype)
        init = lambda: jax.tree.map(lambda p: p.astype(param_dtype), bloom.init_params(model_config, rng))
        params = jax.eval_shape(init) if abstract else init()
    return bloom.Bloom(dataclasses.replace(model_config, remat=m.remat)), params


def make_state(config, params, module: bloom.Bloom, total_steps: int, mesh) -> train_state.TrainState:
    """The train state (params, AdamW state, step) on the mesh; abstract params give an abstract state."""
    t = config.train
    tx = optim.make_optimizer(t, optim.make_schedule(t, total_steps))
    if mesh_lib.is_abstract(params):
        state = jax.eval_shape(lambda p: train_state.TrainState.create(apply_fn=module.apply, params=p, tx=tx),
                               params)
    else:
        state = train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx)
    return mesh_lib.shard_params(state, mesh)


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
        batch = {k: getattr(data, k)[start:start + batch_size] for k in BATCH_KEYS}
        missing = batch_size - len(batch["input_ids"])
        if missing:
            batch = {k: np.concatenate([v, np.repeat(v[:1], missing, axis=0)]) for k, v in batch.items()}
            batch["loss_mask"][-missing:] = 0
        yield batch


def evaluate(eval_step, params, data, batch_size: int, mesh) -> float:
    """Mean response-token NLL over a whole split."""
    total, count = 0.0, 0.0
    for batch in padded_eval_batches(data, batch_size):
        nll, n = eval_step(params, mesh_lib.shard_global(batch, mesh))
        total, count = total + float(nll), count + float(n)
    return total / max(count, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str, mesh=None, allow_config_change: bool = False) -> dict[str, float]:
    """Runs (or resumes) SFT in `workdir`; returns the first and last eval losses and the final step. A resume
    with a config that alters the run raises ConfigError unless allow_config_change."""
    mesh = mesh or mesh_lib.from_config(config)
    validate_config(config, mesh.size)
    workdir = os.path.abspath(workdir)
    changed = run_config.check_resume(config, workdir, allow_config_change)
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
          f"steps per epoch, {total_steps} steps on {mesh.size} device(s) (mesh {dict(mesh.shape)})")

    # ----- model, optimizer, steps -----
    module, params = load_model(config, len(tokenizer), jax.random.PRNGKey(config.seed))
    state = make_state(config, params, module, total_steps, mesh)
    del params
    steps = make_steps(module, t.grad_accum, t.logprob_chunk, mesh, state)
    report = aot.report(device_steps(steps, state, t.batch_size, config.data.max_length, mesh),
                        {"params": state.params, "optimizer": state.opt_state})
    loop.check_memory(report, config.memory_limit_gib)
    schedule = optim.make_schedule(t, total_steps)
    writer = metrics_lib.MetricWriter(workdir) if is_main else None
    eval_batch = t.batch_size // t.grad_accum
    evals = {"first": float("nan"), "last": float("nan")}

    def run_eval(done: int, state) -> None:
        loss = (evaluate(steps.eval, state.params, eval_data, eval_batch, mesh)
                if len(eval_data.input_ids) else float("nan"))
        evals["first" if done == 0 else "last"] = loss
        if writer:
            writer.write(done, {"eval_loss": loss})

    window = {"tokens": 0.0, "start": time.perf_counter()}
    batches = {"epoch": None, "iterator": None}

    def train_step(state, host, i, log):
        epoch, index = divmod(i, steps_per_epoch)
        if batches["epoch"] != epoch:  # a new epoch, or resuming mid-epoch where it stopped
            batches["epoch"] = epoch
            batches["iterator"] = tokenize_lib.batches(train_data, t.batch_size, seed=config.seed, epoch=epoch,
                                                       start=index)
        batch = next(batches["iterator"])
        batch = {k: batch[k] for k in BATCH_KEYS}
        state, metrics = steps.train(state, mesh_lib.shard_global(batch, mesh))  # this process's rows
        window["tokens"] += float(batch["attention_mask"].sum())
        if not log:
            return state, host, None
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - window["start"]
        logged = {"train_loss": metrics["train_loss"], "grad_norm": metrics["grad_norm"], "lr": schedule(i),
                  "tokens_per_s": window["tokens"] / elapsed, "epoch": epoch}
        window.update(tokens=0.0, start=time.perf_counter())
        return state, host, logged

    spec = loop.Loop(desc="sft", unit="step", workdir=workdir, total_steps=total_steps, log_every=config.log_every,
                     checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
                     periodic=(loop.Periodic(config.eval_every, run_eval, at_start=True),))
    run_config.save(config, workdir, changed)
    state, _ = loop.run(spec, state, {}, train_step, writer)

    # ----- export -----
    export_dir = loop.export_bloom(workdir, module.config, state.params, tokenizer)  # every process: a collective
    if is_main:
        writer.close()
        print(f"checkpoints: {os.path.join(workdir, 'checkpoints')}\nmetrics (TensorBoard + metrics.jsonl): "
              f"{workdir}\ntransformers export: {export_dir}")
    return {"first_eval_loss": evals["first"], "eval_loss": evals["last"], "step": total_steps}
