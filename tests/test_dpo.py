"""DPO: the loss family's values at policy == reference through the step, the gradient at Δ = 0,
the swap identity, precomputed == on-the-fly reference log-probs, gradient accumulation, the exact
KL-regularised optimum on an enumerable bandit, and the binary end to end (crash, bitwise resume)."""

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import checkpoint, logprobs, losses, optim
from jaxlm.data import chat, preferences
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.model import Model, ModelConfig
from jaxlm.steps import dpo
from jaxlm.train_state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=32, num_layers=1, d_model=32, num_heads=2, num_kv_heads=1)
MODEL = Model(CFG)
LN2 = math.log(2.0)


def _rows(seqs, prompt_len, width):
    """Right-padded rows; the first `prompt_len` tokens of each sequence are the prompt."""
    rows = [preferences.pad_side(np.asarray(s, np.int32), np.asarray([0] * prompt_len + [1] * (len(s) - prompt_len),
                                                                      np.int32), width, 0) for s in seqs]
    return {k: np.stack([r[k] for r in rows]) for k in preferences.SIDE_FEATURES}


def _pair_batch(prompts, chosen, rejected, width=16):
    c = _rows([p + y for p, y in zip(prompts, chosen)], len(prompts[0]), width)
    r = _rows([p + y for p, y in zip(prompts, rejected)], len(prompts[0]), width)
    b = {**{f"chosen_{k}": v for k, v in c.items()}, **{f"rejected_{k}": v for k, v in r.items()}}
    b.update(label=np.ones(len(prompts), np.float32), weight=np.ones(len(prompts), np.float32))
    return b


def _state(params, optimizer):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.PRNGKey(0))


@functools.partial(jax.jit, static_argnames=("cfg", "soft_labels", "average_log_probs"))
def _terms(params, batch, ref, cfg, soft_labels=False, average_log_probs=False):
    """dpo.pair_terms on MODEL, compiled once per loss configuration."""
    return dpo.pair_terms(MODEL, params, batch, ref, cfg, soft_labels=soft_labels,
                          average_log_probs=average_log_probs)[2]


_log_probs = jax.jit(functools.partial(dpo.pair_log_probs, MODEL))


@pytest.fixture(scope="module")
def setup():
    ref = MODEL.init(jax.random.PRNGKey(0))
    # A policy that differs from the reference: every parameter nudged.
    keys = jax.tree.unflatten(jax.tree.structure(ref), list(jax.random.split(jax.random.PRNGKey(1),
                                                                             len(jax.tree.leaves(ref)))))
    policy = jax.tree.map(lambda x, k: x + 0.05 * jax.random.normal(k, x.shape), ref, keys)
    rng = np.random.RandomState(0)
    prompts = [[1, 5] + list(rng.randint(7, 32, 3)) for _ in range(8)]
    chosen = [list(rng.randint(7, 32, rng.randint(1, 6))) + [2] for _ in range(8)]
    rejected = [list(rng.randint(7, 32, rng.randint(1, 8))) + [2] for _ in range(8)]
    return ref, policy, _pair_batch(prompts, chosen, rejected)


def test_values_at_policy_equal_reference_through_the_step(setup):
    """sigmoid, cDPO and robust ln 2, hinge 1, IPO 1/(4β²); implicit rewards 0; padding pairs count nowhere."""
    ref, _, batch = setup
    beta = 0.25
    expected = {("sigmoid", 0.0): LN2, ("cdpo", 0.2): LN2, ("robust", 0.2): LN2, ("hinge", 0.0): 1.0,
                ("ipo", 0.0): 1.0 / (4 * beta ** 2)}
    for (loss_type, smoothing), value in expected.items():
        terms = _terms(ref, batch, ref, losses.DPOConfig(beta=beta, loss_type=loss_type, label_smoothing=smoothing))
        np.testing.assert_allclose(terms["loss"], value, rtol=1e-6, err_msg=loss_type)
        np.testing.assert_array_equal(terms["delta"], 0.0)

    padded = {k: np.concatenate([v, v[:1]]) for k, v in batch.items()}
    padded["weight"][-1] = 0.0
    padded["chosen_tokens"][-1, 5] = 30  # a padding pair that would change the loss if it counted
    tx = optax.sgd(0.0)
    _, metrics = jax.jit(dpo.make_train_step(MODEL, tx, None, losses.DPOConfig(beta=beta)))(_state(ref, tx), padded,
                                                                                             ref)
    np.testing.assert_allclose(float(metrics["loss"]), LN2, rtol=1e-6)
    for k in ("chosen_reward", "rejected_reward", "margin"):  # implicit rewards 0, to the rounding of two
        assert abs(float(metrics[k])) < 1e-6, k  # forward passes the compiler may schedule differently
    assert float(metrics["pairs"]) == 8


def test_rpo_adds_the_chosen_mean_token_nll(setup):
    """RPO (nll_weight α): per pair, the DPO loss + α · (−log π(y_c) / |y_c|), by hand from the
    sequence log-probs; α = 0 is plain DPO; a negative α is refused."""
    ref, policy, batch = setup
    cfg, alpha = losses.DPOConfig(beta=0.2), 0.7
    chosen, rejected, n_chosen, _ = _log_probs(policy, batch)
    ref_chosen, ref_rejected, _, _ = _log_probs(ref, batch)
    dpo_only = -jax.nn.log_sigmoid(0.2 * ((chosen - ref_chosen) - (rejected - ref_rejected)))
    expected = np.asarray(dpo_only) + alpha * np.asarray(-chosen / n_chosen)
    rpo = jax.jit(lambda p: dpo.pair_terms(MODEL, p, batch, ref, cfg, nll_weight=alpha))(policy)
    np.testing.assert_allclose(rpo[2]["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(float(rpo[0]), expected.sum(), rtol=1e-5)
    np.testing.assert_allclose(rpo[2]["chosen_nll"], -chosen / n_chosen, rtol=1e-6)
    plain = _terms(policy, batch, ref, cfg)
    no_nll = jax.jit(lambda p: dpo.pair_terms(MODEL, p, batch, ref, cfg, nll_weight=0.0)[2]["loss"])(policy)
    np.testing.assert_allclose(no_nll, plain["loss"], rtol=1e-6)  # two compilations: rounding only
    with pytest.raises(ValueError, match="nll_weight"):
        dpo.make_train_step(MODEL, optax.sgd(0.1), None, cfg, nll_weight=-1.0)


def test_gradient_at_zero_delta_is_minus_beta_over_two(setup):
    """dL/dΔ = −β/2 at Δ = 0 (sigmoid): by autodiff, by finite differences, and through the step's
    loss: the parameter gradient equals −β/2 · ∇(mean Δ)."""
    ref, _, batch = setup
    beta = 0.3
    loss = lambda d: losses.dpo_loss(d, jnp.zeros_like(d), jnp.zeros_like(d), jnp.zeros_like(d), beta=beta)[0]
    zero = jnp.zeros((1,), jnp.float32)
    np.testing.assert_allclose(jax.grad(loss)(zero), [-beta / 2], rtol=1e-6)
    h = 1e-3
    np.testing.assert_allclose(float((loss(zero + h) - loss(zero - h)) / (2 * h)), -beta / 2, rtol=1e-4)

    cfg = losses.DPOConfig(beta=beta)
    grads = jax.jit(jax.grad(lambda p: dpo.batch_loss(MODEL, p, batch, ref, cfg)[0] / 8.0))(ref)

    def mean_delta(p):
        c, r, _, _ = dpo.pair_log_probs(MODEL, p, batch)
        rc, rr, _, _ = dpo.pair_log_probs(MODEL, jax.lax.stop_gradient(ref), batch)
        return jnp.mean((c - rc) - (r - rr))

    expected = jax.jit(jax.grad(mean_delta))(ref)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(g), -beta / 2 * np.asarray(e), rtol=1e-4, atol=1e-7)


def _swap(batch):
    out = dict(batch)
    for k in preferences.SIDE_FEATURES:
        out[f"chosen_{k}"], out[f"rejected_{k}"] = batch[f"rejected_{k}"], batch[f"chosen_{k}"]
    return out


def test_swap_identity_and_brute_force_delta(setup):
    """L(Δ) − L(−Δ) = −βΔ per pair (sigmoid), with Δ equal to a brute-force sum over response tokens."""
    ref, policy, batch = setup
    cfg = losses.DPOConfig(beta=0.5)
    t, swapped = _terms(policy, batch, ref, cfg), _terms(policy, _swap(batch), ref, cfg)
    np.testing.assert_allclose(swapped["delta"], -t["delta"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(t["loss"] - swapped["loss"], -0.5 * t["delta"], rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(t["delta"]) > 1e-3)  # a real test: the policy differs from the reference

    apply = jax.jit(MODEL.apply)

    def brute(params, side):  # log π(response | prompt), token by token from full-softmax logits, float64
        tokens, mask = batch[f"{side}_tokens"], batch[f"{side}_loss_mask"]
        logits = apply(params, tokens, batch[f"{side}_positions"], batch[f"{side}_segment_ids"]).logits
        logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
        return np.array([sum(float(logp[b, t - 1, tokens[b, t]]) for t in range(1, tokens.shape[1]) if mask[b, t])
                         for b in range(tokens.shape[0])])

    chosen = brute(policy, "chosen") - brute(ref, "chosen")
    rejected = brute(policy, "rejected") - brute(ref, "rejected")
    np.testing.assert_allclose(t["delta"], chosen - rejected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(t["chosen_rewards"], 0.5 * chosen, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(t["rejected_rewards"], 0.5 * rejected, rtol=1e-4, atol=1e-5)


def test_precomputed_reference_equals_on_the_fly(setup):
    ref, policy, batch = setup
    cfg = losses.DPOConfig(beta=0.1)
    precomputed = {**batch, **jax.jit(functools.partial(dpo.reference_log_probs, MODEL))(ref, batch)}
    # Through JSON, as the binary stores them: float32 → Python float → float32 is exact.
    precomputed.update({k: np.asarray(json.loads(json.dumps([float(x) for x in precomputed[k]])), np.float32)
                        for k in dpo.REF_KEYS})
    tx = optim.make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=10)[0]
    step = jax.jit(dpo.make_train_step(MODEL, tx, None, cfg))
    s1, m1 = step(_state(policy, tx), batch, ref)
    s2, m2 = step(_state(policy, tx), precomputed, None)
    for k in dpo.METRICS:
        np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-6, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="no precomputed"):
        dpo.batch_loss(MODEL, policy, batch, None, cfg)


def test_gradient_accumulation_soft_labels_and_length_averaging(setup):
    ref, policy, batch = setup
    cfg = losses.DPOConfig(beta=0.2)
    tx = optax.sgd(1.0)
    s1, m1 = jax.jit(dpo.make_train_step(MODEL, tx, None, cfg))(_state(policy, tx), batch, ref)
    s4, m4 = jax.jit(dpo.make_train_step(MODEL, tx, None, cfg, grad_accum=4))(_state(policy, tx), batch, ref)
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    # Soft label p: −p log σ(βΔ) − (1−p) log σ(−βΔ); p = 1 is plain DPO.
    log_sig = lambda x: -np.log1p(np.exp(-x))
    p = np.linspace(0.1, 1.0, 8).astype(np.float32)
    t = _terms(policy, {**batch, "label": p}, ref, cfg, soft_labels=True)
    z = 0.2 * np.asarray(t["delta"], np.float64)
    np.testing.assert_allclose(t["loss"], -p * log_sig(z) - (1 - p) * log_sig(-z), rtol=1e-5)
    np.testing.assert_allclose(_terms(policy, batch, ref, cfg, soft_labels=True)["loss"], -log_sig(z), rtol=1e-5)
    with pytest.raises(ValueError, match="soft labels need"):
        dpo.make_train_step(MODEL, tx, None, losses.DPOConfig(loss_type="ipo"), soft_labels=True)

    # Length averaging (IPO's choice) divides each side, policy and reference, by its response tokens.
    ipo = losses.DPOConfig(beta=0.1, loss_type="ipo")
    t = _terms(policy, batch, ref, ipo, average_log_probs=True)
    c, r, nc, nr = _log_probs(policy, batch)
    rc, rr, _, _ = _log_probs(ref, batch)
    np.testing.assert_array_equal(nc, batch["chosen_loss_mask"].sum(-1))  # response tokens + EOS
    np.testing.assert_allclose(t["delta"], (c - rc) / nc - (r - rr) / nr, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t["loss"], (np.asarray(t["delta"]) - 1 / (2 * 0.1)) ** 2, rtol=1e-5)
    # IPO averages by default: its target margin 1/(2β) is per token (Azar et al. 2023, §5; TRL's
    # DPOTrainer averages for loss_type="ipo"); summed log-probs would regress 5 nats per sequence.
    default = dpo.pair_terms(MODEL, policy, batch, ref, ipo)[2]
    np.testing.assert_array_equal(np.asarray(default["delta"]), np.asarray(t["delta"]))
    assert dpo.averages_log_probs(ipo) and not dpo.averages_log_probs(ipo, False)
    assert not dpo.averages_log_probs(cfg) and dpo.averages_log_probs(cfg, True)


# ------------------------------------------------------------------------------------------------
# The enumerable bandit: DPO reaches π* ∝ π_ref · exp(r / β)
# ------------------------------------------------------------------------------------------------

BANDIT_EOS, BANDIT_PROMPT, BANDIT_N = 0, [1, 2], 3  # vocabulary {EOS, a, b}; the prompt "a b"


def _bandit_responses():
    """Every response the policy can give: stop at EOS or after 3 tokens (1 + 2 + 2·2·3 = 15)."""
    out = [[BANDIT_EOS]] + [[x, BANDIT_EOS] for x in (1, 2)]
    out += [[x, y, z] for x in (1, 2) for y in (1, 2) for z in (BANDIT_EOS, 1, 2)]
    return out


def _bandit_rows(responses):
    p = len(BANDIT_PROMPT)
    return _rows([BANDIT_PROMPT + y for y in responses], p, p + BANDIT_N)


def test_dpo_reaches_the_exact_kl_regularised_optimum():
    """Pairs of responses labelled by Bradley-Terry with a known reward r; DPO's optimum is
    π* ∝ π_ref · exp(r/β), and with 15 enumerable responses KL(π‖π*) is exact. Threshold set in
    advance: from > 0.5 nats at the reference to < 0.05 nats after 200 steps.

    (The prompt has two distinct tokens: a context made of one repeated token looks the same to
    attention at every length, so the model could not tell "after the prompt" from "after a a".)"""
    responses = _bandit_responses()
    model = Model(ModelConfig(vocab_size=3, num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, max_seq_len=8,
                              init_std=0.3))
    every = _bandit_rows(responses)

    @jax.jit
    def log_pi(params):
        return logprobs.sequence_log_probs(model, params, every["tokens"], every["positions"], every["segment_ids"],
                                           every["loss_mask"])

    ref = model.init(jax.random.PRNGKey(0))
    log_ref = np.asarray(log_pi(ref), np.float64)
    np.testing.assert_allclose(np.exp(log_ref).sum(), 1.0, atol=1e-5)  # the 15 responses are all of them
    beta = 0.5
    r = np.random.RandomState(0).normal(size=len(responses))
    log_star = log_ref + r / beta
    log_star -= np.log(np.exp(log_star).sum())

    def kl_to_optimum(params):
        log_p = np.asarray(log_pi(params), np.float64)
        return float(np.sum(np.exp(log_p) * (log_p - log_star)))

    assert kl_to_optimum(ref) > 0.5, "the optimum should be far from the reference"
    steps, batch_size = 200, 128
    tx = optax.adam(optax.linear_schedule(3e-3, 0.0, steps))
    step = jax.jit(dpo.make_train_step(model, tx, None, losses.DPOConfig(beta=beta)), donate_argnums=0)
    state = _state(ref, tx)
    ref = jax.tree.map(jnp.copy, ref)  # the state's copy is donated; the reference stays
    rng = np.random.RandomState(1)
    for _ in range(steps):
        i = rng.randint(len(responses), size=batch_size)
        j = (i + rng.randint(1, len(responses), size=batch_size)) % len(responses)  # j != i
        i_wins = rng.rand(batch_size) < 1.0 / (1.0 + np.exp(-(r[i] - r[j])))  # a Bradley-Terry rater
        sides = {"chosen": np.where(i_wins, i, j), "rejected": np.where(i_wins, j, i)}
        batch = {f"{side}_{k}": v for side, idx in sides.items()
                 for k, v in _bandit_rows([responses[x] for x in idx]).items()}
        batch.update(label=np.ones(batch_size, np.float32), weight=np.ones(batch_size, np.float32))
        state, _ = step(state, batch, ref)
    np.testing.assert_array_equal(np.asarray(log_pi(ref), np.float64), log_ref)  # the reference is untouched
    assert kl_to_optimum(state.params) < 0.05


# ------------------------------------------------------------------------------------------------
# The binary
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Small TinyWorld files, a tokenizer and a tiny random 'SFT' checkpoint in the stages' format."""
    from jaxlm.data import tinyworld
    from jaxlm.data.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("stages")
    tinyworld.make_all(str(d / "data"), seed=0, log=lambda _: None, corpus_train=300, corpus_valid=10, sft_train=10,
                       sft_valid=10, eval_per_family=1, preferences_train=40, preferences_valid=12, rl_prompts=10,
                       redteam_prompts=4)
    tok = train_tokenizer(str(d / "data" / "corpus_train.jsonl"), str(d / "tokenizer"), vocab_size=400)
    # vocab_size exactly the tokenizer's: jaxlm.eval decodes every sampled id, and a random model
    # samples the padded rows of a rounded-up vocabulary.
    cfg = ModelConfig(vocab_size=tok.vocab_size, num_layers=1, d_model=32, num_heads=2,
                      num_kv_heads=1, max_seq_len=256)
    ckpt = checkpoint.Checkpointer(str(d / "sft" / "checkpoints"))
    ckpt.save(1, {"step": jnp.int32(1), "params": Model(cfg).init(jax.random.PRNGKey(0))},
              meta={"stage": "sft", "model": dataclasses.asdict(cfg), "tokenizer": str(d / "tokenizer.model")})
    ckpt.close()
    (d / "sft" / "tokenizer.model").write_bytes((d / "tokenizer.model").read_bytes())  # a run keeps its tokenizer inside it
    return d


def _dpo_command(stages, workdir, *extra):
    return [sys.executable, "-m", "experiments.dpo", f"--workdir={workdir}", f"--config.init_from={stages / 'sft'}",
            f"--config.data.dir={stages / 'data'}", "--config.data.batch_size=8", "--config.data.seq_len=96",
            "--config.data.too_long=skip", "--config.train.steps=6", "--config.train.checkpoint_every=2",
            "--config.train.log_every=1", "--config.eval.every=3", "--config.eval.num_prompts=8",
            "--config.eval.batch_size=8", "--config.eval.max_new_tokens=8", "--config.optim.warmup_steps=1",
            "--config.optim.learning_rate=1e-3", *extra]


def test_binary_resumes_bitwise_and_precomputed_reference_gives_the_same_run(stages, tmp_path):
    # One compilation cache for the four runs: the later ones load what the first compiled. The runs
    # go one after another: with two processes compiling into one cache at once, we saw a resumed
    # run load an executable whose float rounding differed from the uninterrupted run's.
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    run = lambda *args: subprocess.run(_dpo_command(stages, *args), cwd=ROOT, env=env, text=True, capture_output=True,
                                       timeout=600)
    straight = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-4000:]
    crashed = run(tmp_path / "crashed", "--config.train.crash_after_step=3")
    assert crashed.returncode == -9, crashed.stderr[-4000:]
    assert checkpoint.Checkpointer(str(tmp_path / "crashed" / "checkpoints")).latest_step() == 2
    resumed = run(tmp_path / "crashed")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resuming from step 2" in resumed.stdout
    precomputed = run(tmp_path / "precomputed", "--config.precompute_reference=True")
    assert precomputed.returncode == 0, precomputed.stderr[-4000:]
    assert "Reference log-probs of" in precomputed.stdout

    for item in ("params", "opt_state", "rng", "step"):
        a, _ = checkpoint.load_params(str(tmp_path / "straight"), item=item)
        b, meta = checkpoint.load_params(str(tmp_path / "crashed"), item=item)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=item)
    assert meta["stage"] == "dpo" and meta["model"]["d_model"] == 32
    metrics = {name: [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
               for name in ("straight", "crashed", "precomputed")}
    assert [m["step"] for m in metrics["straight"]] == [0, 1, 2, 3, 4, 5, 6]
    for a, b in zip(metrics["straight"], metrics["crashed"], strict=True):
        same = {k for k in a if not k.endswith("_seconds")}
        assert {k: a[k] for k in same} == {k: b[k] for k in same}
    # The precomputed reference gives the same run, to float rounding.
    for a, b in zip(metrics["straight"], metrics["precomputed"], strict=True):
        for k in a:
            if not k.endswith("_seconds"):
                np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=f"step {a['step']} {k}")

    first, evals = metrics["straight"][1], metrics["straight"][0]
    assert first["loss"] == pytest.approx(LN2, rel=1e-6) and abs(first["margin"]) < 1e-6  # policy == reference
    for key in ("loss", "accuracy", "chosen_reward", "rejected_reward", "margin", "chosen_logp", "rejected_logp",
                "grad_norm", "learning_rate"):
        assert key in first, key
    assert evals["eval_loss"] == pytest.approx(LN2, rel=1e-6) and evals["eval_kl_to_reference"] == 0.0
    assert {"eval_gold", "eval_accuracy", "eval_margin", "eval_pairs"} <= set(evals)
    assert metrics["straight"][-1]["eval_kl_to_reference"] != 0.0  # the policy moved
    # Every input record, in file order; those the too_long='skip' policy drops carry no log-probs.
    ref_records = [json.loads(l) for l in open(tmp_path / "precomputed" / "reference" / "train.jsonl")]
    inputs = [json.loads(l) for l in open(stages / "data" / "preferences_train.jsonl")]
    assert [r["prompt"] for r in ref_records] == [r["prompt"] for r in inputs]
    tok = Tokenizer.load(str(stages / "tokenizer.model"))
    kept = [len(chat.encode_example(tok, r["prompt"], r[side])[0]) <= 96 for r in inputs for side in ("chosen",
                                                                                                     "rejected")]
    kept = [a and b for a, b in zip(kept[::2], kept[1::2])]
    assert 0 < sum(kept) < len(inputs)  # some pairs really are dropped
    assert [set(dpo.REF_KEYS) <= set(r) for r in ref_records] == kept
    report = json.load(open(tmp_path / "straight" / "eval.json"))
    assert report["initial"]["eval_loss"] == evals["eval_loss"] and "eval_gold" in report["final"]
    samples = {name: [json.loads(l) for l in open(tmp_path / name / "samples.jsonl")] for name in ("straight", "crashed")}
    assert samples["straight"] == samples["crashed"]  # the crashed run's step-3 answers are not doubled
    assert {s["step"] for s in samples["straight"]} == {0, 3, 6} and {"prompt", "response", "gold"} <= set(
        samples["straight"][0])
