"""GRPO family: advantage estimators, surrogate and aggregations, k3, rewards, the step, the binary.

Hand-computed values for every estimator and aggregation, exact gradient accumulation, both
clip edges, GSPO's ratio, the k3 gradient on an enumerable categorical, a one-token bandit with
known optima, reward programs (weights, errors naming the function and prompt), and the binary's
bitwise resume after SIGKILL.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

from jaxlm import checkpoint, init_source, losses, rewards, rl, sampling, sharding
from jaxlm.model import Model, ModelConfig
from jaxlm.steps import grpo, ppo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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

    accumulated, whole = jax.jit(accumulated), jax.jit(whole)  # one compile each, not op by op
    np.testing.assert_allclose(float(accumulated(NEW)), float(whole(NEW)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(accumulated))(NEW)),
                               np.asarray(jax.jit(jax.grad(whole))(NEW)), rtol=1e-5, atol=1e-8)


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


# ------------------------------------------------------------------------------------------------
# Rewards as programs
# ------------------------------------------------------------------------------------------------


def fails_on_plus(prompts, completions, records):
    """A reward that raises on some prompts only (the error must name the first of them)."""
    return [1.0 / ("plus" not in p) for p in prompts]


def nan_on_second(prompts, completions, records):
    return [0.0, float("nan")] + [0.0] * (len(prompts) - 2)


def test_rewards_are_weighted_programs_and_failures_name_the_function_and_prompt():
    specs = rewards.parse_rewards("jaxlm.rewards:tinyworld_verifier=1.0, jaxlm.rewards:think_format=0.5")
    assert specs == [("jaxlm.rewards:tinyworld_verifier", 1.0), ("jaxlm.rewards:think_format", 0.5)]
    reward_set = rewards.RewardSet.from_specs(specs)
    p = "What is 3 plus 1 plus 5 plus 2?"
    completions = ["<think>3 plus 1 is 4. 4 plus 5 is 9. 9 plus 2 is 11.</think> The answer is 11.",
                   "The answer is 11.", "<think>3 plus 1 is 4.", "The answer is 20."]
    total, parts = reward_set.score([p] * 4, completions, [{}] * 4)
    np.testing.assert_allclose(parts["tinyworld_verifier"], [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(parts["think_format"], [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(total, [1.5, 1.0, 0.0, 0.0])
    with pytest.raises(rewards.RewardError, match=r"test_grpo:fails_on_plus raised ZeroDivisionError.*"
                                                  r"first failing prompt: 'What is 1 plus 2\?'"):
        rewards.RewardSet.from_specs([("test_grpo:fails_on_plus", 1.0)]).score(
            ["What is 1?", "What is 1 plus 2?"], ["a", "b"], [{}, {}])
    with pytest.raises(rewards.RewardError, match=r"nan_on_second gave nan on prompt 'q2'"):
        rewards.RewardSet.from_specs([("test_grpo:nan_on_second", 1.0)]).score(["q1", "q2", "q3"], ["a"] * 3, [{}] * 3)
    for bad, match in (("jaxlm.rewards", "module:function"), ("no_such_module:f", "cannot import"),
                       ("jaxlm.rewards:nothing", "no callable")):
        with pytest.raises(ValueError, match=match):
            rewards.load_reward(bad)


def test_overlong_penalty_is_dapos_soft_ramp():
    np.testing.assert_allclose(grpo.overlong_penalty(np.array([10, 40, 44, 48, 48]), np.array([1, 1, 1, 1, 0]), 48, 8),
                               [0.0, 0.0, -0.5, -1.0, -1.0])


# ------------------------------------------------------------------------------------------------
# A one-token bandit with known optima, through the real sampler and update step
# ------------------------------------------------------------------------------------------------

TARGET, VOCAB = 2, 4


@pytest.fixture(scope="module")
def bandit():
    """What both bandits share, so the sampler and the probabilities compile once: the model (the
    sampler's compiled function is keyed by the Model object), the reference and the prompts."""
    model = Model(ModelConfig(vocab_size=VOCAB, num_layers=1, d_model=16, num_heads=2, num_kv_heads=1, max_seq_len=4,
                              init_std=0.3))
    models = ppo.lm_models(model, None, None)
    every = sampling.prompt_response_layout(np.ones((VOCAB, 1), np.int32), np.ones((VOCAB,), np.int32),
                                            np.arange(VOCAB)[:, None], np.ones((VOCAB, 1)))
    return dict(model=model, models=models, ref=jax.jit(model.init)(jax.random.PRNGKey(0)),
                ref_fn=jax.jit(lambda ref, b: grpo.reference_log_probs(models, ref, b, 1.0)),
                probs=jax.jit(lambda p: jnp.exp(ppo.rollout_log_probs(models, p, every, 1.0)[0][:, 0])),
                prompts=np.ones((256, 1), np.int32), lengths=np.ones((256,), np.int32))


def _bandit(bandit, beta: float, iterations: int, estimator: str):
    """Policy: one response token after a one-token prompt; reward 1 for TARGET (exact match)."""
    model, models, ref, prompts, lengths = (bandit[k] for k in ("model", "models", "ref", "prompts", "lengths"))
    cfg = grpo.GRPOConfig(group_size=8, estimator=estimator, beta=beta, max_new_tokens=1, clip_low=0.2,
                          clip_high=0.2)
    tx = optax.adam(optax.linear_schedule(3e-2, 0.0, iterations))
    state, _ = grpo.create_grpo_state(model, tx, sharding.make_mesh(), 0, ref)
    update = jax.jit(grpo.make_update_step(models, cfg, tx), donate_argnums=0)
    mismatch = []
    for _ in range(iterations):
        sample_key, shuffle_key = grpo.iteration_keys(state)
        out = sampling.generate(model, state.params, prompts, lengths, max_new_tokens=1, rng=sample_key, eos_id=None,
                                pad_id=0)
        batch = ppo.rollout_batch(prompts, lengths, out)
        r = (out.tokens[:, 0] == TARGET).astype(jnp.float32)
        data = {**batch, "old_logp": batch["sampled_logp"], "loss_mask": batch["response_mask"],
                "advantages": rl.group_advantages(r, 8, estimator)}
        if beta > 0:
            data["ref_logp"] = bandit["ref_fn"](ref, data)
        state, metrics = grpo.train_on_rollout(update, state, data, epochs=1, minibatch_size=256, key=shuffle_key)
        mismatch.append(metrics["logprob_mismatch"])
    assert int(state.iteration) == iterations and max(mismatch) < 1e-5  # sampler = trainer on the first update
    return np.asarray(bandit["probs"](ref), np.float64), np.asarray(bandit["probs"](state.params), np.float64)


def test_update_step_with_8_microbatches_equals_one_batch(aggregation="sequence_mean"):
    """The step's scan over micro-batches (sums and normalisers) against one pass over 8 rows."""
    cfg_model = ModelConfig(vocab_size=VOCAB * 4, num_layers=1, d_model=16, num_heads=2, num_kv_heads=1,
                            max_seq_len=16)
    model = Model(cfg_model)
    models = ppo.lm_models(model, None, None)
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    prompts, lengths = rng.integers(1, 16, (8, 3)).astype(np.int32), np.array([3, 2, 3, 1, 3, 3, 2, 3], np.int32)
    response = rng.integers(1, 16, (8, 5)).astype(np.int32)
    mask = (np.arange(5)[None] < np.array([5, 3, 1, 4, 5, 2, 3, 5])[:, None]).astype(np.float32)
    batch = sampling.prompt_response_layout(prompts, lengths, response, mask)
    logp = jax.jit(lambda p, b: grpo.reference_log_probs(models, p, b, 1.0))(params, batch)  # one compile
    batch.update(loss_mask=batch["response_mask"], old_logp=logp - 0.1 * jnp.asarray(mask),
                 ref_logp=logp + 0.2 * jnp.asarray(mask), advantages=jnp.asarray(rng.normal(size=8), jnp.float32))
    tx = optax.sgd(1.0)
    out = []
    for accum in (1, 8):
        cfg = grpo.GRPOConfig(group_size=8, aggregation=aggregation, max_new_tokens=5, grad_accum=accum, beta=0.04)
        state, _ = grpo.create_grpo_state(model, tx, sharding.make_mesh(), 0, params)
        out.append(jax.jit(grpo.make_update_step(models, cfg, tx))(state, batch))
    (s1, m1), (s8, m8) = out
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    for k in ("loss", "clip_low", "clip_high", "ratio", "k3", "entropy", "logprob_mismatch"):
        np.testing.assert_allclose(float(m1[k]), float(m8[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(float(m1["logprob_mismatch"]), 0.1, rtol=1e-5)


def test_bandit_reaches_reward_one_without_kl(bandit):
    ref, pi = _bandit(bandit, beta=0.0, iterations=15, estimator="grpo")
    assert ref[TARGET] < 0.5 and pi[TARGET] > 0.97


def test_bandit_with_kl_reaches_the_reverse_kl_optimum(bandit):
    """With RLOO's unbiased advantages and on-policy updates, the expected gradient is that of
    E[r] − β·KL(π_ref ‖ π) (k3's, above); its maximiser is computed exactly and must be reached.
    The KL(π ‖ π_ref) optimum π_ref·exp(r/β), which PPO's k1 penalty reaches, is a different
    distribution here, and the run must land measurably closer to the reverse-KL one."""
    beta = 0.5
    ref, pi = _bandit(bandit, beta=beta, iterations=60, estimator="rloo")
    r = (np.arange(VOCAB) == TARGET).astype(np.float64)
    z = np.log(ref)
    for _ in range(20000):  # Gradient ascent on the exact objective over logits (concave in π's logits here).
        q = np.exp(z - z.max()); q /= q.sum()
        grad = q * (r - q @ r) - beta * (q - ref)
        z += 0.5 * grad
    q = np.exp(z - z.max()); q /= q.sum()
    gibbs = ref * np.exp(r / beta); gibbs /= gibbs.sum()
    kl = lambda a, b: float(np.sum(a * np.log(a / b)))
    assert kl(gibbs, q) > 0.02  # the two optima differ
    assert kl(pi, q) < 0.01 and kl(pi, q) < kl(pi, gibbs) / 3, (pi, q, gibbs)


# ------------------------------------------------------------------------------------------------
# The binary
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """TinyWorld files, a tokenizer with the think markers, a random-init 'SFT' checkpoint and a
    random 'reward' run (a reward model whose head is not zero, so its scores vary)."""
    from jaxlm.data import tinyworld
    from jaxlm.data.chat import REASONING_MARKERS
    from jaxlm.data.tokenizer import train_tokenizer
    from jaxlm.reward_model import ScalarHeadModel
    d = tmp_path_factory.mktemp("stages")
    tinyworld.make_all(str(d / "data"), seed=0, log=lambda _: None, corpus_train=300, corpus_valid=10, sft_train=10,
                       sft_valid=10, eval_per_family=2, eval_reasoning=8, preferences_train=10, preferences_valid=10,
                       rl_prompts=10, redteam_prompts=4, reasoning_prompts=40)
    tok = train_tokenizer(str(d / "data" / "corpus_train.jsonl"), str(d / "tokenizer"), vocab_size=400,
                          user_defined_symbols=REASONING_MARKERS)
    cfg = ModelConfig(vocab_size=-(-tok.vocab_size // 128) * 128, num_layers=1, d_model=32, num_heads=2,
                      num_kv_heads=1, max_seq_len=128)
    params = Model(cfg).init(jax.random.PRNGKey(0))
    rm_params = ScalarHeadModel(cfg).init(jax.random.PRNGKey(1))
    rm_params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), (cfg.d_model,))
    for stage, state in (("sft", params), ("reward", rm_params)):
        ckpt = checkpoint.Checkpointer(str(d / stage / "checkpoints"))
        ckpt.save(1, {"step": jnp.int32(1), "params": state},
                  meta={"stage": stage, "model": dataclasses.asdict(cfg), "tokenizer": str(d / "tokenizer.model"),
                        "config": {}})
        ckpt.close()
        (d / stage / "tokenizer.model").write_bytes((d / "tokenizer.model").read_bytes())  # a run keeps its tokenizer
    return d


def test_a_reward_run_scores_each_row_at_its_last_token(stages):
    """`RewardModelScorer` of a jaxlm reward run against the model run on each row alone, unpadded."""
    from jaxlm.hf import load_tokenizer
    from jaxlm.reward_model import ScalarHeadModel
    tokenizer = load_tokenizer(str(stages / "tokenizer.model"))
    scorer = rewards.RewardModelScorer.load(str(stages / "reward"), tokenizer)
    rng = np.random.default_rng(0)
    lengths, kept = np.array([3, 1, 2, 3], np.int32), np.array([4, 2, 1, 3])  # prompt tokens, response tokens
    prompts = np.where(np.arange(3)[None] >= 3 - lengths[:, None], rng.integers(1, 300, (4, 3)), 0).astype(np.int32)
    response = rng.integers(1, 300, (4, 4)).astype(np.int32)
    batch = sampling.prompt_response_layout(prompts, lengths, response, np.arange(4)[None] < kept[:, None])
    params, _ = checkpoint.load_params(str(stages / "reward"))
    rm = ScalarHeadModel(scorer.model.cfg)
    expected = []
    for i in range(4):
        row = np.concatenate([prompts[i, 3 - lengths[i]:], response[i, :kept[i]]])[None]
        hidden = rm.trunk.apply(params["trunk"], jnp.asarray(row), compute_logits=False).hidden[0, -1]
        expected.append(float(hidden @ params["head"]["kernel"] + params["head"]["bias"]))
    np.testing.assert_allclose(scorer(batch), expected, rtol=1e-5, atol=1e-6)
    assert np.std(expected) > 1e-3  # the head is not zero: the comparison can fail
    with pytest.raises(ValueError, match="is a 'sft' checkpoint, not a reward model"):
        rewards.RewardModelScorer.load(str(stages / "sft"), tokenizer)


def _grpo_command(stages, workdir, *extra):
    return [sys.executable, "-m", "experiments.grpo", f"--workdir={workdir}", f"--config.policy_from={stages / 'sft'}",
            f"--config.data.dir={stages / 'data'}", "--config.rollout.prompts=4", "--config.rollout.group_size=4",
            "--config.rollout.max_new_tokens=8", "--config.grpo.minibatch_size=8", "--config.train.iterations=4",
            "--config.train.checkpoint_every=2", "--config.train.sample_every=2", "--config.eval.every=4",
            "--config.eval.num_prompts=8", "--config.eval.batch_size=8", "--config.optim.warmup_steps=1",
            "--config.optim.learning_rate=1e-3", "--config.rollout.overlong=penalty",
            f"--config.reward_model.path={stages / 'reward'}", "--config.reward_model.weight=0.5", *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One compilation cache for every run of the binary here: later runs load what the first compiled."""
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _run(stages, env, workdir, *extra, **kw):
    return subprocess.run(_grpo_command(stages, workdir, *extra), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.fixture(scope="module")
def finished_run(stages, env, tmp_path_factory):
    """One tiny finished run (4 iterations; the verifier, the format reward at weight 0, a learned
    reward model at 0.5 and the overlong penalty), shared by the tests that read it."""
    workdir = tmp_path_factory.mktemp("grpo") / "straight"
    proc = _run(stages, env, workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


def test_binary_logs_every_metric_and_each_reward(finished_run):
    metrics = [json.loads(line) for line in open(finished_run / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4]
    first = metrics[1]
    for key in ("reward", "reward/tinyworld_verifier", "reward/think_format", "reward/reward_model",
                "reward/overlong_penalty", "accuracy", "pass_at_g", "groups_dropped", "completion_length",
                "think_share", "reasoning_words", "kl_k3", "kl_k1", "clip_low", "clip_high", "entropy", "loss",
                "logprob_mismatch", "sampling_seconds", "scoring_seconds", "update_seconds", "completions_per_second"):
        assert key in first, key
    for m in metrics[1:]:  # The total is the weighted sum of the terms (means are linear).
        parts = m["reward/tinyworld_verifier"] + 0.5 * m["reward/reward_model"] + m["reward/overlong_penalty"]
        np.testing.assert_allclose(m["reward"], parts, rtol=1e-5, atol=1e-6)
    assert len({m["reward/reward_model"] for m in metrics[1:]}) > 1  # the reward model scores what was sampled
    # Iteration 1 samples the reference: KL 0 to rounding, the sampler's log-probs = the update's.
    assert abs(first["kl_k1"]) < 1e-5 and first["logprob_mismatch"] < 1e-5
    assert {"eval_accuracy", "eval_length", "eval_think_share"} <= set(metrics[0]) & set(metrics[4])
    samples = [json.loads(l) for l in open(finished_run / "samples.jsonl")]
    assert {s["step"] for s in samples} == {2, 4}
    model, _, _ = init_source.load_for_inference(str(finished_run))
    assert model.cfg.d_model == 32


def test_binary_resumes_bitwise_from_a_killed_runs_files(finished_run, stages, env, tmp_path):
    """From what a SIGKILL after iteration 3 leaves: checkpoint 2, and metrics and samples past it
    (the same run's files without checkpoint 4; the loop's own kill tests: test_loop.py). Rollout
    RNG and prompt position (refills included) must come back from the checkpoint."""
    crashed = tmp_path / "crashed"
    shutil.copytree(finished_run, crashed)
    shutil.rmtree(crashed / "checkpoints" / "4")
    resumed = _run(stages, env, crashed)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resuming from step 2" in resumed.stdout
    assert (crashed / "checkpoints" / "4").is_dir()
    for item in ("params", "opt_state", "rng", "step", "iteration"):
        a, _ = checkpoint.load_params(str(finished_run), item=item)
        b, meta = checkpoint.load_params(str(tmp_path / "crashed"), item=item)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=item)
    assert meta["stage"] == "grpo" and int(b) == 4
    step, _ = checkpoint.load_params(str(finished_run), item="step")
    assert int(step) == 4 * 2  # 2 updates of 8 rows per iteration of 4 × 4 completions, refills or not
    metrics = [[json.loads(line) for line in open(d / "metrics.jsonl")] for d in (finished_run, tmp_path / "crashed")]
    assert [m["step"] for m in metrics[0]] == [m["step"] for m in metrics[1]] == [0, 1, 2, 3, 4]
    for a, b in zip(*metrics):
        same = {k for k in a if not k.endswith("_seconds") and k != "completions_per_second"}
        assert {k: a[k] for k in same} == {k: b[k] for k in same}


def test_binary_names_a_failing_reward(stages, env, tmp_path):
    proc = _run(stages, {**env, "PYTHONPATH": os.path.join(ROOT, "tests")}, tmp_path / "bad",
                "--config.rewards=test_grpo:fails_on_plus", "--config.eval.every=0", "--config.train.iterations=1")
    assert proc.returncode != 0
    assert "reward test_grpo:fails_on_plus raised ZeroDivisionError" in proc.stderr, proc.stderr[-3000:]
    assert "first failing prompt: 'What is" in proc.stderr


def test_report_reasoning_section_pairs_grpo_with_sft():
    from experiments import report
    prompts = ["What is 1 plus 1 plus 1 plus 1?", "What is 2 plus 1 plus 1 plus 1?", "What is 1 plus 2?",
               "What is 3 plus 1 plus 1 plus 1?"]
    fam = ["reasoning", "reasoning", "arithmetic", "reasoning"]

    def records(responses, correct, golds):
        return [{"prompt": p, "family": f, "response": r, "parts": {"correct": c}, "gold": g, "length": len(r.split())}
                for p, f, r, c, g in zip(prompts, fam, responses, correct, golds)]

    results = {"SFT": {"records": records(["The answer is 3.", "The answer is 5.", "1 plus 2 is 3.", "x"],
                                          [0.0, 1.0, 1.0, 0.25], [0.0, 1.0, 1.0, 0.2])},
               "GRPO": {"records": records(["<think>a</think> The answer is 4.", "<think>b</think> The answer is 5.",
                                            "1 plus 2 is 3.", "<think>c</think> The answer is 6."],
                                           [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.9, 1.0])}}
    text = report.reasoning_section(results, n_examples=2)
    # Accuracy 1/3 → 3/3: differences (1, 0, 1), mean 0.667, s.e. sqrt(1/3)/sqrt(3) = 0.333.
    assert "| SFT | 0.333 |" in text and "| GRPO | 1.000 |" in text and "| 1.00 |" in text
    assert "| accuracy on reasoning (greedy) | +0.667 ± 0.333 (+2.0 s.e.) |" in text
    assert "| gold (greedy) on the 1 prompts of the other families | not measured |" in text  # one pair: no s.e.
    assert "| What is 1 plus 1 plus 1 plus 1? | The answer is 3. (✗) | <think>a</think> The answer is 4. (✓) |" in text
