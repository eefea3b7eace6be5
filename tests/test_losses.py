"""Tests for jaxlm.losses: numpy references, hand-computed golden values, invariances.

Tolerances are fixed in advance: 1e-5 for float32 math against float64 references, 1e-6 for
exact identities, 1e-4 for finite differences. Shapes are tiny and jitted functions are shared.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import losses

LN2 = math.log(2.0)

token_log_probs = jax.jit(losses.token_log_probs)
token_cross_entropy = jax.jit(losses.token_cross_entropy)
entropy_from_logits = jax.jit(losses.entropy_from_logits)
dpo_loss = jax.jit(losses.dpo_loss, static_argnames="loss_type")
ppo_policy_loss = jax.jit(losses.ppo_policy_loss)
ppo_value_loss = jax.jit(losses.ppo_value_loss)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


@pytest.fixture(scope="module")
def lm_batch():
    rng = np.random.default_rng(0)
    B, T, V = 2, 6, 11
    logits = rng.normal(scale=3.0, size=(B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    weights = (rng.random((B, T)) < 0.7).astype(np.float32)
    return logits, targets, weights


# ---------------------------------------------------------------------------------------------
# LM targets, log-probs, cross-entropy
# ---------------------------------------------------------------------------------------------


def test_next_token_targets_on_packed_rows():
    tokens = np.array([[10, 11, 12, 20, 21, 22, 0, 0],
                       [30, 31, 40, 41, 42, 50, 51, 0]], np.int32)
    segment_ids = np.array([[1, 1, 1, 2, 2, 2, 0, 0],
                            [1, 1, 2, 2, 2, 3, 3, 0]], np.int32)
    # Row 0: SFT, first token of each document is prompt. Row 1: pretraining, every real token.
    loss_mask = np.array([[0, 1, 1, 0, 1, 1, 0, 0],
                          [1, 1, 1, 1, 1, 1, 1, 0]], np.int32)
    targets, weights = losses.next_token_targets(tokens, segment_ids, loss_mask)
    np.testing.assert_array_equal(targets, [[11, 12, 20, 21, 22, 0, 0, 0],
                                            [31, 40, 41, 42, 50, 51, 0, 0]])
    np.testing.assert_array_equal(weights, [[1, 1, 0, 1, 1, 0, 0, 0],
                                            [1, 0, 1, 1, 0, 1, 0, 0]])
    assert weights.dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_log_probs_matches_numpy(lm_batch, dtype, temperature):
    logits, targets, _ = lm_batch
    x = jnp.asarray(logits, dtype)
    got = token_log_probs(x, targets, temperature)
    assert got.dtype == jnp.float32 and got.shape == targets.shape
    ref_lp = np_log_softmax(np.asarray(x.astype(jnp.float32), np.float64) / temperature)
    want = np.take_along_axis(ref_lp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_token_cross_entropy_matches_numpy(lm_batch, z_loss):
    logits, targets, weights = lm_batch
    loss_sum, weight_sum = token_cross_entropy(logits, targets, weights, z_loss=z_loss)
    x = np.asarray(logits, np.float64)
    lse = np.log(np.exp(x).sum(-1))
    nll = lse - np.take_along_axis(x, targets[..., None], -1)[..., 0]
    want = np.sum(weights * (nll + z_loss * lse ** 2))
    np.testing.assert_allclose(loss_sum, want, rtol=1e-5)
    np.testing.assert_allclose(weight_sum, weights.sum(), rtol=0)


def test_token_cross_entropy_ignores_garbage_at_zero_weight(lm_batch):
    logits, targets, weights = lm_batch
    poisoned = logits.copy()
    poisoned[weights == 0] = np.nan
    f = lambda lg: token_cross_entropy(lg, targets, weights)[0]
    np.testing.assert_allclose(f(poisoned), f(logits), rtol=1e-6)
    assert np.all(np.isfinite(jax.grad(f)(logits)))


def test_cross_entropy_sums_make_accumulation_exact(lm_batch):
    logits, targets, weights = lm_batch
    full_sum, full_count = token_cross_entropy(logits, targets, weights)
    parts = [token_cross_entropy(logits[i:i + 1], targets[i:i + 1], weights[i:i + 1])
             for i in range(logits.shape[0])]
    np.testing.assert_allclose(sum(p[0] for p in parts) / sum(p[1] for p in parts),
                               full_sum / full_count, rtol=1e-6)


def test_sequence_log_prob_is_brute_force_sum_over_response_only():
    rng = np.random.default_rng(1)
    V = 7
    # Two left pads, a 3-token prompt, a 3-token response, two pads on the right.
    tokens = np.array([[0, 0, 3, 1, 4, 5, 2, 6, 0, 0]], np.int32)
    segment_ids = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 0, 0]], np.int32)
    loss_mask = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 0, 0]], np.int32)
    prompt_end = 5  # tokens[2:5] are the prompt, tokens[5:8] the response
    logits = rng.normal(size=(1, tokens.shape[1], V)).astype(np.float32)
    targets, weights = losses.next_token_targets(tokens, segment_ids, loss_mask)
    seq = losses.sum_token_log_probs(token_log_probs(logits, targets), weights)
    lp = np_log_softmax(logits[0])
    want = sum(lp[t - 1, tokens[0, t]] for t in range(prompt_end, 8))
    np.testing.assert_allclose(seq, [want], rtol=1e-5)


def test_sum_token_log_probs_drops_masked_minus_inf():
    logps = np.array([[-1.0, -2.0, -np.inf]], np.float32)
    np.testing.assert_allclose(losses.sum_token_log_probs(logps, np.array([[1, 1, 0]])), [-3.0])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_entropy_matches_numpy(lm_batch, temperature):
    logits, _, _ = lm_batch
    lp = np_log_softmax(np.asarray(logits, np.float64) / temperature)
    want = -(np.exp(lp) * lp).sum(-1)
    np.testing.assert_allclose(entropy_from_logits(logits, temperature), want, rtol=1e-5, atol=1e-5)


def test_entropy_uniform_and_masked_vocab():
    V = 8
    uniform = np.zeros((1, 1, V), np.float32)
    np.testing.assert_allclose(entropy_from_logits(uniform, 1.0), [[math.log(V)]], rtol=1e-6)
    half = np.array([[[0.0] * 4 + [-np.inf] * 4]], np.float32)
    np.testing.assert_allclose(entropy_from_logits(half, 1.0), [[math.log(4)]], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------


def test_kl_zero_at_policy_equals_reference():
    logp = np.log(np.array([0.1, 0.5, 0.9, 1e-6], np.float32))
    for kind in losses.KL_KINDS:
        np.testing.assert_array_equal(losses.kl_estimate(logp, logp, kind), np.zeros(4))


def test_kl_hand_values():
    logp, ref = np.float32(-1.0), np.float32(-2.0)  # d = ref - logp = -1
    np.testing.assert_allclose(losses.kl_k1(logp, ref), 1.0, rtol=1e-6)
    np.testing.assert_allclose(losses.kl_k2(logp, ref), 0.5, rtol=1e-6)
    np.testing.assert_allclose(losses.kl_k3(logp, ref), math.exp(-1) - 1 + 1, rtol=1e-6)
    np.testing.assert_allclose(losses.kl_k3(ref, logp), math.e - 1 - 1, rtol=1e-6)
    np.testing.assert_allclose(losses.kl_estimate(ref, logp, "k2"), 0.5, rtol=1e-6)


def test_k3_nonnegative():
    rng = np.random.default_rng(2)
    logp = rng.normal(scale=3, size=1000).astype(np.float32)
    ref = (logp + rng.normal(scale=rng.choice([1e-4, 1e-2, 1, 5], 1000))).astype(np.float32)
    assert np.all(np.asarray(losses.kl_k3(logp, ref)) >= 0)


def test_k1_and_k3_unbiased_on_categorical():
    p = np.array([0.5, 0.2, 0.2, 0.1])
    q = np.array([0.25, 0.25, 0.4, 0.1])
    exact = float(np.sum(p * np.log(p / q)))
    logp, logq = np.log(p).astype(np.float32), np.log(q).astype(np.float32)
    for kind in ("k1", "k3"):
        expectation = float(np.sum(p * np.asarray(losses.kl_estimate(logp, logq, kind))))
        np.testing.assert_allclose(expectation, exact, rtol=1e-5)


def test_kl_estimate_rejects_unknown_kind():
    with pytest.raises(ValueError, match="k4"):
        losses.kl_estimate(0.0, 0.0, "k4")


# ---------------------------------------------------------------------------------------------
# Bradley-Terry
# ---------------------------------------------------------------------------------------------


def test_bt_ln2_at_zero_or_equal_rewards():
    for r in (np.zeros(3), np.array([1.5, -2.0, 7.0])):
        loss_sum, count, aux = losses.bradley_terry_loss(r, r)
        np.testing.assert_allclose(loss_sum / count, LN2, rtol=1e-6)
        np.testing.assert_array_equal(aux["accuracy"], np.zeros(3))  # ties are not correct
        np.testing.assert_array_equal(aux["margin"], np.zeros(3))


def test_bt_hard_and_margin_hand_values():
    rc, rr = np.array([2.0, 0.0, 1.0]), np.array([1.0, 3.0, 1.0])
    loss_sum, count, aux = losses.bradley_terry_loss(rc, rr)
    want = np.sum(-np_log_sigmoid(rc - rr))
    np.testing.assert_allclose(loss_sum, want, rtol=1e-6)
    assert count == 3
    np.testing.assert_array_equal(aux["accuracy"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(aux["margin"], [1.0, -3.0, 0.0])
    # Δ = m gives ln 2 per example, with a per-example margin.
    loss_sum, _, _ = losses.bradley_terry_loss(rc, rr, margin=rc - rr)
    np.testing.assert_allclose(loss_sum, 3 * LN2, rtol=1e-6)
    loss_sum, _, _ = losses.bradley_terry_loss(np.array([2.5]), np.array([0.5]), margin=2.0)
    np.testing.assert_allclose(loss_sum, LN2, rtol=1e-6)


def test_bt_soft_label_hand_values():
    # Δ = 1, p = 0.8: -0.8 log σ(1) - 0.2 log σ(-1).
    want = 0.8 * math.log1p(math.exp(-1)) + 0.2 * math.log1p(math.exp(1))
    loss_sum, _, _ = losses.bradley_terry_loss(np.array([1.0]), np.array([0.0]), label=np.array([0.8]))
    np.testing.assert_allclose(loss_sum, want, rtol=1e-6)
    # p = 1 is the hard loss; z = 0 is ln 2 whatever p.
    hard, _, _ = losses.bradley_terry_loss(np.array([1.0]), np.array([0.0]))
    soft1, _, _ = losses.bradley_terry_loss(np.array([1.0]), np.array([0.0]), label=np.array([1.0]))
    np.testing.assert_allclose(soft1, hard, rtol=1e-6)
    tie, _, _ = losses.bradley_terry_loss(np.zeros(2), np.zeros(2), label=np.array([0.3, 0.9]))
    np.testing.assert_allclose(tie, 2 * LN2, rtol=1e-6)


def test_bt_margin_with_soft_labels_is_symmetric():
    """-p log σ(Δ - m) - (1-p) log σ(-Δ - m): each outcome asks for its own margin.

    Reference: the Bradley-Terry likelihood with a margin (Llama 2, eq. 2) for the preferred side
    of each outcome, mixed by the label as a cross-entropy; a 50/50 label carries no preference,
    so its minimum must be at Δ = 0, and p = 0 must be p = 1 with the sides swapped.
    """
    m = 1.5
    bt = lambda rc, p: losses.bradley_terry_loss(jnp.array([rc]), jnp.zeros(1), margin=m, label=jnp.array([p]))[0]
    grad_at = lambda rc, p: float(jax.grad(bt)(rc, p))
    assert abs(grad_at(0.0, 0.5)) < 1e-7  # the tie's minimum is Δ = 0
    assert grad_at(m, 0.5) > 0.1  # and not Δ = m
    for d in (-2.0, 0.3, 4.0):
        np.testing.assert_allclose(bt(d, 1.0), -np_log_sigmoid(d - m), rtol=1e-6)
        np.testing.assert_allclose(bt(d, 0.0), -np_log_sigmoid(-d - m), rtol=1e-6)
        swapped = losses.bradley_terry_loss(jnp.zeros(1), jnp.array([d]), margin=m)[0]
        np.testing.assert_allclose(bt(d, 0.0), swapped, rtol=1e-6)
        want = -0.3 * np_log_sigmoid(d - m) - 0.7 * np_log_sigmoid(-d - m)
        np.testing.assert_allclose(bt(d, 0.3), want, rtol=1e-6)


def test_bt_weights_and_stability():
    rc, rr = np.array([1e4, -1e4, 0.0], np.float32), np.zeros(3, np.float32)
    loss_sum, count, aux = losses.bradley_terry_loss(rc, rr, weights=np.array([1.0, 1.0, 0.0]))
    np.testing.assert_allclose(loss_sum, 1e4, rtol=1e-6)  # -log σ(1e4) = 0, -log σ(-1e4) = 1e4
    assert count == 2
    np.testing.assert_allclose(aux["loss"], [0.0, 1e4, LN2], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# DPO family
# ---------------------------------------------------------------------------------------------

BETA = 0.1


@pytest.fixture(scope="module")
def pair_logps():
    rng = np.random.default_rng(3)
    return [(-rng.random(4) * 50).astype(np.float32) for _ in range(2)]


@pytest.mark.parametrize("loss_type,eps,want", [
    ("sigmoid", 0.0, LN2),
    ("cdpo", 0.1, LN2),
    ("robust", 0.1, LN2),
    ("hinge", 0.0, 1.0),
    ("ipo", 0.0, 1.0 / (4 * BETA ** 2)),
])
def test_dpo_at_policy_equals_reference(pair_logps, loss_type, eps, want):
    c, r = pair_logps
    loss_sum, count, aux = dpo_loss(c, r, c, r, beta=BETA, loss_type=loss_type, label_smoothing=eps)
    np.testing.assert_allclose(loss_sum / count, want, rtol=1e-5)
    for k in ("chosen_rewards", "rejected_rewards", "margin", "accuracy"):
        np.testing.assert_array_equal(aux[k], np.zeros(4))


def _dpo_of_delta(delta, loss_type="sigmoid", eps=0.0, beta=BETA):
    d = jnp.atleast_1d(delta)
    z = jnp.zeros_like(d)
    return dpo_loss(d, z, z, z, beta=beta, loss_type=loss_type, label_smoothing=eps)[0]


def test_dpo_sigmoid_gradient_at_zero():
    g = jax.grad(_dpo_of_delta)(jnp.float32(0.0))
    np.testing.assert_allclose(g, -BETA / 2, rtol=1e-6)
    h = 1e-2
    fd = (_dpo_of_delta(jnp.float32(h)) - _dpo_of_delta(jnp.float32(-h))) / (2 * h)
    np.testing.assert_allclose(fd, -BETA / 2, atol=1e-4)


def test_dpo_swap_identity():
    deltas = jnp.array([-30.0, -2.0, 0.5, 3.0, 25.0])
    z = jnp.zeros_like(deltas)
    per = lambda d, lt, e: dpo_loss(d, z, z, z, beta=BETA, loss_type=lt, label_smoothing=e)[2]["loss"]
    np.testing.assert_allclose(per(deltas, "sigmoid", 0.0) - per(-deltas, "sigmoid", 0.0),
                               -BETA * deltas, atol=1e-5)
    # cDPO shrinks the identity by (1 - 2ε).
    np.testing.assert_allclose(per(deltas, "cdpo", 0.1) - per(-deltas, "cdpo", 0.1),
                               -0.8 * BETA * deltas, atol=1e-5)


def test_dpo_hand_values_away_from_zero():
    # Δ = (−1 − −3) − (−4 − −2) = 4, βΔ = 0.4.
    pc, pr, rc, rr = [np.array([v], np.float32) for v in (-1.0, -4.0, -3.0, -2.0)]
    x = BETA * 4.0
    ls = lambda x: -math.log1p(math.exp(-x))  # log σ(x)
    eps = 0.2
    cases = {
        ("sigmoid", 0.0): -ls(x),
        ("cdpo", eps): -(1 - eps) * ls(x) - eps * ls(-x),
        ("robust", eps): ((1 - eps) * -ls(x) - eps * -ls(-x)) / (1 - 2 * eps),
        ("hinge", 0.0): 1.0 - x,
        ("ipo", 0.0): (4.0 - 1 / (2 * BETA)) ** 2,
    }
    for (lt, e), want in cases.items():
        loss_sum, _, aux = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=lt, label_smoothing=e)
        np.testing.assert_allclose(loss_sum, want, rtol=1e-5, err_msg=lt)
    np.testing.assert_allclose(aux["chosen_rewards"], [0.2], rtol=1e-6)
    np.testing.assert_allclose(aux["rejected_rewards"], [-0.2], rtol=1e-6)
    np.testing.assert_array_equal(aux["accuracy"], [1.0])
    np.testing.assert_allclose(aux["margin"], [0.4], rtol=1e-6)
    # Hinge is flat once βΔ >= 1.
    np.testing.assert_allclose(_dpo_of_delta(jnp.float32(20.0), "hinge"), 0.0, atol=0)


def test_dpo_no_gradient_to_reference_and_weights(pair_logps):
    c, r = pair_logps
    f = lambda rc, rr: dpo_loss(c + 1, r, rc, rr, beta=BETA)[0]
    gc, gr = jax.grad(f, argnums=(0, 1))(c, r)
    np.testing.assert_array_equal(gc, np.zeros(4))
    np.testing.assert_array_equal(gr, np.zeros(4))
    w = np.array([1.0, 0.0, 2.0, 1.0], np.float32)
    loss_sum, count, aux = dpo_loss(c + 1, r, c, r, beta=BETA, weights=w)
    np.testing.assert_allclose(loss_sum, np.sum(w * np.asarray(aux["loss"])), rtol=1e-6)
    assert count == 4.0


def test_dpo_bf16_inputs_give_float32(pair_logps):
    c, r = [jnp.asarray(x, jnp.bfloat16) for x in pair_logps]
    loss_sum, count, aux = dpo_loss(c, r, c, r, beta=BETA)
    assert loss_sum.dtype == jnp.float32 and aux["margin"].dtype == jnp.float32
    np.testing.assert_allclose(loss_sum / count, LN2, rtol=1e-6)


def test_dpo_config_validation_and_call(pair_logps):
    cfg = losses.DPOConfig(beta=BETA, loss_type="ipo")
    c, r = pair_logps
    np.testing.assert_allclose(cfg(c, r, c, r)[0] / 4, 1.0 / (4 * BETA ** 2), rtol=1e-5)
    with pytest.raises(ValueError, match="loss_type"):
        losses.DPOConfig(loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        losses.DPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="robust"):
        losses.DPOConfig(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.DPOConfig(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(Exception):
        cfg.beta = 1.0  # frozen


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------


def test_ppo_policy_at_ratio_one():
    rng = np.random.default_rng(4)
    logp = -rng.random((3, 5)).astype(np.float32) * 5
    adv = rng.normal(size=(3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.float32)
    loss_sum, count, aux = ppo_policy_loss(logp, logp, adv, mask, clip_eps=0.2)
    assert count == mask.sum()
    np.testing.assert_allclose(loss_sum / count, -adv[mask > 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["ratio_mean"], 1.0, rtol=0)
    assert aux["approx_kl"] == 0.0 and aux["clip_fraction"] == 0.0


def test_ppo_policy_clipping_hand_case():
    eps = 0.2
    ratios = np.array([1.5, 0.5, 0.5, 1.5, 1.1, 3.0], np.float32)
    adv = np.array([1.0, -1.0, 1.0, -1.0, 2.0, 100.0], np.float32)
    mask = np.array([1, 1, 1, 1, 1, 0], np.float32)
    old = np.full(6, -2.0, np.float32)
    logp = (old + np.log(ratios)).astype(np.float32)
    logp[5] = -np.inf  # a padding slot with garbage must not matter
    # Per token: clipped -1.2, clipped 0.8, unclipped -0.5, unclipped 1.5, inside -2.2.
    f = lambda lp: ppo_policy_loss(lp[None], old[None], adv[None], mask[None], clip_eps=eps)
    (loss_sum, count, aux) = f(logp)
    np.testing.assert_allclose(loss_sum, -1.2 + 0.8 - 0.5 + 1.5 - 2.2, rtol=1e-5)
    assert count == 5
    np.testing.assert_allclose(aux["clip_fraction"], 2 / 5, rtol=1e-6)
    grad = jax.grad(lambda lp: f(lp)[0])(logp)
    # d/dlogp of -A·ρ is -A·ρ; clipped tokens and padding get exactly 0.
    np.testing.assert_allclose(grad, [0.0, 0.0, -0.5, 1.5, -2.2, 0.0], atol=1e-5)
    assert grad[0] == 0.0 and grad[1] == 0.0 and grad[5] == 0.0
    np.testing.assert_allclose(aux["approx_kl"], np.mean(0.5 * np.log(ratios[:5]) ** 2), rtol=1e-5)


def test_ppo_no_gradient_to_old_logp_or_advantages():
    logp = np.array([[-1.0, -2.0]], np.float32)
    mask = np.ones((1, 2), np.float32)
    g_old, g_adv = jax.grad(lambda o, a: ppo_policy_loss(logp, o, a, mask, clip_eps=0.2)[0],
                            argnums=(0, 1))(logp - 0.1, np.ones((1, 2), np.float32))
    np.testing.assert_array_equal(g_old, 0.0)
    np.testing.assert_array_equal(g_adv, 0.0)


def test_ppo_token_level_accumulation_1x8_equals_8x1():
    rng = np.random.default_rng(5)
    B, T = 8, 4
    logp = -rng.random((B, T)).astype(np.float32)
    old = logp + rng.normal(scale=0.3, size=(B, T)).astype(np.float32)
    adv = rng.normal(size=(B, T)).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    grad_full = jax.grad(lambda lp: (lambda s, c, _: s / c)(*ppo_policy_loss(
        lp, old, adv, mask, clip_eps=0.2)))(logp)
    total = mask.sum()
    grad_acc = np.concatenate([
        jax.grad(lambda lp: ppo_policy_loss(lp, old[i:i + 1], adv[i:i + 1], mask[i:i + 1],
                                            clip_eps=0.2)[0] / total)(logp[i:i + 1])
        for i in range(B)])
    np.testing.assert_allclose(grad_acc, grad_full, rtol=1e-6, atol=1e-7)


def test_ppo_value_clipping_hand_case():
    eps = 0.2
    old = np.zeros((1, 6), np.float32)
    v = np.array([[1.0, 0.1, 1.0, -1.0, 1.0, 9.0]], np.float32)
    ret = np.array([[1.0, 1.0, 2.0, -2.0, 0.0, -9.0]], np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 0]], np.float32)
    # 0.5*max: (0, 0.64) → 0.32 clipped; (0.81, 0.81) → 0.405; (1, 3.24) → 1.62 clipped twice;
    # (1, 0.04) → 0.5 unclipped.
    loss_sum, count, aux = ppo_value_loss(v, old, ret, mask, clip_eps=eps)
    np.testing.assert_allclose(loss_sum, 0.32 + 0.405 + 1.62 + 1.62 + 0.5, rtol=1e-5)
    assert count == 5
    np.testing.assert_allclose(aux["clip_fraction"], 3 / 5, rtol=1e-6)
    grad = jax.grad(lambda x: ppo_value_loss(x, old, ret, mask, clip_eps=eps)[0])(v)
    np.testing.assert_allclose(grad, [[0.0, -0.9, 0.0, 0.0, 1.0, 0.0]], atol=1e-6)
    loss0, _, aux0 = ppo_value_loss(old, old, ret, mask, clip_eps=eps)
    np.testing.assert_allclose(loss0, 0.5 * np.sum(mask * ret ** 2), rtol=1e-6)
    assert aux0["clip_fraction"] == 0.0
