"""The DPO step: preference pairs → the policy's and the frozen reference's response log-probs →
the DPO family's loss (`losses.dpo_loss`: sigmoid/DPO, cDPO, robust, hinge/SLiC, IPO).

With sequence log-probs of the responses (prompt and padding excluded; the closing EOS included)

    Δ = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))
    sigmoid:  −log σ(βΔ)        (minimised by β log π/π_ref = r + const: π ∝ π_ref · exp(r/β))

Design decisions:
- **The reference is frozen by construction.** It is not in the train state: its parameters are
  a separate argument of the step (`step(state, batch, ref_params)`), read under
  `stop_gradient`, and `dpo_loss` stops gradients into its log-probs again. Or its log-probs
  come precomputed in the batch (`ref_chosen_logp`, `ref_rejected_logp`, written once by
  `reference_log_probs` over the data); then pass `ref_params=None` and the step never runs
  the reference. Both paths call the same function, so they give the same loss (tested).
- **One forward pass per model.** Chosen and rejected rows go through the model together
  ([2B, T], each pair's sides adjacent, so a sharded batch stays where it is); rows never
  interact, so it equals two passes with half the dispatches.
- **Log-probs** come from `jaxlm.logprobs` (the one place that shifts targets), at temperature 1.
- **Per-pair normalisation.** The loss is summed over real pairs (`weight` 1) and divided by
  their number over the whole batch, after gradient accumulation, so 1×8 equals 8×1.
- **Soft labels** (AI feedback: `label` = P(chosen preferred)) enter as a per-pair label
  smoothing ε = 1 − label in the sigmoid/cDPO loss, −p log σ(βΔ) − (1 − p) log σ(−βΔ): the
  cross-entropy against the label, exactly as the reward model's soft Bradley-Terry loss.
- **Length averaging** (`average_log_probs`, IPO's and SimPO's choice) divides each side's
  log-probs, policy and reference alike, by its number of response tokens. `None` (the
  default) follows the loss: on for IPO, whose target margin 1/(2β) is per token in the paper
  (Azar et al. 2023; TRL averages for IPO), off for the others (DPO's log π(y|x) is summed).
- **RPO** (`nll_weight` α > 0; Pang et al. 2024, "Iterative Reasoning Preference Optimization";
  TRL's `rpo_alpha`) adds α times the chosen response's mean per-token negative log-likelihood
  to each pair's loss. Plain DPO only pushes the margin, and on small models it typically does
  so by lowering both sides, the chosen one included (the chosen log-prob drifts down); the NLL
  term holds the chosen answer's likelihood up. α = 0 is plain DPO (the term is not built).

Metrics (means over real pairs): loss, accuracy (implicit reward of chosen > rejected),
chosen_reward = β(log π − log π_ref)(y_c), rejected_reward, margin (their difference),
chosen_logp / rejected_logp (the policy's), and grad_norm, learning_rate.

Left out: reference-free variants (SimPO, ORPO), a reference that is
periodically synced to the policy (TR-DPO), and sequence packing of pairs.
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
REF_KEYS = ("ref_chosen_logp", "ref_rejected_logp")
METRICS = ("loss", "accuracy", "chosen_reward", "rejected_reward", "margin", "chosen_logp", "rejected_logp",
           "chosen_nll")
SOFT_LABEL_TYPES = ("sigmoid", "cdpo")


def check_options(cfg: losses.DPOConfig, *, soft_labels: bool, nll_weight: float = 0.0) -> None:
    """Soft labels are a per-pair label smoothing: only for the sigmoid/cDPO loss, and not on top of one."""
    if nll_weight < 0:
        raise ValueError(f"nll_weight (RPO's alpha) must be >= 0, got {nll_weight}")
    if soft_labels and cfg.loss_type not in SOFT_LABEL_TYPES:
        raise ValueError(f"soft labels need loss_type in {SOFT_LABEL_TYPES}, got {cfg.loss_type!r}")
    if soft_labels and cfg.label_smoothing:
        raise ValueError("soft labels already set a per-pair label smoothing (1 - label); "
                         f"label_smoothing={cfg.label_smoothing} would be applied on top")


def averages_log_probs(cfg: losses.DPOConfig, average_log_probs: bool | None = None) -> bool:
    """Whether each side's log-probs are length-averaged: as given, or by default for IPO only."""
    return cfg.loss_type == "ipo" if average_log_probs is None else bool(average_log_probs)


def pair_log_probs(model, params, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(log π(y_c) [B], log π(y_r) [B], response tokens of y_c [B], of y_r [B]), one forward pass.

    `batch` as made by `jaxlm.data.preferences` (chosen_* and rejected_* rows).
    """
    b = batch["chosen_tokens"].shape[0]
    # Pair i's two sides in rows 2i and 2i + 1 (not chosen rows then rejected rows): a pair stays on
    # the device that holds it under a batch-sharded mesh, so no all-to-all moves rows to and fro.
    both = {k: jnp.stack([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=1).reshape(2 * b, -1)
            for k in ("tokens", "positions", "segment_ids", "loss_mask")}  # [2B, T]
    logp = logprobs.response_log_probs(model, params, both["tokens"], both["positions"], both["segment_ids"],
                                       both["loss_mask"])  # [2B, T], 0 off the response
    seq = jnp.sum(logp, axis=-1).reshape(b, 2)
    count = jnp.sum(logprobs.target_mask(both["segment_ids"], both["loss_mask"]), axis=-1).reshape(b, 2)
    return seq[:, 0], seq[:, 1], count[:, 0], count[:, 1]


def reference_log_probs(model, ref_params, batch: Batch) -> dict[str, jax.Array]:
    """{ref_chosen_logp [B], ref_rejected_logp [B]}: the frozen reference's response log-probs.

    Jit it to precompute them once over the data; the step calls it when the batch lacks them.
    """
    chosen, rejected, _, _ = pair_log_probs(model, jax.lax.stop_gradient(ref_params), batch)
    return {"ref_chosen_logp": chosen, "ref_rejected_logp": rejected}


def pair_terms(model, params, batch: Batch, ref_params, cfg: losses.DPOConfig, *, soft_labels: bool = False,
               average_log_probs: bool | None = None, nll_weight: float = 0.0, reference_model=None
               ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(loss_sum, number of real pairs, per-pair terms [B]) for one preference batch.

    The reference log-probs are `batch["ref_chosen_logp"]`/`["ref_rejected_logp"]` if present,
    else computed with `ref_params` by `reference_model` (default `model`; LoRA's reference is the
    plain model on the base, the adapters off). Per-pair terms: `losses.dpo_loss`'s aux (loss,
    chosen_rewards, rejected_rewards, accuracy, margin) plus `delta` (Δ), `chosen_logp`,
    `rejected_logp` (the policy's, summed or length-averaged as the loss used them) and
    `chosen_nll` (mean per-token negative log-likelihood of the chosen response); with
    `nll_weight` α > 0 the loss is the DPO loss plus α · chosen_nll per pair (RPO).
    """
    check_options(cfg, soft_labels=soft_labels, nll_weight=nll_weight)
    chosen, rejected, n_chosen, n_rejected = pair_log_probs(model, params, batch)
    chosen_nll = -chosen / jnp.maximum(n_chosen, 1.0)
    if all(k in batch for k in REF_KEYS):
        ref = {k: batch[k] for k in REF_KEYS}
    elif ref_params is None:
        raise ValueError(f"the batch has no precomputed {REF_KEYS} and no reference parameters were given")
    else:
        ref = reference_log_probs(reference_model or model, ref_params, batch)
    ref_chosen, ref_rejected = (jnp.asarray(ref[k], jnp.float32) for k in REF_KEYS)
    if averages_log_probs(cfg, average_log_probs):
        chosen, ref_chosen = chosen / jnp.maximum(n_chosen, 1.0), ref_chosen / jnp.maximum(n_chosen, 1.0)
        rejected, ref_rejected = rejected / jnp.maximum(n_rejected, 1.0), ref_rejected / jnp.maximum(n_rejected, 1.0)
    smoothing = 1.0 - jnp.asarray(batch["label"], jnp.float32) if soft_labels else cfg.label_smoothing
    weight = batch["weight"] if "weight" in batch else jnp.ones_like(chosen)
    loss_sum, count, aux = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=cfg.beta,
                                           loss_type=cfg.loss_type, label_smoothing=smoothing, weights=weight)
    if nll_weight:
        loss_sum = loss_sum + nll_weight * jnp.sum(jnp.where(weight > 0, weight * chosen_nll, 0.0))
        aux["loss"] = aux["loss"] + nll_weight * jax.lax.stop_gradient(chosen_nll)
    delta = jax.lax.stop_gradient((chosen - ref_chosen) - (rejected - ref_rejected))
    terms = {**aux, "delta": delta, "chosen_logp": jax.lax.stop_gradient(chosen),
             "rejected_logp": jax.lax.stop_gradient(rejected), "chosen_nll": jax.lax.stop_gradient(chosen_nll)}
    return loss_sum, count, terms


def batch_loss(model, params, batch: Batch, ref_params, cfg: losses.DPOConfig, **options
               ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(loss_sum, number of real pairs, {METRICS: sums over real pairs})."""
    loss_sum, count, t = pair_terms(model, params, batch, ref_params, cfg, **options)
    w = jnp.asarray(batch["weight"] if "weight" in batch else jnp.ones_like(t["loss"]), jnp.float32)
    per_pair = {"accuracy": t["accuracy"], "chosen_reward": t["chosen_rewards"],
                "rejected_reward": t["rejected_rewards"], "margin": t["margin"], "chosen_logp": t["chosen_logp"],
                "rejected_logp": t["rejected_logp"], "chosen_nll": t["chosen_nll"]}
    sums = {"loss": jax.lax.stop_gradient(loss_sum), **{k: jnp.sum(w * v) for k, v in per_pair.items()}}
    return loss_sum, count, sums


def make_train_step(model, optimizer: optax.GradientTransformation, schedule: optax.Schedule | None,
                    cfg: losses.DPOConfig, *, soft_labels: bool = False, average_log_probs: bool | None = None,
                    nll_weight: float = 0.0, grad_accum: int = 1, reference_model=None
                    ) -> Callable[[TrainState, Batch, Any], tuple[TrainState, dict]]:
    """step(state, batch, ref_params) -> (state, metrics); ref_params=None with precomputed reference log-probs.

    Jit with `donate_argnums=0` only: the reference must never be donated (or aliased with the
    policy's parameters, which are donated). `reference_model` runs `ref_params` (default `model`).
    """
    check_options(cfg, soft_labels=soft_labels, nll_weight=nll_weight)
    options = dict(soft_labels=soft_labels, average_log_probs=average_log_probs, nll_weight=nll_weight,
                   reference_model=reference_model)

    def loss_fn(params, batch, ref_params):
        loss_sum, count, sums = batch_loss(model, params, batch, ref_params, cfg, **options)
        return loss_sum, (count, sums)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch, ref_params) -> tuple[TrainState, dict[str, Any]]:
        (_, (count, sums)), grads = accumulate.summed_value_and_grad(grad_fn, state.params, batch, grad_accum,
                                                                     ref_params)
        state, denom, metrics = accumulate.apply_mean_gradients(state, optimizer, grads, count, schedule)
        metrics.update({k: v / denom for k, v in sums.items()}, pairs=count)
        return state, metrics

    return step


def make_eval_step(model, cfg: losses.DPOConfig, *, soft_labels: bool = False, average_log_probs: bool | None = None,
                   nll_weight: float = 0.0, reference_model=None) -> Callable[[Any, Batch, Any], dict[str, jax.Array]]:
    """eval_step(params, batch, ref_params) -> {METRICS sums, pairs}; add over batches, then `finish_eval`."""
    check_options(cfg, soft_labels=soft_labels, nll_weight=nll_weight)

    def eval_step(params, batch, ref_params):
        _, count, sums = batch_loss(model, params, batch, ref_params, cfg, soft_labels=soft_labels,
                                    average_log_probs=average_log_probs, nll_weight=nll_weight,
                                    reference_model=reference_model)
        return {**sums, "pairs": count}

    return eval_step


# Means over pairs from summed eval outputs ({METRICS, pairs}); the same helper as reward.finish_eval.
finish_eval = accumulate.means_from_sums
