"""PPO: log-prob layout, KL at the reference, first-minibatch invariants, frozen models, exact
gradient accumulation, the missing-EOS penalty, an exact KL-regularised bandit optimum, and the
binary end to end: bitwise resume after SIGKILL, two processes equal one, and SIGTERM to one of
two processes stops both at the same iteration."""

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from launch import run
from jaxlm import checkpoint, init_source, rl, sampling, sharding
from jaxlm.model import Model, ModelConfig
from jaxlm.reward_model import ScalarHeadModel
from jaxlm.steps import ppo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS, PAD = 2, 0

# One tiny Transformer for the layout and update tests; peaky (init_std 0.2) so log-probs vary,
# and a vocabulary of 16 so that some rows sample EOS within 10 tokens and some do not.
TINY = ModelConfig(vocab_size=16, num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, max_seq_len=64,
                   init_std=0.2)
_SCORE_FNS = {}


@pytest.fixture(scope="module")
def tiny():
    model, head_model = Model(TINY), ScalarHeadModel(TINY)
    init = jax.jit(model.init)
    params = init(jax.random.PRNGKey(0))
    # Critic and reward model with random (non-zero) heads, so values and scores are not constant.
    critic = head_model.init(None, init(jax.random.PRNGKey(1)))
    critic["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), (TINY.d_model,))
    reward = head_model.init(None, init(jax.random.PRNGKey(3)))
    reward["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(4), (TINY.d_model,))
    return model, head_model, params, critic, reward


def _prompts(extra_pad: int = 0):
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(3, 16, size=n)) for n in (1, 5, 9, 3, 12, 7, 2, 11)]
    tokens, lengths = sampling.prompts_to_batch(prompts, PAD, bucket=16)
    return np.pad(tokens, ((0, 0), (extra_pad, 0)), constant_values=PAD), lengths


@pytest.fixture(scope="module")
def rollout(tiny):
    """8 left-padded prompts, 10 sampled tokens each at T = 0.7; some rows stop at EOS."""
    model, _, params, _, _ = tiny
    tokens, lengths = _prompts()
    sample = sampling.generate(model, params, tokens, lengths, max_new_tokens=10, rng=jax.random.PRNGKey(5),
                               temperature=0.7, eos_id=EOS, pad_id=PAD)
    return tokens, lengths, sample


def _score(tiny, cfg, policy, batch, critic=None):
    """score_rollout with the tiny models (reference = the fixture's params), jitted once per config."""
    model, head_model, params, fixture_critic, reward = tiny
    critic = fixture_critic if critic is None else critic
    if cfg not in _SCORE_FNS:
        models = ppo.lm_models(model, head_model, head_model)
        _SCORE_FNS[cfg] = jax.jit(lambda p, r, c, w, b: ppo.score_rollout(models, cfg, p, r, c, w, b))
    return _SCORE_FNS[cfg](policy, params, critic, reward, batch)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recomputed_log_probs_equal_sampled(tiny, temperature):
    model, _, params, _, _ = tiny
    tokens, lengths = _prompts()
    sample = sampling.generate(model, params, tokens, lengths, max_new_tokens=10, rng=jax.random.PRNGKey(6),
                               temperature=temperature, eos_id=EOS, pad_id=PAD)
    assert 0 < int(sample.ended.sum()) < 8, "want rows that stop at EOS and rows that do not"
    cfg = ppo.PPOConfig(temperature=temperature)
    batch = ppo.rollout_batch(tokens, lengths, sample)
    scored = _score(tiny, cfg, params, batch)
    mask = np.asarray(sample.mask) > 0
    np.testing.assert_allclose(np.asarray(scored["old_logp"])[mask], np.asarray(sample.logprobs)[mask], atol=1e-5)
    assert np.all(np.asarray(scored["old_logp"])[~mask] == 0)
    # More left padding changes nothing: the layout restarts positions at the first real token.
    wide = ppo.rollout_batch(*_prompts(extra_pad=5), sample)
    np.testing.assert_allclose(np.asarray(_score(tiny, cfg, params, wide)["old_logp"]),
                               np.asarray(scored["old_logp"]), atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_policy_logits_equal_the_models_own(tiny, rollout, tied):
    """lm_models projects only the response positions: the same numbers as Model.apply's logits."""
    model = Model(dataclasses.replace(TINY, tie_embeddings=tied))
    params = jax.jit(model.init)(jax.random.PRNGKey(7))
    batch = ppo.rollout_batch(*rollout)
    fast, full = jax.jit(lambda p, b: (ppo.lm_models(model, None, None).policy(p, b), model.apply(
        p, b["tokens"], b["positions"], b["segment_ids"]).logits[:, -11:-1]))(params, batch)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(full), atol=1e-5, rtol=1e-5)


def test_kl_is_zero_when_policy_is_reference(tiny, rollout):
    _, _, params, _, _ = tiny
    cfg = ppo.PPOConfig(temperature=0.7)
    batch = ppo.rollout_batch(*rollout)
    scored = _score(tiny, cfg, jax.tree.map(jnp.copy, params), batch)
    np.testing.assert_array_equal(np.asarray(scored["old_logp"]), np.asarray(scored["ref_logp"]))
    adv = ppo.compute_advantages(scored, batch, ppo.PPOConfig(), kl_coef=0.5)
    assert np.all(np.asarray(adv["kl"]) == 0.0)
    stats = ppo.rollout_stats(batch, scored, ppo.compute_advantages(scored, batch, cfg, 0.5), 0.5)
    assert float(stats["kl_k1"]) == 0.0 and float(stats["kl_k3"]) == 0.0


def test_rollouts_refuse_filtered_sampling():
    """Top-k/top-p draw from a renormalised subset q while the sampler records log p (the full
    distribution, `jaxlm.sampling`'s convention), so π_θ/π_old would be computed against the
    wrong behaviour policy (the importance weight must be π_θ/q; Schulman et al. 2017, eq. 6).
    RL rollouts refuse them before sampling."""
    for top_k, top_p in ((5, 1.0), (0, 0.9)):
        with pytest.raises(ValueError, match="RL rollouts must sample from the full distribution"):
            ppo.sample_rollout(None, None, None, None, max_new_tokens=4, rng=None, temperature=1.0, eos_id=0,
                               pad_id=0, top_k=top_k, top_p=top_p)
    ppo.check_rollout_sampling(0, 1.0)


def _update_fixture(tiny, rollout, cfg, policy_tx, critic_tx, policy_params=None):
    model, head_model, params, critic, reward = tiny
    models = ppo.lm_models(model, head_model, head_model)
    state, _ = ppo.create_ppo_state(model, head_model, policy_tx, critic_tx, rl.FixedKLController(jnp.float32(0.1)),
                                    sharding.make_mesh(), 0, params if policy_params is None else policy_params,
                                    reward)
    batch = ppo.rollout_batch(*rollout)
    scored = _score(tiny, dataclasses.replace(cfg, grad_accum=1), state.params, batch, critic=state.critic)
    data = {**batch, **scored, **ppo.compute_advantages(scored, batch, cfg, 0.1)}
    return models, state, data


def test_first_minibatch_is_on_policy_and_frozen_models_stay_bit_identical(tiny, rollout):
    """Policy = reference and critic = reward model *as the same arrays*: donation must not touch them."""
    _, _, params, _, reward = tiny
    frozen = jax.tree.map(np.array, (params, reward))
    cfg = ppo.PPOConfig(temperature=0.7)
    tx = optax.adam(1e-2)
    models, state, data = _update_fixture(tiny, rollout, cfg, tx, tx)
    step = jax.jit(ppo.make_update_step(models, cfg, tx, tx), donate_argnums=0)
    new_state, m = step(state, data)
    assert abs(float(m["ratio_mean"]) - 1.0) < 1e-6
    assert float(m["approx_kl"]) < 1e-12
    assert float(m["clip_fraction"]) == 0.0 and float(m["value_clip_fraction"]) == 0.0
    moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(new_state.params),
                                                              jax.tree.leaves(frozen[0]))]
    assert max(moved) > 1e-3, "the update changed nothing"
    for a, b in zip(jax.tree.leaves((params, reward)), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # A second update on the same rollout is off-policy: the ratio has moved.
    _, m2 = step(new_state, data)
    assert float(m2["approx_kl"]) > 1e-8


def test_gradient_accumulation_1x8_equals_8x1(tiny, rollout):
    """Token-level normalisation: one minibatch of 8 rows == 8 microbatches of 1 row. SGD makes
    each update proportional to the gradient, so the updates must agree to float32 summation
    order (~1e-6 relative); averaging per-microbatch means instead would miss by O(1)."""
    tx = optax.sgd(0.5)
    out = []
    for accum in (1, 8):
        cfg = ppo.PPOConfig(temperature=0.7, grad_accum=accum, entropy_coef=0.01)
        models, state, data = _update_fixture(tiny, rollout, cfg, tx, tx)
        before = jax.tree.map(np.array, (state.params, state.critic))
        new_state, metrics = jax.jit(ppo.make_update_step(models, cfg, tx, tx))(state, data)
        after = jax.tree.map(np.asarray, (new_state.params, new_state.critic))
        out.append((jax.tree.map(np.subtract, after, before), metrics))
    (d1, m1), (d8, m8) = out
    assert float(m1["tokens"]) == float(m8["tokens"]) == float(np.asarray(rollout[2].mask).sum())
    for k in m1:
        np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(d1), jax.tree.leaves(d8)):
        if np.any(a):  # (an untied lm_head in the critic's trunk gets no gradient)
            assert np.linalg.norm(b - a) <= 1e-5 * np.linalg.norm(a), jax.tree_util.keystr(path)


def test_missing_eos_penalty_and_reward_to_go():
    """Two identical responses, one cut off without EOS: exactly the penalty apart, paid at the
    last real token; with γ = λ = 1 and no whitening the returns are the reward-to-go."""
    sample = types.SimpleNamespace(  # the fields of a sampling.SampleOutput that rollout_batch reads
        tokens=jnp.array([[7, 8, EOS, PAD], [7, 8, 9, 9]]), mask=jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]]),
        logprobs=jnp.zeros((2, 4)), ended=jnp.array([True, False]))
    batch = ppo.rollout_batch(jnp.array([[PAD, 5], [PAD, 5]]), jnp.array([1, 1]), sample)
    np.testing.assert_array_equal(np.asarray(batch["ended"]), [1.0, 0.0])
    logp = jnp.array([[-1.0, -2.0, -0.5, 0.0], [-1.0, -2.0, -0.5, -0.25]])
    scored = {"scores": jnp.array([0.75, 0.75]), "old_logp": logp, "ref_logp": logp - 0.1,
              "old_values": jnp.zeros((2, 4)), "entropy": jnp.zeros((2, 4))}
    cfg = ppo.PPOConfig(gamma=1.0, lam=1.0, whiten_advantages=False, missing_eos_penalty=2.0)
    adv = ppo.compute_advantages(scored, batch, cfg, kl_coef=0.5)
    r = np.asarray(adv["rewards"])
    np.testing.assert_allclose(r[0], [-0.05, -0.05, -0.05 + 0.75, 0.0], atol=1e-6)
    np.testing.assert_allclose(r[1], [-0.05, -0.05, -0.05, -0.05 + 0.75 - 2.0], atol=1e-6)
    reward_to_go = np.cumsum(r[:, ::-1], axis=1)[:, ::-1] * np.asarray(batch["response_mask"])
    np.testing.assert_allclose(np.asarray(adv["returns"]), reward_to_go, atol=1e-6)
    np.testing.assert_allclose(np.asarray(adv["advantages"]), reward_to_go, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# An enumerable bandit with a known KL-regularised optimum
# ------------------------------------------------------------------------------------------------

BANDIT_EOS, BANDIT_N = 3, 3  # Tokens 0, 1, 2 and EOS; responses of at most 3 tokens: 40 in all.
TOKEN_REWARD = jnp.array([0.5, -0.5, 1.0, 0.0])  # r(y) = Σ_t TOKEN_REWARD[y_t]
BETA, PENALTY = 0.5, 1.0


def _bandit_reward(params, batch):
    del params  # A known function of the tokens stands in for the reward model.
    response = batch["tokens"][:, -BANDIT_N:]
    return jnp.sum(jnp.where(batch["response_mask"] > 0, TOKEN_REWARD[response], 0.0), axis=-1)


def _all_responses():
    ended = [list(body) + [BANDIT_EOS] for n in range(BANDIT_N) for body in itertools.product(range(3), repeat=n)]
    cut = [list(body) for body in itertools.product(range(3), repeat=BANDIT_N)]  # no EOS: penalised
    tokens = np.zeros((len(ended) + len(cut), BANDIT_N), np.int32)
    mask = np.zeros_like(tokens)
    for i, r in enumerate(ended + cut):
        tokens[i, :len(r)], mask[i, :len(r)] = r, 1
    return tokens, mask, np.array([1.0] * len(ended) + [0.0] * len(cut), np.float32)


def test_ppo_reaches_the_exact_kl_regularised_optimum():
    """max E[r] − β KL(π‖π_ref) has the solution π* ∝ π_ref · exp(r / β); with every response
    enumerable, KL(π‖π*) is exact. PPO with the real step, sampler and models must get close."""
    cfg_model = ModelConfig(vocab_size=4, num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, max_seq_len=8,
                            init_std=0.3)
    model, head_model = Model(cfg_model), ScalarHeadModel(cfg_model)
    models = dataclasses.replace(ppo.lm_models(model, head_model, head_model), reward=_bandit_reward)
    cfg = ppo.PPOConfig(temperature=1.0, lam=1.0, missing_eos_penalty=PENALTY)  # λ = 1: unbiased advantages

    tokens, mask, ended = _all_responses()
    prompt, length = np.ones((len(tokens), 1), np.int32), np.ones((len(tokens),), np.int32)
    every = {**sampling.prompt_response_layout(prompt, length, tokens, mask), "ended": jnp.asarray(ended)}
    r = np.asarray(_bandit_reward(None, every)) - PENALTY * (1.0 - ended)

    @jax.jit
    def log_pi(params):  # log π(y) of every response, with the step's own log-probs
        logp, _ = ppo.rollout_log_probs(models, params, every, cfg.temperature)
        return jnp.sum(jnp.where(every["response_mask"] > 0, logp, 0.0), axis=-1)

    ref = jax.jit(model.init)(jax.random.PRNGKey(0))
    log_ref = np.asarray(log_pi(ref), np.float64)
    np.testing.assert_allclose(np.exp(log_ref).sum(), 1.0, atol=1e-5)  # the 40 responses are all of them
    log_star = log_ref + r / BETA
    log_star -= np.log(np.exp(log_star).sum())

    def kl_to_optimum(params):
        log_p = np.asarray(log_pi(params), np.float64)
        return float(np.sum(np.exp(log_p) * (log_p - log_star)))

    assert kl_to_optimum(ref) > 0.5, "the optimum should be far from the reference"

    iterations, batch_size, minibatch, epochs = 40, 256, 64, 4
    tx = optax.adam(optax.linear_schedule(3e-3, 0.0, iterations * epochs * batch_size // minibatch))
    state, _ = ppo.create_ppo_state(model, head_model, tx, tx, rl.FixedKLController(jnp.float32(BETA)),
                                    sharding.make_mesh(), 0, ref, head_model.init(jax.random.PRNGKey(1)))
    update = jax.jit(ppo.make_update_step(models, cfg, tx, tx), donate_argnums=0)

    @jax.jit
    def score(state, ref, batch):
        scored = ppo.score_rollout(models, cfg, state.params, ref, state.critic, None, batch)
        adv = ppo.compute_advantages(scored, batch, cfg, state.kl_ctl.value)
        return {**batch, **scored, **adv}, ppo.rollout_stats(batch, scored, adv, state.kl_ctl.value)

    prompts, lengths = np.ones((batch_size, 1), np.int32), np.ones((batch_size,), np.int32)
    for _ in range(iterations):
        sample_key, shuffle_key = ppo.iteration_keys(state)
        sample = sampling.generate(model, state.params, prompts, lengths, max_new_tokens=BANDIT_N, rng=sample_key,
                                   eos_id=BANDIT_EOS, pad_id=0)
        data, stats = score(state, ref, ppo.rollout_batch(prompts, lengths, sample))
        assert float(stats["logprob_mismatch"]) < 1e-5
        state, _ = ppo.train_on_rollout(update, state, data, epochs=epochs, minibatch_size=minibatch, key=shuffle_key)
        state = ppo.update_kl(state, stats["kl_k1"], batch_size)
    assert int(state.iteration) == iterations and float(state.kl_ctl.value) == BETA
    assert kl_to_optimum(state.params) < 0.05


# ------------------------------------------------------------------------------------------------
# The binary
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """TinyWorld prompts, a tokenizer, and SFT and reward checkpoints in the stages' own format."""
    from jaxlm.data import tinyworld
    from jaxlm.data.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("stages")
    tinyworld.make_all(str(d / "data"), seed=0, log=lambda _: None, corpus_train=300, corpus_valid=10, sft_train=10,
                       sft_valid=10, eval_per_family=2, preferences_train=10, preferences_valid=10, rl_prompts=40,
                       redteam_prompts=4)
    tok = train_tokenizer(str(d / "data" / "corpus_train.jsonl"), str(d / "tokenizer"), vocab_size=400)
    cfg = ModelConfig(vocab_size=-(-tok.vocab_size // 128) * 128, num_layers=1, d_model=32, num_heads=2,
                      num_kv_heads=1, max_seq_len=128)
    model_meta = {"model": dataclasses.asdict(cfg), "tokenizer": str(d / "tokenizer.model"), "config": {}}
    params = Model(cfg).init(jax.random.PRNGKey(0))
    ckpt = checkpoint.Checkpointer(str(d / "sft" / "checkpoints"))
    ckpt.save(1, {"step": jnp.int32(1), "params": params}, meta={"stage": "sft", **model_meta})
    ckpt.close()
    reward = ScalarHeadModel(cfg).init(None, Model(cfg).init(jax.random.PRNGKey(1)))
    reward["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), (cfg.d_model,))
    ckpt = checkpoint.Checkpointer(str(d / "rm" / "checkpoints"))
    ckpt.save(1, {"step": jnp.int32(1), "params": reward},
              meta={"stage": "reward", "reward_normalization": {"mean": 0.0, "std": 1.0}, **model_meta})
    ckpt.close()
    for name in ("sft", "rm"):  # a run keeps its tokenizer inside it
        (d / name / "tokenizer.model").write_bytes((d / "tokenizer.model").read_bytes())
    return d


def _ppo_command(stages, workdir, *extra):
    return [sys.executable, "-m", "experiments.ppo", f"--workdir={workdir}",
            f"--config.policy_from={stages / 'sft'}", f"--config.reward_from={stages / 'rm'}",
            f"--config.data.dir={stages / 'data'}", "--config.rollout.batch_size=8",
            "--config.rollout.max_new_tokens=8",
            "--config.ppo.minibatch_size=4", "--config.ppo.epochs=2", "--config.train.iterations=4",
            "--config.train.checkpoint_every=2", "--config.train.sample_every=2", "--config.eval.every=2",
            "--config.eval.num_prompts=8", "--config.policy_optim.warmup_steps=1",
            "--config.critic_optim.warmup_steps=1", "--config.policy_optim.learning_rate=1e-3", *extra]


def test_binary_runs_logs_and_resumes_bitwise_after_sigkill(stages, tmp_path):
    # One compilation cache for the three runs: the later ones load what the first compiled.
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    run = lambda *args: subprocess.run(_ppo_command(stages, *args), cwd=ROOT, env=env, capture_output=True,
                                       text=True, timeout=600)
    straight = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-4000:]
    crashed = run(tmp_path / "crashed", "--config.train.crash_after_step=3")
    assert crashed.returncode == -9, crashed.stderr[-4000:]
    assert checkpoint.Checkpointer(str(tmp_path / "crashed" / "checkpoints")).latest_step() == 2
    resumed = run(tmp_path / "crashed")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resuming from step 2" in resumed.stdout

    for item in ("params", "opt_state", "critic", "critic_opt_state", "kl_ctl", "rng", "step", "iteration"):
        a, _ = checkpoint.load_params(str(tmp_path / "straight"), item=item)
        b, meta = checkpoint.load_params(str(tmp_path / "crashed"), item=item)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=item)
    assert meta["stage"] == "ppo" and meta["critic_model"]["d_model"] == 32
    assert int(b) == 4  # iterations

    metrics = {name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
               for name in ("straight", "crashed")}
    assert [m["step"] for m in metrics["straight"]] == [0, 1, 2, 3, 4]
    assert [m["step"] for m in metrics["crashed"]] == [0, 1, 2, 3, 4]
    for a, b in zip(*metrics.values()):
        same = {k for k in a if not k.endswith("_seconds")}
        assert {k: a[k] for k in same} == {k: b[k] for k in same}
    first, evals = metrics["straight"][1], metrics["straight"][0]
    for key in ("score", "kl_k1", "kl_k3", "beta", "entropy", "policy_loss", "value_loss", "clip_fraction",
                "value_clip_fraction", "approx_kl", "explained_variance", "response_length", "eos_share",
                "rollout_seconds", "scoring_seconds", "update_seconds", "gold_score", "logprob_mismatch"):
        assert key in first, key
    assert first["kl_k1"] == 0.0 and first["logprob_mismatch"] < 1e-5  # iteration 1 samples the reference
    assert {"eval_score", "eval_gold", "eval_kl_k1"} <= set(evals) and evals["eval_kl_k1"] == 0.0
    samples = [json.loads(l) for l in open(tmp_path / "straight" / "samples.jsonl")]
    assert {s["step"] for s in samples} == {2, 4} and {"prompt", "response", "score", "gold"} <= set(samples[0])
    assert os.path.isdir(tmp_path / "straight" / "tensorboard")
    model, params, tok = init_source.load_for_inference(str(tmp_path / "straight"))
    assert model.cfg.d_model == 32 and tok.eos_id == 2


# Two processes of one CPU device each against one process of two devices: the same mesh (data=2),
# the same prompts (every process iterates the same order), gloo collectives in between. Syncing
# the stop flag every 2 iterations while the samples hook logs every one puts a SIGTERM after
# iteration 1 in the middle of a sync period; the run then stops at 2 (checkpoint_every=0: only
# the stop and the last iteration save).
MP_FLAGS = ("--config.train.log_every=2", "--config.train.sample_every=1", "--config.train.checkpoint_every=0",
            "--config.eval.every=4")
MP_KEYS = ("score", "kl_k1", "kl_k3", "beta", "policy_loss", "value_loss", "gold_score", "eval_score", "eval_kl_k1")
MP_RTOL = 1e-5


def _launch(stages, workdir, env, **launch) -> list[subprocess.CompletedProcess]:
    """experiments.ppo with MP_FLAGS as `tests/launch.run` starts it; every process must exit 0."""
    results = run(_ppo_command(stages, workdir, *MP_FLAGS), env=env, **launch)
    for r in results:
        assert r.returncode == 0, r.stderr[-4000:]
    return results


def _assert_same_metrics(a_dir, b_dir):
    rows = [[json.loads(line) for line in open(d / "metrics.jsonl")] for d in (a_dir, b_dir)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [0, 1, 2, 3, 4]
    for a, b in zip(*rows):
        keys = [k for k in MP_KEYS if k in a]
        assert keys and keys == [k for k in MP_KEYS if k in b], (a, b)
        np.testing.assert_allclose([b[k] for k in keys], [a[k] for k in keys], rtol=MP_RTOL,
                                   err_msg=f"step {a['step']}: {keys}")


@pytest.fixture(scope="module")
def mp_env(tmp_path_factory):
    """One compilation cache for the multi-process runs: later ones load what the first compiled."""
    cache = tmp_path_factory.mktemp("mp_jax_cache")
    return {"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def two_processes(stages, mp_env, tmp_path_factory):
    """An uninterrupted 2-process run: its workdir and each process's result."""
    workdir = tmp_path_factory.mktemp("ppo_mp") / "run"
    return workdir, _launch(stages, workdir, mp_env, processes=2, devices=1)


def test_two_processes_train_like_one_process_of_two_devices(stages, mp_env, two_processes, tmp_path):
    workdir, results = two_processes
    assert "Process 1 of 2: 1 local cpu devices, 2 in all" in results[1].stdout
    assert all("mesh data=2" in r.stdout for r in results)
    one = _launch(stages, tmp_path / "one", mp_env, processes=1, devices=2)
    assert "mesh data=2" in one[0].stdout
    _assert_same_metrics(tmp_path / "one", workdir)
    # Process 0 alone writes samples.jsonl, with the texts gathered from both processes' rows.
    samples = [[json.loads(line) for line in open(d / "samples.jsonl")] for d in (tmp_path / "one", workdir)]
    steps = [i for i in range(1, 5) for _ in range(4)]  # 4 rollouts each iteration
    assert [s["step"] for s in samples[1]] == [s["step"] for s in samples[0]] == steps
    assert [(s["prompt"], s["response"]) for s in samples[1]] == [(s["prompt"], s["response"]) for s in samples[0]]


def test_sigterm_to_one_of_two_processes_stops_both_and_the_rerun_matches(stages, mp_env, two_processes, tmp_path):
    workdir = tmp_path / "run"
    sigterm = {1: ["--config.train.sigterm_after_step=1"]}  # Process 1 only.
    stopped = _launch(stages, workdir, mp_env, processes=2, devices=1, per_process=sigterm)
    assert "SIGTERM received" in stopped[1].stderr and "SIGTERM received" not in stopped[0].stderr
    for r in stopped:  # Both stop after the sync at iteration 2, having saved it together.
        assert "Stopped at step 2;" in r.stdout and "Done:" not in r.stdout, r.stdout[-2000:]
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
    assert ckpt.all_steps() == [2]
    saved = sorted(f for f in os.listdir(workdir / "checkpoints" / "2" / "data") if f.startswith("process_"))
    assert saved == ["process_0-of-2.json", "process_1-of-2.json"]  # Each process's prompt position.
    ckpt.close()
    resumed = _launch(stages, workdir, mp_env, processes=2, devices=1, per_process=sigterm)  # The same commands.
    for r in resumed:
        assert "Resuming from step 2" in r.stdout and "Done: 4 iterations" in r.stdout, r.stdout[-2000:]
    _assert_same_metrics(two_processes[0], workdir)
    samples = [[(s["step"], s["prompt"], s["response"]) for s in map(json.loads, open(d / "samples.jsonl"))]
               for d in (two_processes[0], workdir)]
    assert samples[0] == samples[1]  # Each iteration's rollouts once: the rerun kept the lines of 1 and 2.
