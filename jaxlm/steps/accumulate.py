"""Exact gradient accumulation, shared by the step functions that normalise by a count.

Every loss here returns a *sum* over real items (tokens, pairs) and the count of those items
(DESIGN.md: losses return sums and counts). Summing gradients and counts over microbatches and
dividing once at the end gives the same update as one big batch, whatever the padding, which a
mean of per-microbatch means would not. Evaluation does the same over batches: add the eval
step's sums, then divide once (`means_from_sums`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

Batch = dict[str, jax.Array]


def split_microbatches(batch: Batch, n: int) -> Batch:
    """[B, ...] arrays -> [n, B / n, ...], for `lax.scan` over microbatches."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows cannot be split into {n} microbatches")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return jax.tree.map(split, batch)


def summed_value_and_grad(grad_fn: Callable, params, batch: Batch, grad_accum: int, *args) -> tuple[Any, Any]:
    """`grad_fn(params, batch, *args) -> ((loss, aux), grads)` summed over `grad_accum` microbatches.

    `grad_fn` is `jax.value_and_grad(loss_fn, has_aux=True)` of a loss whose value and aux are
    sums; the result is ((loss, aux), grads), each summed, from one `lax.scan`.
    """
    if grad_accum == 1:
        return grad_fn(params, batch, *args)
    micro = split_microbatches(batch, grad_accum)

    def body(acc, mb):
        return jax.tree.map(jnp.add, acc, grad_fn(params, mb, *args)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first, *args))
    total, _ = jax.lax.scan(body, zeros, micro)
    return total


def apply_mean_gradients(state, optimizer: optax.GradientTransformation, grads, count: jax.Array,
                         schedule: optax.Schedule | None = None) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
    """Divide summed `grads` by `count` (at least 1), apply them; returns (state, denominator,
    {grad_norm[, learning_rate]}) so the caller divides its metric sums by the same denominator."""
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"grad_norm": optax.tree.norm(grads)}
    if schedule is not None:
        metrics["learning_rate"] = schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), denom, metrics


def means_from_sums(totals: dict[str, float], count_key: str = "pairs") -> dict[str, float]:
    """Means from eval outputs summed over batches: every entry divided by `totals[count_key]`
    (at least 1), which is kept as it is (e.g. the reward and DPO eval steps' `pairs`)."""
    count = max(float(totals[count_key]), 1.0)
    return {**{k: float(v) / count for k, v in totals.items() if k != count_key}, count_key: float(totals[count_key])}
