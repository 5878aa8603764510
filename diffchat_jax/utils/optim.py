"""The one optimizer recipe of both trainers: global-norm clipping, then AdamW with warm-up + cosine decay."""
import jax
import optax


def make_schedule(section, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to section.lr, then cosine decay to lr * min_lr_ratio at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=section.lr, warmup_steps=min(section.warmup_steps, max(total_steps - 1, 0)),
        decay_steps=max(total_steps, 1), end_value=section.lr * section.min_lr_ratio)


def make_optimizer(section, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW (b1, b2, eps, decoupled weight decay on matrices only, not biases or norms) after clipping.

    `section` is a config section with lr, warmup_steps, min_lr_ratio, b1, b2, eps, weight_decay, grad_clip
    (config.train for SFT, config.ppo for PPO).
    """
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(schedule, b1=section.b1, b2=section.b2, eps=section.eps,
                        weight_decay=section.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(section.grad_clip), adamw) if section.grad_clip > 0 else adamw
