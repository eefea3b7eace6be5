"""Tests for jaxlm.rl against Python-loop references and hand-computed values.

Tolerances are fixed in advance: 1e-5 for float32 against float64 references, exact where the
arithmetic is exact.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import losses, rl
from jaxlm.steps import ppo

gae = jax.jit(rl.gae)
whiten = jax.jit(rl.whiten, static_argnames="shift_mean")
token_level_rewards = jax.jit(rl.token_level_rewards, static_argnames="kl_kind")
adaptive_kl_update = jax.jit(rl.adaptive_kl_update)


def gae_reference(rewards, values, mask, gamma, lam):
    """Textbook GAE loop (TRL / N-implementation-details) over the real tokens of each row."""
    B, T = rewards.shape
    adv = np.zeros((B, T))
    ret = np.zeros((B, T))
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        last = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_v = values[b, idx[k + 1]] if k + 1 < len(idx) else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
            ret[b, t] = last + values[b, t]
    return adv, ret


@pytest.fixture(scope="module")
def rollout():
    rng = np.random.default_rng(0)
    B, T = 6, 7
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    mask = np.zeros((B, T), np.float32)
    for b, n in enumerate([7, 4, 1, 0, 3]):  # ragged response lengths, including empty and full
        mask[b, :n] = 1
    mask[5] = [0, 0, 1, 1, 0, 1, 0]  # leading zeros and a hole
    return rewards, values, mask


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0)])
def test_gae_scan_equals_python_loop(rollout, gamma, lam):
    rewards, values, mask = rollout
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    want_adv, want_ret = gae_reference(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)


def test_gae_reward_to_go_with_unit_gamma_lambda_and_zero_values(rollout):
    rewards, _, mask = rollout
    mask = mask[:5]  # prefix masks
    rewards = rewards[:5]
    adv, ret = gae(rewards, np.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    masked = rewards * mask
    to_go = np.cumsum(masked[:, ::-1], axis=1)[:, ::-1] * mask
    np.testing.assert_allclose(ret, to_go, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adv, to_go, rtol=1e-5, atol=1e-5)


def test_gae_ignores_what_is_behind_the_mask(rollout):
    rewards, values, mask = rollout
    rng = np.random.default_rng(1)
    noise = rng.normal(scale=100, size=rewards.shape).astype(np.float32)
    a1, r1 = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    a2, r2 = gae(np.where(mask > 0, rewards, noise), np.where(mask > 0, values, -noise), mask,
                 gamma=0.99, lam=0.95)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(r1, r2)


def test_gae_hand_case():
    # One row, 2 real tokens, γ = 0.5, λ = 0.5: δ1 = 1 - 2 = -1; δ0 = 0 + 0.5·2 - 1 = 0;
    # A1 = -1, A0 = 0 + 0.25·(-1) = -0.25; R = A + V.
    adv, ret = gae(np.array([[0.0, 1.0, 5.0]]), np.array([[1.0, 2.0, 7.0]]),
                   np.array([[1.0, 1.0, 0.0]]), gamma=0.5, lam=0.5)
    np.testing.assert_allclose(adv, [[-0.25, -1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[0.75, 1.0, 0.0]], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Whitening
# ---------------------------------------------------------------------------------------------


def _masked_stats(x, mask):
    x = np.asarray(x, np.float64)[mask > 0]
    return x.mean(), x.var()


def test_whiten_masked_mean_zero_var_one(rollout):
    _, _, mask = rollout
    rng = np.random.default_rng(2)
    x = (5.0 + 3.0 * rng.normal(size=mask.shape)).astype(np.float32)
    x[mask == 0] = 1e6  # padding must not enter the statistics
    out = whiten(x, mask)
    mean, var = _masked_stats(out, mask)
    np.testing.assert_allclose(mean, 0.0, atol=1e-5)
    np.testing.assert_allclose(var, 1.0, atol=1e-5)
    assert np.all(np.asarray(out)[mask == 0] == 0)


def test_whiten_without_shift_keeps_mean(rollout):
    _, _, mask = rollout
    rng = np.random.default_rng(3)
    x = (5.0 + 3.0 * rng.normal(size=mask.shape)).astype(np.float32)
    out = whiten(x, mask, shift_mean=False)
    mean_in, _ = _masked_stats(x, mask)
    mean, var = _masked_stats(out, mask)
    np.testing.assert_allclose(mean, mean_in, rtol=1e-5)
    np.testing.assert_allclose(var, 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Per-token rewards
# ---------------------------------------------------------------------------------------------


def test_token_level_rewards_hand_case():
    score = np.array([2.0, 3.0, 4.0, 5.0], np.float32)
    logp = np.array([[-1.0, -2.0, -3.0, -4.0]] * 4, np.float32)
    ref = np.array([[-1.5, -1.0, -3.0, -9.0]] * 4, np.float32)  # k1 = [0.5, -1, 0, 5]
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]], np.float32)
    eos = np.array([True, False, False, True])
    beta = 0.1
    rewards, kl = token_level_rewards(score, logp, ref, mask, kl_coef=beta,
                                      missing_eos_penalty=1.0, ended_with_eos=eos)
    k1 = np.array([0.5, -1.0, 0.0, 5.0])
    want_kl = mask * k1
    want = -beta * want_kl
    want[0, 2] += 2.0       # last real token, ended with EOS: score as is
    want[1, 3] += 3.0 - 1.0  # no EOS: penalised
    # row 2 has no real tokens: nothing at all, penalty included
    want[3, 0] += 5.0
    np.testing.assert_allclose(kl, want_kl, rtol=1e-6)
    np.testing.assert_allclose(rewards, want, rtol=1e-6, atol=1e-7)
    no_penalty, _ = token_level_rewards(score, logp, ref, mask, kl_coef=beta)
    np.testing.assert_allclose(no_penalty[1, 3], -beta * 5.0 + 3.0, rtol=1e-6)


def test_token_level_rewards_kl():
    rng = np.random.default_rng(4)
    logp = -rng.random((2, 5)).astype(np.float32)
    ref = -rng.random((2, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], np.float32)
    rewards, kl = token_level_rewards(np.zeros(2, np.float32), logp, ref, mask, kl_coef=0.05)
    want_kl = np.where(mask > 0, logp - ref, 0.0)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-6)
    np.testing.assert_allclose(rewards, -0.05 * want_kl, rtol=1e-6)
    # policy == reference: rewards are exactly the score at the last token
    rewards, kl = token_level_rewards(np.array([1.0, 2.0]), logp, logp, mask, kl_coef=0.05)
    np.testing.assert_array_equal(kl, 0.0)
    np.testing.assert_array_equal(rewards, [[0, 0, 1, 0, 0], [0, 0, 0, 0, 2]])


def test_only_k1_is_a_correct_kl_reward():
    """Exact check on a 4-way categorical π_θ = softmax(θ) against a fixed reference.

    A per-token reward r(x) enters the policy gradient as E_π[r(x) ∇log π(x)]. With r = −k, the
    penalty's gradient is ∇KL(π‖π_ref) only for k1 = log π/π_ref: ∇KL = Σ ∇π·(log π/π_ref) +
    Σ π ∇log π, and the last sum is 0 (Schulman, "Approximating KL divergence", 2020). k2's and
    k3's score-function gradients differ from ∇KL, so they are refused as rewards.

    Differentiated as loss terms on on-policy samples (no fixed weight): E_π[∇k2] = E_π[k1 ∇log π]
    = ∇KL(π‖π_ref) exactly, while E_π[∇k3] = −Σ π_ref ∇log π = ∇KL(π_ref‖π), the *reverse* KL
    (GRPO's β·k3 term; Zhang et al. 2025, "On the design of KL-regularized policy gradient
    algorithms for LLM reasoning"): the same minimum at π = π_ref, a different gradient elsewhere.
    """
    theta = jnp.array([0.3, -1.2, 0.8, 0.1])
    ref_logp = jax.nn.log_softmax(jnp.array([-0.5, 0.4, 0.2, -1.0]))
    kl = lambda t: jnp.sum(jax.nn.softmax(t) * (jax.nn.log_softmax(t) - ref_logp))
    exact = np.asarray(jax.grad(kl)(theta))

    def score_function_gradient(kind):
        logp = jax.nn.log_softmax(theta)
        k = jax.lax.stop_gradient(losses.kl_estimate(logp, ref_logp, kind))  # a fixed reward weight
        return np.asarray(jax.grad(lambda t: jnp.sum(jax.nn.softmax(theta) * k * jax.nn.log_softmax(t)))(theta))

    np.testing.assert_allclose(score_function_gradient("k1"), exact, rtol=1e-5, atol=1e-7)
    for kind in ("k2", "k3"):
        assert np.max(np.abs(score_function_gradient(kind) - exact)) > 0.05 * np.max(np.abs(exact)), kind
    as_loss = lambda kind: np.asarray(jax.grad(lambda t: jnp.sum(
        jax.nn.softmax(theta) * losses.kl_estimate(jax.nn.log_softmax(t), ref_logp, kind)))(theta))
    np.testing.assert_allclose(as_loss("k2"), exact, rtol=1e-5, atol=1e-7)
    reverse_kl = lambda t: jnp.sum(jnp.exp(ref_logp) * (ref_logp - jax.nn.log_softmax(t)))
    np.testing.assert_allclose(as_loss("k3"), np.asarray(jax.grad(reverse_kl)(theta)), rtol=1e-5, atol=1e-7)
    assert np.max(np.abs(as_loss("k3") - exact)) > 0.05 * np.max(np.abs(exact))
    for kind in ("k2", "k3"):
        with pytest.raises(ValueError, match="only 'k1' is a correct per-token KL reward"):
            rl.token_level_rewards(np.zeros(1), np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2)), kl_coef=0.1,
                                   kl_kind=kind)
        with pytest.raises(ValueError, match="only 'k1'"):
            ppo.PPOConfig(kl_kind=kind)


def test_token_level_rewards_needs_eos_flags():
    with pytest.raises(ValueError, match="ended_with_eos"):
        rl.token_level_rewards(np.zeros(1), np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2)),
                               kl_coef=0.1, missing_eos_penalty=1.0)


# ---------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------


def test_adaptive_kl_unchanged_at_target():
    state = rl.adaptive_kl_init(0.2, target=6.0, horizon=10_000)
    new = adaptive_kl_update(state, jnp.float32(6.0), 512)
    assert float(new.value) == float(state.value)
    assert float(new.target) == 6.0 and float(new.horizon) == 10_000


def test_adaptive_kl_error_clipped():
    state = rl.adaptive_kl_init(0.2, target=6.0, horizon=10_000)
    n = 512
    up = adaptive_kl_update(state, jnp.float32(1e6), n)
    np.testing.assert_allclose(up.value, 0.2 * (1 + 0.2 * n / 10_000), rtol=1e-6)
    down = adaptive_kl_update(state, jnp.float32(0.0), n)
    np.testing.assert_allclose(down.value, 0.2 * (1 - 0.2 * n / 10_000), rtol=1e-6)
    # Inside the clip range: proportional. KL = 6.6 → error 0.1.
    mid = state.update(jnp.float32(6.6), n)
    np.testing.assert_allclose(mid.value, 0.2 * (1 + 0.1 * n / 10_000), rtol=1e-5)


def test_fixed_kl_controller_never_changes():
    state = rl.FixedKLController(jnp.float32(0.05))
    for kl in (0.0, 6.0, 1e6):
        assert float(state.update(jnp.float32(kl), 512).value) == np.float32(0.05)
        assert float(jax.jit(rl.fixed_kl_update)(state, jnp.float32(kl), 512).value) == np.float32(0.05)


def test_kl_states_are_pytrees():
    leaves = jax.tree_util.tree_leaves(rl.adaptive_kl_init(0.1, 6.0, 1e4))
    assert len(leaves) == 3 and all(x.dtype == jnp.float32 for x in leaves)
    assert len(jax.tree_util.tree_leaves(rl.FixedKLController(jnp.float32(0.1)))) == 1


# ---------------------------------------------------------------------------------------------
# Explained variance
# ---------------------------------------------------------------------------------------------


def test_explained_variance():
    rng = np.random.default_rng(5)
    ret = rng.normal(size=(3, 6)).astype(np.float32)
    mask = np.array([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], np.float32)
    ev = jax.jit(rl.explained_variance)
    np.testing.assert_allclose(ev(ret, ret, mask), 1.0, rtol=1e-6)
    mean = ret[mask > 0].mean()
    np.testing.assert_allclose(ev(np.full_like(ret, mean), ret, mask), 0.0, atol=1e-6)
    v = ret + rng.normal(size=ret.shape).astype(np.float32)
    r, e = ret[mask > 0].astype(np.float64), (ret - v)[mask > 0].astype(np.float64)
    np.testing.assert_allclose(ev(v, ret, mask), 1 - e.var() / r.var(), rtol=1e-5)
    assert math.isnan(float(ev(ret, np.ones_like(ret), mask)))
