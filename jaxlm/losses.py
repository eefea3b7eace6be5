"""Pure loss functions for every stage: token cross-entropy, Bradley-Terry, the DPO family, PPO.

Every function here is a free, jittable function of arrays. Conventions shared by all of them:

- **Float32 inside.** Inputs may be bf16; every function casts to float32 before any exp, log or
  reduction, and returns float32.
- **Sums and counts, not means.** Losses return ``(loss_sum, count)`` (plus an ``aux`` dict of
  metrics where useful). The caller divides the *total* sum by the *total* count after packing,
  padding and gradient accumulation, so 8 micro-batches of 1 give exactly the gradient of one
  batch of 8 (token-level normalisation, as in lm-human-preferences and TRL's PPO).
- **Masked positions never poison the result.** They are removed with ``jnp.where`` (not by
  multiplying), so a ``-inf`` or NaN log-prob on a padding token affects neither the loss nor its
  gradient.
- **Frozen inputs are frozen here too.** Reference log-probs, old log-probs, advantages, returns
  and old values go through ``stop_gradient``: no gradient can reach them even if a caller forgets.

LM target convention (the contract with the data pipeline): ``loss_mask[b, t] = 1`` means token
``t`` is a target predicted from the tokens before it in the same segment; logits at position
``t`` predict ``tokens[t + 1]`` (see :func:`next_token_targets`).

Left out on purpose: reductions to means (the step owns normalisation), vocabulary-parallel
cross-entropy (XLA's SPMD partitioner handles a ``vocab``-sharded logsumexp and gather), and
label smoothing for token CE (no stage uses it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "next_token_targets",
    "token_log_probs",
    "token_cross_entropy",
    "sum_token_log_probs",
    "entropy_from_logits",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_estimate",
    "KL_KINDS",
    "bradley_terry_loss",
    "DPO_LOSS_TYPES",
    "DPOConfig",
    "dpo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
]


def _f32(x: Any) -> Array:
    return jnp.asarray(x, jnp.float32)


def _masked_sum(x: Array, mask: Array) -> Array:
    return jnp.sum(jnp.where(mask > 0, x, 0.0))


def _masked_mean(x: Array, mask: Array) -> Array:
    """Mean over ``mask > 0``; 0 (not NaN) when the mask is empty."""
    count = jnp.sum((mask > 0).astype(jnp.float32))
    return _masked_sum(x, mask) / jnp.maximum(count, 1.0)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ------------------------------------------------------------------------------------------------
# Language-model log-probabilities and cross-entropy
# ------------------------------------------------------------------------------------------------


def next_token_targets(tokens: Array, segment_ids: Array, loss_mask: Array) -> tuple[Array, Array]:
    """Shift a batch into next-token targets and weights.

    Logits at position ``t`` predict ``targets[t] = tokens[t + 1]`` with::

        weights[t] = loss_mask[t + 1] * (segment_ids[t + 1] == segment_ids[t]) * (segment_ids[t] > 0)

    and ``weights[T - 1] = 0``. The segment test stops a packed row from predicting the first
    token of the next document from the end of the previous one, even when the pipeline marks
    every real token as a target (pretraining). ``targets[T - 1]`` is 0 (a valid id, weight 0).

    Args:
      tokens: ``[B, T]`` int token ids.
      segment_ids: ``[B, T]`` int, 0 = padding, one id per packed document.
      loss_mask: ``[B, T]``, 1 where the token is a target.

    Returns:
      ``(targets [B, T] int32, weights [B, T] float32)``.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    same_segment = segment_ids[:, 1:] == segment_ids[:, :-1]
    real = segment_ids[:, :-1] > 0
    w = (loss_mask[:, 1:] > 0) & same_segment & real  # [B, T-1]
    weights = jnp.concatenate([w, jnp.zeros_like(w[:, :1])], axis=1).astype(jnp.float32)
    return targets, weights


def _log_softmax_gather(logits: Array, targets: Array, temperature: Any) -> tuple[Array, Array]:
    """Returns (logit of the target, logsumexp) of ``logits / temperature`` in float32, [B, T] each.

    Gathers the target logit with ``take_along_axis`` instead of a one-hot contraction, so
    nothing of size [B, T, V] beyond the float32 logits themselves is built.
    """
    if _is_number(temperature) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _f32(logits) / _f32(temperature)  # [B, T, V]
    lse = jax.nn.logsumexp(z, axis=-1)  # [B, T]
    idx = jnp.asarray(targets, jnp.int32)[..., None]  # [B, T, 1]
    target_logit = jnp.take_along_axis(z, idx, axis=-1)[..., 0]  # [B, T]
    return target_logit, lse


def token_log_probs(logits: Array, targets: Array, temperature: float | Array = 1.0) -> Array:
    """Per-token log-probability of ``targets`` under ``softmax(logits / temperature)``.

    ``log p(y_t) = z_t[y_t] - logsumexp(z_t)`` with ``z = logits / temperature``, in float32.
    Use the *same* temperature as the sampler, in the policy and in the reference: PPO's ratio
    and KL are only meaningful between log-probs of the same distribution that produced the
    sample (a classic silent RLHF bug is sampling at T=0.7 and scoring at T=1).

    Args:
      logits: ``[B, T, V]`` any float dtype.
      targets: ``[B, T]`` int ids in ``[0, V)``.
      temperature: scalar > 0.

    Returns:
      ``[B, T]`` float32 log-probs (unmasked; apply weights downstream).
    """
    target_logit, lse = _log_softmax_gather(logits, targets, temperature)
    return target_logit - lse


def token_cross_entropy(
    logits: Array, targets: Array, weights: Array, *, z_loss: float = 0.0
) -> tuple[Array, Array]:
    """Weighted next-token cross-entropy, returned as ``(loss_sum, weight_sum)``.

    Per token ``l_t = logsumexp(z_t) - z_t[y_t] + z_loss * logsumexp(z_t)^2``. The optional
    z-loss (PaLM, Chowdhery et al. 2022) pulls the softmax normaliser towards 1 so bf16 logits
    stay in range; it is included in ``loss_sum``. Divide the summed ``loss_sum`` by the summed
    ``weight_sum`` of all micro-batches for the exact mean over target tokens.

    Args:
      logits: ``[B, T, V]``.
      targets: ``[B, T]`` int.
      weights: ``[B, T]`` (e.g. from :func:`next_token_targets`); 0 drops a position entirely.
      z_loss: coefficient of the z-loss term.

    Returns:
      ``(loss_sum, weight_sum)`` float32 scalars.
    """
    target_logit, lse = _log_softmax_gather(logits, targets, 1.0)
    per_token = lse - target_logit
    if not (_is_number(z_loss) and z_loss == 0.0):
        per_token = per_token + _f32(z_loss) * jnp.square(lse)
    w = _f32(weights)
    loss_sum = jnp.sum(jnp.where(w > 0, per_token * w, 0.0))
    return loss_sum, jnp.sum(w)


def sum_token_log_probs(token_logps: Array, mask: Array) -> Array:
    """Per-token log-probs summed over each row: ``sum_t mask[t] * token_logps[t]`` -> ``[B]`` float32.

    With ``mask`` the response-target weights, this is ``log pi(response | prompt)``: prompt
    and padding positions are excluded (DPO and the KL penalty are defined on the response only).
    Positions with ``mask == 0`` are dropped with ``where``, so they may hold ``-inf``. (From a
    model and a batch in one call: ``jaxlm.logprobs.sequence_log_probs``.)
    """
    m = _f32(mask)
    return jnp.sum(jnp.where(m > 0, _f32(token_logps) * m, 0.0), axis=-1)


def entropy_from_logits(logits: Array, temperature: float | Array = 1.0) -> Array:
    """Entropy of ``softmax(logits / temperature)`` at every position: ``[B, T, V] -> [B, T]``.

    ``H = -sum_v p_v log p_v``; terms with ``p_v = 0`` (e.g. ``-inf`` logits of masked vocabulary
    entries) count as 0. A monitoring metric for PPO (entropy collapse) and an optional bonus.
    """
    if _is_number(temperature) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = jax.nn.log_softmax(_f32(logits) / _f32(temperature), axis=-1)
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


# ------------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence", 2020)
# ------------------------------------------------------------------------------------------------
#
# All take log-probs of tokens *sampled from the policy*, so expectations are under the policy
# and each estimates KL(pi || ref) per token. With r = ref / pi:
#   k1 = -log r              unbiased, high variance, can be negative per sample
#   k2 = (log r)^2 / 2       biased (low bias when pi ~ ref), always >= 0
#   k3 = (r - 1) - log r     unbiased and always >= 0 (r - 1 has mean 0 under pi)

KL_KINDS = ("k1", "k2", "k3")


def kl_k1(logp: Array, ref_logp: Array) -> Array:
    """``logp - ref_logp``: the naive estimator; the per-token penalty used by InstructGPT."""
    return _f32(logp) - _f32(ref_logp)


def kl_k2(logp: Array, ref_logp: Array) -> Array:
    """``0.5 * (logp - ref_logp)^2``: low-variance, biased, non-negative."""
    return 0.5 * jnp.square(_f32(logp) - _f32(ref_logp))


def kl_k3(logp: Array, ref_logp: Array) -> Array:
    """``exp(ref_logp - logp) - 1 - (ref_logp - logp)``: unbiased and non-negative.

    Computed as ``expm1(d) - d`` so it stays accurate (and >= 0) when the two log-probs are close.
    """
    d = _f32(ref_logp) - _f32(logp)
    return jnp.expm1(d) - d


def kl_estimate(logp: Array, ref_logp: Array, kind: str = "k1") -> Array:
    """Per-token KL(pi || ref) estimate of the given ``kind`` (``'k1'``, ``'k2'`` or ``'k3'``)."""
    if kind == "k1":
        return kl_k1(logp, ref_logp)
    if kind == "k2":
        return kl_k2(logp, ref_logp)
    if kind == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"kl kind must be one of {KL_KINDS}, got {kind!r}")


# ------------------------------------------------------------------------------------------------
# Reward model: Bradley-Terry
# ------------------------------------------------------------------------------------------------


def _example_weights(weights: Array | None, like: Array) -> Array:
    return jnp.ones_like(like) if weights is None else _f32(weights)


def bradley_terry_loss(
    chosen_rewards: Array,
    rejected_rewards: Array,
    *,
    margin: float | Array = 0.0,
    label: Array | None = None,
    weights: Array | None = None,
) -> tuple[Array, Array, dict[str, Array]]:
    """Bradley-Terry pairwise loss for reward models (InstructGPT; Llama 2 for the margin).

    With ``Δ = r_c - r_r`` and margin ``m``:

    - hard labels: ``-log σ(Δ - m)`` (``m = 0`` is the InstructGPT loss; ``m > 0`` is Llama 2's
      margin loss, which asks for a larger gap on pairs the raters found clearly different);
    - soft labels ``p = P(chosen preferred)`` (AI feedback):
      ``-p log σ(Δ - m) - (1 - p) log σ(-Δ - m)``, the cross-entropy against the label
      distribution, each outcome asking for its own margin: p = 1 is the hard form, p = 0 the
      hard form with the sides swapped, and p = 0.5 is minimised at Δ = 0 (with one shared
      ``z = Δ - m`` in both terms a tie would be pulled to Δ = m instead).

    Uses ``log_sigmoid`` so large |Δ| neither overflows nor loses precision. Without a margin
    the loss is ln 2 at Δ = 0 whatever the label, which is the check for a zero-initialised head.

    Args:
      chosen_rewards, rejected_rewards: ``[B]`` scalar rewards.
      margin: scalar or ``[B]``.
      label: optional ``[B]`` probability that chosen is preferred.
      weights: optional ``[B]`` example weights (0 = padding example).

    Returns:
      ``(loss_sum, count, aux)`` with ``count = sum(weights)`` and per-example ``aux``:
      ``loss`` [B], ``accuracy`` [B] (1.0 where ``r_c > r_r``), ``margin`` [B] (``r_c - r_r``).
    """
    rc, rr = _f32(chosen_rewards), _f32(rejected_rewards)
    delta = rc - rr
    m = _f32(margin)
    if label is None:
        per_example = -jax.nn.log_sigmoid(delta - m)
    else:
        p = _f32(label)
        per_example = -p * jax.nn.log_sigmoid(delta - m) - (1.0 - p) * jax.nn.log_sigmoid(-delta - m)
    w = _example_weights(weights, delta)
    loss_sum = jnp.sum(jnp.where(w > 0, per_example * w, 0.0))
    aux = {
        "loss": jax.lax.stop_gradient(per_example),
        "accuracy": jax.lax.stop_gradient((rc > rr).astype(jnp.float32)),
        "margin": jax.lax.stop_gradient(delta),
    }
    return loss_sum, jnp.sum(w), aux


# ------------------------------------------------------------------------------------------------
# DPO family
# ------------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "cdpo")


def _check_dpo_args(beta: Any, loss_type: str, label_smoothing: Any) -> None:
    """Validates what can be checked in Python; traced values pass through unchecked."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if _is_number(beta) and beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if _is_number(label_smoothing):
        if loss_type in ("ipo", "hinge") and label_smoothing != 0:
            raise ValueError(f"label_smoothing is not defined for loss_type={loss_type!r}")
        if loss_type == "robust" and not 0 <= label_smoothing < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        if not 0 <= label_smoothing <= 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """Hyper-parameters of the DPO family; validated on construction.

    Attributes:
      beta: strength of the implicit KL to the reference (0.1 is the DPO paper's default;
        smaller lets the policy drift further).
      loss_type: ``'sigmoid'`` (DPO), ``'cdpo'`` (conservative DPO = sigmoid with label
        smoothing), ``'robust'`` (Chowdhury et al. 2024, unbiased under label noise),
        ``'hinge'`` (SLiC), ``'ipo'`` (Azar et al. 2023).
      label_smoothing: assumed probability ε that a preference label is flipped (sigmoid,
        cdpo, robust only); 0 gives plain DPO.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self):
        _check_dpo_args(self.beta, self.loss_type, self.label_smoothing)

    def __call__(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                 ref_rejected_logps, *, weights=None):
        """:func:`dpo_loss` with this config."""
        return dpo_loss(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
            beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
            weights=weights,
        )


def dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    beta: float | Array,
    loss_type: str = "sigmoid",
    label_smoothing: float | Array = 0.0,
    weights: Array | None = None,
) -> tuple[Array, Array, dict[str, Array]]:
    """Direct Preference Optimisation and its variants, per preference pair.

    With sequence log-probs of the responses (``[B]`` each) and
    ``Δ = (log π_c - log π_ref,c) - (log π_r - log π_ref,r)``, ``ε = label_smoothing``:

    - ``sigmoid`` (Rafailov et al. 2023): ``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)``. With ε > 0
      this is cDPO: the BT likelihood of labels flipped with probability ε; ``'cdpo'`` is the
      same formula under its own name.
    - ``robust`` (Chowdhury et al. 2024): ``((1-ε)(-log σ(βΔ)) - ε(-log σ(-βΔ))) / (1-2ε)``,
      an unbiased estimate of the clean-label loss under flip rate ε (needs ε < 0.5).
    - ``hinge`` (SLiC, Zhao et al. 2023): ``relu(1 - βΔ)``.
    - ``ipo`` (Azar et al. 2023): ``(Δ - 1/(2β))^2``, which regresses the margin to a finite
      target instead of pushing it to infinity; the IPO paper (and TRL) feed *length-averaged*
      log-probs here, which is the caller's choice of sequence log-prob normalisation.

    At policy == reference (Δ = 0): sigmoid, cdpo and robust give ln 2, hinge 1, IPO 1/(4β²).
    The reference log-probs are wrapped in ``stop_gradient``.

    Returns:
      ``(loss_sum, count, aux)``; ``count = sum(weights)`` (B when unweighted); per-example
      ``aux``: ``loss``, ``chosen_rewards = β(log π_c - log π_ref,c)``, ``rejected_rewards``,
      ``accuracy`` (chosen reward > rejected reward) and ``margin`` (their difference).
    """
    _check_dpo_args(beta, loss_type, label_smoothing)
    beta = _f32(beta)
    eps = _f32(label_smoothing)
    chosen_logratio = _f32(policy_chosen_logps) - jax.lax.stop_gradient(_f32(ref_chosen_logps))
    rejected_logratio = _f32(policy_rejected_logps) - jax.lax.stop_gradient(_f32(ref_rejected_logps))
    delta = chosen_logratio - rejected_logratio  # [B]

    if loss_type in ("sigmoid", "cdpo"):
        per_example = (-(1.0 - eps) * jax.nn.log_sigmoid(beta * delta)
                       - eps * jax.nn.log_sigmoid(-beta * delta))
    elif loss_type == "robust":
        per_example = ((1.0 - eps) * -jax.nn.log_sigmoid(beta * delta)
                       - eps * -jax.nn.log_sigmoid(-beta * delta)) / (1.0 - 2.0 * eps)
    elif loss_type == "hinge":
        per_example = jax.nn.relu(1.0 - beta * delta)
    else:  # ipo
        per_example = jnp.square(delta - 1.0 / (2.0 * beta))

    w = _example_weights(weights, delta)
    loss_sum = jnp.sum(jnp.where(w > 0, per_example * w, 0.0))
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratio)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratio)
    aux = {
        "loss": jax.lax.stop_gradient(per_example),
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "accuracy": (chosen_rewards > rejected_rewards).astype(jnp.float32),
        "margin": chosen_rewards - rejected_rewards,
    }
    return loss_sum, jnp.sum(w), aux


# ------------------------------------------------------------------------------------------------
# PPO
# ------------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logp: Array, old_logp: Array, advantages: Array, mask: Array, *, clip_eps: float | Array
) -> tuple[Array, Array, dict[str, Array]]:
    """PPO clipped surrogate (Schulman et al. 2017), summed over masked tokens.

    Per token, with ``ρ = exp(logp - old_logp)``::

        l = max(-A ρ, -A clip(ρ, 1-ε, 1+ε))

    (the max of the negated terms is the min of the surrogates: the pessimistic bound). Where
    the clipped term wins, the token has zero gradient, so one rollout cannot push the ratio far
    past 1±ε. ``old_logp`` and ``advantages`` are ``stop_gradient``-ed; masked positions are
    zeroed *before* the exp, so garbage there cannot produce inf or NaN gradients.

    Token-level normalisation: return ``(sum over masked tokens, number of masked tokens)``;
    dividing the summed loss by the total token count makes gradient accumulation exact.

    ``aux`` (means over the masked tokens of this call, for logging):
      ``clip_fraction``: share of tokens where the clipped term is strictly larger;
      ``approx_kl``: ``0.5 (logp - old_logp)^2``, the k2 estimator used by lm-human-preferences
      and "The N Implementation Details of RLHF with PPO";
      ``ratio_mean``: mean of ρ.
    """
    m = _f32(mask)
    log_ratio = jnp.where(m > 0, _f32(logp) - jax.lax.stop_gradient(_f32(old_logp)), 0.0)
    adv = jax.lax.stop_gradient(_f32(advantages))
    ratio = jnp.exp(log_ratio)
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = jnp.maximum(pg_loss1, pg_loss2)
    count = jnp.sum((m > 0).astype(jnp.float32))
    aux = jax.lax.stop_gradient({
        "clip_fraction": _masked_mean((pg_loss2 > pg_loss1).astype(jnp.float32), m),
        "approx_kl": _masked_mean(0.5 * jnp.square(log_ratio), m),
        "ratio_mean": _masked_mean(ratio, m),
    })
    return _masked_sum(per_token, m), count, aux


def ppo_value_loss(
    values: Array, old_values: Array, returns: Array, mask: Array, *, clip_eps: float | Array
) -> tuple[Array, Array, dict[str, Array]]:
    """Clipped value loss (lm-human-preferences / OpenAI baselines), summed over masked tokens.

    Per token::

        v_clip = old_v + clip(v - old_v, -ε, ε)
        l = 0.5 * max((v - R)^2, (v_clip - R)^2)

    The max keeps the value head from moving more than ε from the rollout's estimate in a
    direction the unclipped loss would reward; a token whose clipped error wins gets no
    gradient. ``old_values`` and ``returns`` are ``stop_gradient``-ed. Note ε is in reward
    units, so it interacts with reward scale (whiten or normalise the rewards).

    Returns ``(loss_sum, count, aux)``; ``aux['clip_fraction']`` is the share of masked tokens
    where the clipped error is strictly larger.
    """
    m = _f32(mask)
    v = _f32(values)
    old_v = jax.lax.stop_gradient(_f32(old_values))
    ret = jax.lax.stop_gradient(_f32(returns))
    v_clipped = old_v + jnp.clip(v - old_v, -clip_eps, clip_eps)
    vf_loss1 = jnp.square(v - ret)
    vf_loss2 = jnp.square(v_clipped - ret)
    per_token = 0.5 * jnp.maximum(vf_loss1, vf_loss2)
    count = jnp.sum((m > 0).astype(jnp.float32))
    aux = {"clip_fraction": jax.lax.stop_gradient(
        _masked_mean((vf_loss2 > vf_loss1).astype(jnp.float32), m))}
    return _masked_sum(per_token, m), count, aux


# ------------------------------------------------------------------------------------------------
# GRPO family: group-relative policy losses (critic-free)
# ------------------------------------------------------------------------------------------------

AGGREGATIONS = ("token_mean", "sequence_mean", "constant")
RATIO_LEVELS = ("token", "sequence")
__all__ += ["AGGREGATIONS", "RATIO_LEVELS", "aggregate_token_losses", "grpo_policy_loss"]


def aggregate_token_losses(per_token: Array, mask: Array, aggregation: str = "token_mean",
                           max_tokens: int | None = None) -> tuple[Array, Array]:
    """``(loss sum, normaliser)`` of per-token losses ``[B, N]``, for the step to divide *after*
    summing both over gradient-accumulation micro-batches (so 1 × 8 rows equals 8 × 1).

    ``token_mean``     Σ tokens / number of tokens            DAPO: every token weighs the same
    ``sequence_mean``  Σ_rows (row mean) / number of rows     the original GRPO: a long answer's
                                                              tokens weigh less than a short one's
    ``constant``       Σ tokens / (rows · max_tokens)         Dr. GRPO: no length bias at all
                                                              (``max_tokens``: the generation budget)

    Rows without a token count for nothing (and as no row) under ``sequence_mean``.
    """
    m = _f32(mask) > 0
    per_row_tokens = jnp.sum(m.astype(jnp.float32), axis=-1)  # [B]
    if aggregation == "token_mean":
        return _masked_sum(per_token, m), jnp.sum(per_row_tokens)
    if aggregation == "sequence_mean":
        row_sums = jnp.sum(jnp.where(m, _f32(per_token), 0.0), axis=-1)
        return jnp.sum(row_sums / jnp.maximum(per_row_tokens, 1.0)), jnp.sum((per_row_tokens > 0).astype(jnp.float32))
    if aggregation == "constant":
        if not max_tokens or max_tokens < 1:
            raise ValueError(f"aggregation='constant' needs max_tokens >= 1 (the generation budget), got {max_tokens}")
        return _masked_sum(per_token, m), jnp.float32(per_token.shape[0] * max_tokens)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def grpo_policy_loss(
    logp: Array, old_logp: Array, advantages: Array, mask: Array, *, clip_low: float | Array,
    clip_high: float | Array, ratio_level: str = "token", aggregation: str = "token_mean",
    max_tokens: int | None = None, ref_logp: Array | None = None, beta: float | Array = 0.0,
) -> tuple[Array, Array, dict[str, Array]]:
    """The clipped group-relative surrogate plus β·k3 to the reference, as ``(sum, normaliser, aux)``.

    ``advantages [B]`` hold one value per completion (``rl.group_advantages``), the same on all of
    its tokens. Per token (``ratio_level='token'``, GRPO/DAPO), with ``ρ = exp(logp − old_logp)``::

        l = max(−A ρ, −A clip(ρ, 1 − ε_low, 1 + ε_high)) + β · k3(logp, ref_logp)

    ``clip_low = clip_high`` is PPO's symmetric ε; ``clip_high > clip_low`` is DAPO's clip-higher
    (an unlikely token with A > 0 may grow further before its gradient stops). With
    ``ratio_level='sequence'`` (GSPO, Zheng et al. 2025) every token of a row gets the row's
    length-normalised ratio ``s = exp(mean_t(logp − old_logp))`` in place of ρ, and the row's
    clipping decision. The k3 term ``exp(r) − 1 − r`` with ``r = ref_logp − logp`` (DeepSeekMath)
    is differentiated through ``logp`` only; on-policy its expected gradient is ∇ KL(π_ref ‖ π)
    (tests/test_grpo.py), whose optimum is not the π_ref·exp(r/β) of a KL(π ‖ π_ref) penalty.
    ``ref_logp=None`` or ``beta=0`` (a Python zero) leaves the term out.

    Losses are aggregated by :func:`aggregate_token_losses`. ``aux`` holds token *sums*, to add
    over micro-batches and divide by ``aux['tokens']``: ``clip_low`` / ``clip_high`` (tokens whose
    clipped term won at each edge), ``ratio`` (ρ or s), ``k3``, and ``tokens``.
    """
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    m = _f32(mask) > 0
    log_ratio = jnp.where(m, _f32(logp) - jax.lax.stop_gradient(_f32(old_logp)), 0.0)  # [B, N]
    if ratio_level == "sequence":
        n = jnp.maximum(jnp.sum(m.astype(jnp.float32), axis=-1, keepdims=True), 1.0)
        log_ratio = jnp.broadcast_to(jnp.sum(log_ratio, axis=-1, keepdims=True) / n, log_ratio.shape)
    adv = jax.lax.stop_gradient(_f32(advantages))[:, None]  # [B, 1]
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = jnp.maximum(unclipped, clipped)
    won = clipped > unclipped
    tokens = jnp.sum(m.astype(jnp.float32))
    aux = {"clip_low": _masked_sum((won & (ratio < 1.0)).astype(jnp.float32), m),
           "clip_high": _masked_sum((won & (ratio > 1.0)).astype(jnp.float32), m),
           "ratio": _masked_sum(ratio, m), "tokens": tokens}
    if ref_logp is not None and not (_is_number(beta) and beta == 0):
        k3 = kl_k3(jnp.where(m, _f32(logp), 0.0), jnp.where(m, jax.lax.stop_gradient(_f32(ref_logp)), 0.0))
        per_token = per_token + beta * k3
        aux["k3"] = _masked_sum(k3, m)
    loss_sum, normaliser = aggregate_token_losses(per_token, m, aggregation, max_tokens)
    return loss_sum, normaliser, jax.lax.stop_gradient(aux)
