"""The reward-model step: Bradley-Terry on preference pairs, with a scalar head on the trunk.

For each pair the model scores both sides (`ScalarHeadModel.score`: the head read at the last
real token), and the loss is `losses.bradley_terry_loss` on Δ = r_chosen - r_rejected:

    hard labels:  -log σ(Δ - m)                         (m = margin; 0 = InstructGPT)
    soft labels:  -p log σ(Δ - m) - (1 - p) log σ(-Δ - m) (p = batch["label"], AI feedback; symmetric)

Both sides go through the trunk in one forward pass ([2B, T]): half the dispatches, and the
same numbers as two passes (rows never interact). Padding rows (`weight` 0) count nowhere.
The loss is normalised per pair over the whole batch, so gradient accumulation is exact.

Metrics: loss, accuracy (share of pairs with r_c > r_r; ties count as wrong, so a zero head
has accuracy 0), mean chosen and rejected reward, their mean margin, grad norm, learning rate.

Left out: per-pair margins from rating gaps (pass `margin` as an array in the batch if you
need them: the loss function takes [B]), reward centring terms (Eisenstein et al.), ensembles.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxlm import losses
from jaxlm.steps import accumulate
from jaxlm.train_state import TrainState

Batch = dict[str, jax.Array]
METRICS = ("loss", "accuracy", "chosen_reward", "rejected_reward", "margin")


def pair_scores(rm, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(chosen rewards [B], rejected rewards [B]) from one forward pass over both sides."""
    both = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
            for k in ("tokens", "positions", "segment_ids")}
    scores = rm.score(params, both["tokens"], both["positions"], both["segment_ids"])
    b = batch["chosen_tokens"].shape[0]
    return scores[:b], scores[b:]


def preference_loss(rm, params, batch: Batch, *, margin: float = 0.0, soft_labels: bool = False
                    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(loss_sum, number of pairs, sums of the metrics) for one preference batch.

    `batch` as made by `jaxlm.data.preferences`; `batch["margin"]` [B], if present, is used
    instead of the scalar `margin`. With `soft_labels`, `batch["label"]` is P(chosen wins).
    """
    chosen, rejected = pair_scores(rm, params, batch)
    weight = batch["weight"] if "weight" in batch else jnp.ones_like(chosen)
    loss_sum, count, aux = losses.bradley_terry_loss(
        chosen, rejected, margin=batch.get("margin", margin), label=batch["label"] if soft_labels else None,
        weights=weight)
    w = jnp.asarray(weight, jnp.float32)
    sums = {"loss": jax.lax.stop_gradient(loss_sum), "accuracy": jnp.sum(w * aux["accuracy"]),
            "chosen_reward": jnp.sum(w * jax.lax.stop_gradient(chosen)),
            "rejected_reward": jnp.sum(w * jax.lax.stop_gradient(rejected)),
            "margin": jnp.sum(w * aux["margin"])}  # METRICS, each a sum over real pairs
    return loss_sum, count, sums


def make_train_step(rm, optimizer: optax.GradientTransformation, schedule: optax.Schedule | None = None, *,
                    margin: float = 0.0, soft_labels: bool = False, grad_accum: int = 1
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """step(state, batch) -> (state, metrics), metrics averaged over the batch's real pairs."""

    def loss_fn(params, batch):
        loss_sum, count, sums = preference_loss(rm, params, batch, margin=margin, soft_labels=soft_labels)
        return loss_sum, (count, sums)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
        (_, (count, sums)), grads = accumulate.summed_value_and_grad(grad_fn, state.params, batch, grad_accum)
        state, denom, metrics = accumulate.apply_mean_gradients(state, optimizer, grads, count, schedule)
        metrics.update({k: v / denom for k, v in sums.items()}, pairs=count)
        return state, metrics

    return step


def make_eval_step(rm, *, margin: float = 0.0, soft_labels: bool = False
                   ) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """eval_step(params, batch) -> sums {loss, accuracy, chosen_reward, rejected_reward, margin, pairs};
    add them over batches, then `finish_eval` divides by `pairs`."""

    def eval_step(params, batch):
        _, count, sums = preference_loss(rm, params, batch, margin=margin, soft_labels=soft_labels)
        return {**sums, "pairs": count}

    return eval_step


# Means over pairs from summed eval outputs: {loss, accuracy, chosen_reward, rejected_reward, margin, pairs}.
finish_eval = accumulate.means_from_sums

