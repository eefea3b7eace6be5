"""Pure RL helpers for PPO on language models: GAE, whitening, per-token rewards, KL control.

Shapes: ``[B, T]`` arrays over the *response* tokens of a rollout, with ``mask[b, t] = 1`` on
real response tokens (EOS included, padding after it excluded). Everything is float32 inside,
jittable, and free of Python state; the KL controller's state is a NamedTuple pytree that lives
in the training state and is checkpointed with it.

The recipe follows OpenAI's lm-human-preferences and "The N Implementation Details of RLHF with
PPO" (Huang et al. 2022): the reward model's score is given at the last real token, every token
pays -β·KL to the reference, advantages come from GAE and are whitened over the batch.

Left out on purpose: value bootstrapping from a truncated rollout (LM episodes end at EOS or at
the length limit, where the value is 0 by convention) and GRPO's group-relative advantages
(they belong with the GRPO step).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxlm.losses import kl_estimate

Array = jax.Array

__all__ = [
    "gae",
    "whiten",
    "token_level_rewards",
    "AdaptiveKLState",
    "adaptive_kl_init",
    "adaptive_kl_update",
    "FixedKLController",
    "fixed_kl_update",
    "explained_variance",
]


def _f32(x: Any) -> Array:
    return jnp.asarray(x, jnp.float32)


def _masked_mean(x: Array, mask: Array) -> Array:
    count = jnp.maximum(jnp.sum(mask), 1.0)
    return jnp.sum(jnp.where(mask > 0, x, 0.0)) / count


def _masked_var(x: Array, mask: Array) -> Array:
    """Biased (population) variance over ``mask > 0``, as lm-human-preferences' ``whiten``."""
    mean = _masked_mean(x, mask)
    return _masked_mean(jnp.square(x - mean), mask)


def gae(
    rewards: Array, values: Array, mask: Array, *, gamma: float | Array, lam: float | Array
) -> tuple[Array, Array]:
    """Generalised Advantage Estimation (Schulman et al. 2016) as a reverse ``lax.scan``.

    Over the real (``mask = 1``) tokens of a row, with ``t'`` the next real token after ``t``::

        δ_t = r_t + γ V_{t'} - V_t
        A_t = δ_t + γ λ A_{t'}
        R_t = A_t + V_t                   (the value-function target)

    and ``V_{t'} = A_{t'} = 0`` after the last real token: the episode ends there (EOS or the
    length limit). Masked positions contribute nothing: their rewards and values are never read,
    and their advantages and returns are 0. The scan carries ``(V_{t'}, A_{t'})`` backwards and
    passes it unchanged through masked positions, so the usual response mask (a prefix of ones)
    and rows with leading zeros are both handled; an interior hole is skipped over, not treated
    as an episode end.

    Args:
      rewards, values: ``[B, T]``.
      mask: ``[B, T]``, 1 on real tokens.
      gamma: discount (1.0 for LM RLHF, where the episode is one response).
      lam: GAE λ; 1 gives Monte-Carlo returns minus V, 0 gives one-step TD errors.

    Returns:
      ``(advantages [B, T], returns [B, T])`` float32, 0 where ``mask = 0``.
    """
    r = _f32(rewards).T  # [T, B]: scan over time
    v = _f32(values).T
    m = _f32(mask).T > 0
    gamma, lam = _f32(gamma), _f32(lam)

    def step(carry, x):
        next_value, next_adv = carry  # [B] each
        r_t, v_t, m_t = x
        delta = r_t + gamma * next_value - v_t
        adv = delta + gamma * lam * next_adv
        carry = (jnp.where(m_t, v_t, next_value), jnp.where(m_t, adv, next_adv))
        return carry, jnp.where(m_t, adv, 0.0)

    zeros = jnp.zeros(r.shape[1], jnp.float32)
    _, adv = jax.lax.scan(step, (zeros, zeros), (r, v, m), reverse=True)
    advantages = adv.T  # [B, T]
    returns = jnp.where(m.T, advantages + v.T, 0.0)
    return advantages, returns


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """Masked whitening over the whole batch: ``(x - mean) / sqrt(var + eps)``.

    ``mean`` and the biased ``var`` are taken over ``mask > 0`` (all axes), so padding does
    not shift the statistics. ``shift_mean=True`` (advantages) gives masked mean 0 and variance
    1. ``shift_mean=False`` adds the mean back, rescaling without re-centring: the variant
    lm-human-preferences uses for rewards, where a constant shift would change the incentive
    to end early or late. Masked positions are returned as 0.
    """
    x, m = _f32(x), _f32(mask)
    mean = _masked_mean(x, m)
    var = _masked_mean(jnp.square(x - mean), m)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(m > 0, out, 0.0)


def _last_real_token(mask: Array) -> Array:
    """``[B, T]`` float32 one-hot of the last ``mask > 0`` position per row (all 0 if none)."""
    real = mask > 0
    T = real.shape[-1]
    last = T - 1 - jnp.argmax(real[:, ::-1], axis=-1)  # [B]
    onehot = jnp.arange(T)[None, :] == last[:, None]
    return (onehot & jnp.any(real, axis=-1, keepdims=True)).astype(jnp.float32)


REWARD_KL_KINDS = ("k1",)


def check_reward_kl_kind(kind: str) -> None:
    """Refuse a KL estimator that, used as a per-token reward, does not optimise the KL objective."""
    if kind not in REWARD_KL_KINDS:
        raise ValueError(
            f"kl_kind={kind!r}: only 'k1' is a correct per-token KL reward. As a fixed reward, k2's and k3's "
            "policy-gradient expectations are not the gradient of KL(pi || ref) (differentiated as a loss term, "
            "k2's is, and k3's, GRPO's beta*k3, is the gradient of the reverse KL(ref || pi)); k3 is still "
            "logged (kl_k3 in the metrics).")


def token_level_rewards(
    score: Array,
    logp: Array,
    ref_logp: Array,
    mask: Array,
    *,
    kl_coef: float | Array,
    kl_kind: str = "k1",
    missing_eos_penalty: float | Array | None = None,
    ended_with_eos: Array | None = None,
) -> tuple[Array, Array]:
    """Per-token PPO rewards: a KL penalty on every token plus the score on the last one.

    ::

        kl_t      = KL estimate of kind ``kl_kind`` from the sampled tokens' log-probs
        rewards_t = -β kl_t + [t is the last real token] * score'
        score'    = score - missing_eos_penalty   for rows that did not end with EOS

    This is the InstructGPT objective ``r(x, y) - β log(π/π_ref)`` spread over tokens: the
    sequence-level score arrives once at the end, the KL is paid per token (so GAE can credit
    it locally). Only ``k1`` is accepted: a per-token reward enters the policy gradient as a
    fixed weight on ∇log π, and ``E_π[k ∇log π] = ∇KL(π‖π_ref)`` holds for k1 only (the
    score-function gradients of k2 and k3 differ from ∇KL in sign and size). Differentiated as
    loss terms instead, on-policy, k2 gives ∇KL(π‖π_ref) exactly and k3 (GRPO's β·k3) gives
    ∇KL(π_ref‖π), the reverse KL: same minimum, another gradient (tests/test_rl.py). The
    missing-EOS penalty (TRL's ``missing_eos_penalty``) discourages truncated answers that the
    reward model would otherwise score as if finished.

    Args:
      score: ``[B]`` reward-model scores.
      logp, ref_logp: ``[B, T]`` log-probs of the sampled tokens under policy and reference
        (same temperature).
      mask: ``[B, T]`` 1 on real response tokens.
      kl_coef: β (a float, or ``AdaptiveKLState.value``).
      kl_kind: ``'k1'`` (the only estimator that is a correct reward; see above).
      missing_eos_penalty: optional amount subtracted from ``score`` of rows without EOS.
      ended_with_eos: ``[B]`` bool, required with ``missing_eos_penalty``.

    Returns:
      ``(rewards [B, T], kl [B, T])``, both 0 where ``mask = 0``; ``kl`` is for logging.
    """
    check_reward_kl_kind(kl_kind)
    m = _f32(mask)
    kl = jnp.where(m > 0, kl_estimate(logp, ref_logp, kl_kind), 0.0)
    score = _f32(score)
    if missing_eos_penalty is not None:
        if ended_with_eos is None:
            raise ValueError("missing_eos_penalty needs ended_with_eos")
        score = jnp.where(jnp.asarray(ended_with_eos, bool), score,
                          score - _f32(missing_eos_penalty))
    rewards = -_f32(kl_coef) * kl + _last_real_token(m) * score[:, None]
    return rewards, kl


# ------------------------------------------------------------------------------------------------
# KL controllers (Ziegler et al. 2019, InstructGPT)
# ------------------------------------------------------------------------------------------------


class AdaptiveKLState(NamedTuple):
    """State of the adaptive KL controller: a pytree, so it jits and checkpoints as-is.

    Attributes:
      value: the current KL coefficient β.
      target: the KL (nats per sequence, as measured by the caller) that β steers towards.
      horizon: how many episodes it takes to move β by the full clipped error (10k in
        lm-human-preferences); larger is slower and smoother. In iterations of E episodes,
        β moves by at most a factor 1 ± 0.2·E/horizon per iteration: a horizon far above the
        run's total episodes makes β in effect fixed.
    """

    value: Array
    target: Array
    horizon: Array

    def update(self, current_kl: Array, n_steps: Array) -> "AdaptiveKLState":
        """Same as :func:`adaptive_kl_update`; lets steps call ``state.update`` on either controller."""
        return adaptive_kl_update(self, current_kl, n_steps)


def adaptive_kl_init(init_kl_coef: float, target: float, horizon: float) -> AdaptiveKLState:
    """Float32 :class:`AdaptiveKLState`, so the state has a fixed dtype for jit and checkpoints."""
    return AdaptiveKLState(_f32(init_kl_coef), _f32(target), _f32(horizon))


def adaptive_kl_update(state: AdaptiveKLState, current_kl: Array, n_steps: Array) -> AdaptiveKLState:
    """One proportional-control step on β (Ziegler et al. 2019, lm-human-preferences)::

        e = clip(current_kl / target - 1, -0.2, 0.2)
        β ← β · (1 + e · n_steps / horizon)

    ``n_steps`` is the number of episodes since the last update (the rollout batch size). The
    clip bounds how fast β can move whatever the measured KL, so one noisy batch cannot blow it
    up; KL equal to the target leaves β unchanged.
    """
    error = jnp.clip(_f32(current_kl) / state.target - 1.0, -0.2, 0.2)
    mult = 1.0 + error * _f32(n_steps) / state.horizon
    return state._replace(value=state.value * mult)


class FixedKLController(NamedTuple):
    """A constant KL coefficient with the same interface as :class:`AdaptiveKLState`."""

    value: Array

    def update(self, current_kl: Array, n_steps: Array) -> "FixedKLController":
        """β never changes; the arguments are accepted so steps need not tell the two apart."""
        return fixed_kl_update(self, current_kl, n_steps)


def fixed_kl_update(state: FixedKLController, current_kl: Array, n_steps: Array) -> FixedKLController:
    """Returns ``state`` unchanged (β is fixed)."""
    del current_kl, n_steps
    return state


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
    """``1 - Var[R - V] / Var[R]`` over ``mask > 0``: how much of the return the critic explains.

    1 is a perfect critic, 0 is no better than predicting the mean, negative is worse. NaN when
    the returns have zero variance (undefined), as in Stable-Baselines3 and CleanRL.
    """
    v, ret, m = _f32(values), _f32(returns), _f32(mask)
    var_ret = _masked_var(ret, m)
    var_err = _masked_var(ret - v, m)
    return jnp.where(var_ret > 0, 1.0 - var_err / jnp.where(var_ret > 0, var_ret, 1.0), jnp.nan)


# ------------------------------------------------------------------------------------------------
# Critic-free advantages over groups of completions (GRPO family)
# ------------------------------------------------------------------------------------------------

ADVANTAGE_ESTIMATORS = ("grpo", "grpo_no_std", "dr_grpo", "rloo")
__all__ += ["ADVANTAGE_ESTIMATORS", "group_advantages", "informative_groups"]


def _groups(rewards: Array, group_size: int) -> Array:
    r = _f32(rewards)
    if r.ndim != 1 or group_size < 2 or r.shape[0] % group_size:
        raise ValueError(f"rewards must be [P·G] with G = group_size >= 2 dividing it; got shape {r.shape}, "
                         f"group_size={group_size}")
    return r.reshape(-1, group_size)  # [P, G]: row p holds the G completions of prompt p


def group_advantages(rewards: Array, group_size: int, estimator: str = "grpo", eps: float = 1e-6) -> Array:
    """One advantage per completion, from the other completions of its prompt (no critic).

    ``rewards [P·G]`` lists the G completions of each prompt together (prompt-major). With
    ``r̄`` the group's mean and ``σ`` its standard deviation (unbiased, ``ddof=1``, as TRL)::

        grpo         (r − r̄) / (σ + eps)       DeepSeekMath's GRPO
        grpo_no_std  r − r̄                     the same without dividing by σ
        dr_grpo      r − r̄                     Dr. GRPO (Liu et al. 2025): σ biases towards easy and
                                               hard prompts; its other half is the constant normaliser
                                               (`losses.aggregate_token_losses`)
        rloo         r − mean of the others    = G/(G−1)·(r − r̄) (Ahmadian et al. 2024): unbiased

    A group whose rewards are all equal gets advantage 0 everywhere (σ = 0 gives 0/eps, never NaN).
    Returns ``[P·G]`` float32, under ``stop_gradient``.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {ADVANTAGE_ESTIMATORS}, got {estimator!r}")
    r = _groups(rewards, group_size)
    g = r.shape[1]
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    if estimator == "grpo":
        std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / (g - 1))
        adv = centred / (std + eps)
    elif estimator == "rloo":
        adv = centred * (g / (g - 1))
    else:
        adv = centred
    return jax.lax.stop_gradient(adv.reshape(-1))


def informative_groups(rewards: Array, group_size: int) -> Array:
    """``[P]`` bool: the groups whose rewards are not all equal. The others have zero advantage under
    every estimator, so they carry no signal (DAPO's dynamic sampling drops and refills them)."""
    r = _groups(rewards, group_size)
    return jnp.max(r, axis=1) > jnp.min(r, axis=1)
