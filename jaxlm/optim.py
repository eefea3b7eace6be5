"""Optimizers: AdamW with linear warm-up, cosine decay and global-norm clipping.

The chain is the one nanoGPT, MaxText and the Llama papers use. Norm scales and biases are not
decayed: decaying them only pulls the model towards a degenerate solution and helps nothing.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

_NO_DECAY_NAMES = ("scale", "q_bias", "k_bias", "v_bias", "bias")


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: everything but norm scales and biases."""
    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return name not in _NO_DECAY_NAMES and not name.endswith("_bias")
    return jax.tree_util.tree_map_with_path(decays, params)


def make_schedule(*, learning_rate: float, warmup_steps: int, total_steps: int,
                  min_learning_rate_ratio: float = 0.1) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate`, then cosine decay to `ratio · learning_rate`."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=learning_rate * min_learning_rate_ratio)


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int, min_learning_rate_ratio: float = 0.1,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1,
                   grad_clip: float = 1.0) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decoupled decay on matrices only) after global-norm clipping; returns (tx, schedule)."""
    schedule = make_schedule(learning_rate=learning_rate, warmup_steps=warmup_steps, total_steps=total_steps,
                             min_learning_rate_ratio=min_learning_rate_ratio)
    parts = []
    if grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def from_config(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Build from an `optim` ConfigDict section (see experiments/configs)."""
    return make_optimizer(learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
                          min_learning_rate_ratio=cfg.min_learning_rate_ratio, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                          weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
