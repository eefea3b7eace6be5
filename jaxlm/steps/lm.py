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

from jaxlm import logprobs, losses
from jaxlm.steps import accumulate
from jaxlm.train_state import TrainState

Batch = dict[str, jax.Array]


def lm_loss(model, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(sum of per-token cross-entropies, number of target tokens) for one batch.

    The head runs in chunks where the logits are large (`jaxlm.logprobs.next_token_log_probs`);
    per token −log p is `losses.token_cross_entropy`'s logsumexp − target logit, exactly.
    """
    targets, weights = losses.next_token_targets(batch["tokens"], batch["segment_ids"], batch["loss_mask"])
    logp, _ = logprobs.next_token_log_probs(model, params, batch["tokens"], batch["positions"], batch["segment_ids"],
                                            targets)
    return jnp.sum(jnp.where(weights > 0, -logp * weights, 0.0)), jnp.sum(weights)


def make_train_step(model, optimizer: optax.GradientTransformation, schedule: optax.Schedule | None = None,
                    *, grad_accum: int = 1) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """step(state, batch) -> (state, metrics); jit it with donation and shardings (see experiments)."""
    grad_fn = jax.value_and_grad(lambda p, b: lm_loss(model, p, b), has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
        (loss_sum, count), grads = accumulate.summed_value_and_grad(grad_fn, state.params, batch, grad_accum)
        state, denom, metrics = accumulate.apply_mean_gradients(state, optimizer, grads, count, schedule)
        return state, {"loss": loss_sum / denom, "tokens": count, **metrics}

    return step


def make_eval_step(model) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
    """eval_step(params, batch) -> (loss_sum, count); sum over batches, then divide."""
    return lambda params, batch: lm_loss(model, params, batch)
