"""GRPO family: advantage estimators, surrogate and aggregations, k3, rewards, the step, the binary.

Hand-computed values for every estimator and aggregation, exact gradient accumulation, both
clip edges, GSPO's ratio, the k3 gradient on an enumerable categorical, a one-token bandit with
known optima, reward programs (weights, errors naming the function and prompt), and the binary's
bitwise resume after SIGKILL.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxlm import losses, rl

# ------------------------------------------------------------------------------------------------
# Advantages
# ------------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    r = jnp.array([0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4; the second all equal
    # Group 1: mean 0.75, centred (-0.75, 0.25, 0.25, 0.25), unbiased std sqrt(0.75 / 3) = 0.5.
    expected = {"grpo": [-1.5, 0.5, 0.5, 0.5], "grpo_no_std": [-0.75, 0.25, 0.25, 0.25],
                "dr_grpo": [-0.75, 0.25, 0.25, 0.25],
                "rloo": [0.0 - 1.0, 1.0 - 2 / 3, 1.0 - 2 / 3, 1.0 - 2 / 3]}  # r minus the mean of the other 3
    for estimator, first in expected.items():
        adv = np.asarray(rl.group_advantages(r, 4, estimator))
        np.testing.assert_allclose(adv[:4], first, atol=1e-5, err_msg=estimator)
        assert np.all(adv[4:] == 0.0) and np.all(np.isfinite(adv)), estimator  # zero std: 0, not NaN
    np.testing.assert_array_equal(np.asarray(rl.informative_groups(r, 4)), [True, False])
    np.testing.assert_allclose(np.asarray(rl.group_advantages(jnp.array([3.0, 1.0]), 2, "grpo")),
                               [1 / np.sqrt(2), -1 / np.sqrt(2)], atol=1e-5)  # std of (3, 1) with ddof=1: sqrt(2)
    with pytest.raises(ValueError, match="group_size"):
        rl.group_advantages(r, 3)
    with pytest.raises(ValueError, match="estimator"):
        rl.group_advantages(r, 4, "ppo")


# ------------------------------------------------------------------------------------------------
# Surrogate and aggregation
# ------------------------------------------------------------------------------------------------

B, N = 8, 5
_rng = np.random.default_rng(0)
OLD = jnp.asarray(-_rng.uniform(0.2, 2.0, (B, N)), jnp.float32)
NEW = OLD + jnp.asarray(_rng.normal(0.0, 0.3, (B, N)), jnp.float32)
REF = OLD + jnp.asarray(_rng.normal(0.0, 0.3, (B, N)), jnp.float32)
ADV = jnp.asarray(_rng.normal(0.0, 1.0, (B,)), jnp.float32)
LENGTHS = np.array([5, 3, 1, 4, 5, 2, 3, 5])
MASK = jnp.asarray(np.arange(N)[None, :] < LENGTHS[:, None], jnp.float32)
KW = dict(clip_low=0.2, clip_high=0.28, max_tokens=N)


def _direct(logp, aggregation, ratio_level="token", beta=0.0):
    """The loss written out row by row in NumPy (float64), the definitions of the docstrings."""
    logp, old, ref, adv = (np.asarray(x, np.float64) for x in (logp, OLD, REF, ADV))
    rows = []
    for i in range(B):
        n = LENGTHS[i]
        lr = logp[i, :n] - old[i, :n]
        ratio = np.full(n, np.exp(lr.mean())) if ratio_level == "sequence" else np.exp(lr)
        l = np.maximum(-adv[i] * ratio, -adv[i] * np.clip(ratio, 0.8, 1.28))
        d = ref[i, :n] - logp[i, :n]
        rows.append(l + beta * (np.exp(d) - 1 - d))
    if aggregation == "token_mean":
        return sum(r.sum() for r in rows) / LENGTHS.sum()
    if aggregation == "sequence_mean":
        return np.mean([r.mean() for r in rows])
    return sum(r.sum() for r in rows) / (B * N)


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
@pytest.mark.parametrize("ratio_level", losses.RATIO_LEVELS)
def test_loss_against_a_direct_computation(aggregation, ratio_level):
    for beta in (0.0, 0.04):
        s, c, aux = losses.grpo_policy_loss(NEW, OLD, ADV, MASK, ratio_level=ratio_level, aggregation=aggregation,
                                            ref_logp=REF, beta=beta, **KW)
        np.testing.assert_allclose(float(s / c), _direct(NEW, aggregation, ratio_level, beta), rtol=1e-5)
        assert float(aux["tokens"]) == LENGTHS.sum()
        assert ("k3" in aux) == (beta > 0)


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_one_microbatch_of_8_equals_8_of_1(aggregation):
    def total(logp, rows):
        s, c, _ = losses.grpo_policy_loss(logp[rows], OLD[rows], ADV[rows], MASK[rows], aggregation=aggregation,
                                          ref_logp=REF[rows], beta=0.04, **KW)
        return s, c

    def whole(logp):
        s, c = total(logp, slice(None))
        return s / c

    def accumulated(logp):
        sums = [total(logp, slice(i, i + 1)) for i in range(B)]
        return sum(s for s, _ in sums) / sum(c for _, c in sums)

    np.testing.assert_allclose(float(accumulated(NEW)), float(whole(NEW)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(accumulated)(NEW)), np.asarray(jax.grad(whole)(NEW)),
                               rtol=1e-5, atol=1e-8)


def test_clip_higher_is_asymmetric_at_both_edges():
    """Gradient stops past 1 + ε_high for A > 0 and below 1 − ε_low for A < 0, and only there."""
    old, mask = jnp.zeros((1, 1)), jnp.ones((1, 1))

    def grad_at(ratio, adv):
        f = lambda lp: losses.grpo_policy_loss(lp, old, jnp.array([adv]), mask, clip_low=0.2, clip_high=0.28)[0]
        return float(jax.grad(f)(jnp.log(jnp.full((1, 1), ratio)))[0, 0])

    # A > 0: the upper edge is 1.28 (not 1.2); the lower edge never stops a positive advantage.
    assert grad_at(1.25, 1.0) < 0 and grad_at(1.30, 1.0) == 0.0 and grad_at(0.5, 1.0) < 0
    # A < 0: the lower edge is 0.8; the upper one never stops a negative advantage.
    assert grad_at(0.82, -1.0) > 0 and grad_at(0.78, -1.0) == 0.0 and grad_at(1.5, -1.0) > 0
    _, _, aux = losses.grpo_policy_loss(jnp.log(jnp.array([[1.3, 0.7]])), jnp.zeros((1, 2)), jnp.array([1.0]),
                                        jnp.ones((1, 2)), clip_low=0.2, clip_high=0.28)
    assert float(aux["clip_high"]) == 1.0 and float(aux["clip_low"]) == 0.0  # 0.7 with A > 0: not clipped
    _, _, aux = losses.grpo_policy_loss(jnp.log(jnp.array([[1.3, 0.7]])), jnp.zeros((1, 2)), jnp.array([-1.0]),
                                        jnp.ones((1, 2)), clip_low=0.2, clip_high=0.28)
    assert float(aux["clip_high"]) == 0.0 and float(aux["clip_low"]) == 1.0


def test_gspo_ratio_is_exp_of_the_mean_token_log_ratio():
    s, c, aux = losses.grpo_policy_loss(NEW, OLD, jnp.ones((B,)), MASK, clip_low=10.0, clip_high=10.0,
                                        ratio_level="sequence", aggregation="sequence_mean")
    mean_log_ratio = np.array([float(np.mean(np.asarray(NEW - OLD)[i, :LENGTHS[i]])) for i in range(B)])
    np.testing.assert_allclose(float(s / c), -np.mean(np.exp(mean_log_ratio)), rtol=1e-5)  # A = 1: loss = −s
    np.testing.assert_allclose(float(aux["ratio"]), np.sum(np.exp(mean_log_ratio) * LENGTHS), rtol=1e-5)


def test_k3_gradient_is_the_reverse_kl_gradient_in_expectation():
    """On-policy, E_{y~π}[∇ k3(log π(y), log π_ref(y))] = ∇ KL(π_ref ‖ π): summed exactly over a
    5-way categorical. It is not ∇ KL(π ‖ π_ref) (checked to differ), which is why the β > 0
    bandit below has the reverse-KL optimum."""
    z = jnp.array([0.3, -1.0, 0.5, 2.0, 0.0])
    log_ref = jax.nn.log_softmax(jnp.array([1.0, 0.0, -0.5, 0.2, 0.4]))

    def expected_k3_grad(z):
        pi = jax.lax.stop_gradient(jax.nn.softmax(z))  # the sampling distribution is not differentiated
        k3 = losses.kl_k3(jax.nn.log_softmax(z), log_ref)
        return jnp.sum(pi * k3)

    g = np.asarray(jax.grad(expected_k3_grad)(z))
    reverse = np.asarray(jax.grad(lambda z: jnp.sum(jnp.exp(log_ref) * (log_ref - jax.nn.log_softmax(z))))(z))
    forward = np.asarray(jax.grad(lambda z: jnp.sum(jax.nn.softmax(z) * (jax.nn.log_softmax(z) - log_ref)))(z))
    np.testing.assert_allclose(g, reverse, atol=1e-6)
    assert np.max(np.abs(g - forward)) > 0.05
