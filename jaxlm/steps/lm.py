"""The language-modelling step, shared by pretraining and SFT: next-token loss over `loss_mask`.

Pretraining and SFT differ only in their data: in SFT the loss mask covers the assistant's
tokens and its closing EOS, in pretraining every real token but each document's first.
Gradient accumulation splits the batch into microbatches and sums per-token losses, so the
update is the same as one big batch (token-level normalisation: 1×8 equals 8×1 exactly up to
float summation order).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxlm import losses
from jaxlm.train_state import TrainState

Batch = dict[str, jax.Array]


def lm_loss(model, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(sum of per-token cross-entropies, number of target tokens) for one batch."""
    out = model.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    targets, weights = losses.next_token_targets(batch["tokens"], batch["segment_ids"], batch["loss_mask"])
    return losses.token_cross_entropy(out.logits, targets, weights)


def _split_microbatches(batch: Batch, n: int) -> Batch:
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows cannot be split into {n} microbatches")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return jax.tree.map(split, batch)


def make_train_step(model, optimizer: optax.GradientTransformation, schedule: optax.Schedule | None = None,
                    *, grad_accum: int = 1) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """step(state, batch) -> (state, metrics); jit it with donation and shardings (see experiments)."""
    grad_fn = jax.value_and_grad(lambda p, b: lm_loss(model, p, b), has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
        if grad_accum == 1:
            (loss_sum, count), grads = grad_fn(state.params, batch)
        else:
            def body(acc, micro):
                (l, c), g = grad_fn(state.params, micro)
                return jax.tree.map(jnp.add, acc, (l, c, g)), None
            zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                     jax.tree.map(jnp.zeros_like, state.params))
            (loss_sum, count, grads), _ = jax.lax.scan(body, zeros, _split_microbatches(batch, grad_accum))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / denom, "tokens": count, "grad_norm": optax.tree.norm(grads)}
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def make_eval_step(model) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
    """eval_step(params, batch) -> (loss_sum, count); sum over batches, then divide."""
    return lambda params, batch: lm_loss(model, params, batch)
