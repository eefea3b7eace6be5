"""SFT: response log-probs against brute force and the sampler, learning the responses but not the
prompts, and the binary end to end on TinyWorld (judge eval, crash, exact resume)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import checkpoint, logprobs, optim, sampling
from jaxlm.data import chat, sft
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.model import Model, ModelConfig
from jaxlm.steps import lm
from jaxlm.train_state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, max_seq_len=64, scan_unroll=2)


@pytest.fixture(scope="module")
def model_and_params():
    model = Model(CFG)
    return model, jax.jit(model.init)(jax.random.PRNGKey(0))


def _right_padded(seqs, masks, width):
    b = {k: np.zeros((len(seqs), width), np.int32) for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    for i, (s, m) in enumerate(zip(seqs, masks)):
        n = len(s)
        b["tokens"][i, :n], b["positions"][i, :n], b["segment_ids"][i, :n], b["loss_mask"][i, :n] = \
            s, np.arange(n), 1, m
    return b


def test_response_log_probs_equal_brute_force_and_ignore_padding(model_and_params):
    model, params = model_and_params
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(3, 64, n)) for n in (3, 7, 5)]
    responses = [list(rng.randint(3, 64, n)) + [2] for n in (4, 2, 6)]
    seqs = [p + r for p, r in zip(prompts, responses)]
    masks = [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)]
    b = _right_padded(seqs, masks, 16)
    per_token = np.asarray(logprobs.response_log_probs(model, params, *(b[k] for k in
                                                                         ("tokens", "positions", "segment_ids", "loss_mask"))))
    totals = np.asarray(logprobs.sequence_log_probs(model, params, b["tokens"], b["positions"], b["segment_ids"],
                                                    b["loss_mask"]))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        # Reference: one unpadded forward pass over the sequence alone; numpy log-softmax and gather.
        n = len(seqs[i])
        logits = np.asarray(model.apply(params, jnp.asarray([seqs[i]]), jnp.arange(n)[None],
                                        jnp.ones((1, n), jnp.int32)).logits[0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        expected = [logp[t - 1, seqs[i][t]] for t in range(len(p), len(p) + len(r))]
        np.testing.assert_allclose(per_token[i, len(p):len(p) + len(r)], expected, rtol=1e-5, atol=1e-5)
        assert np.all(per_token[i, :len(p)] == 0) and np.all(per_token[i, len(p) + len(r):] == 0)
        np.testing.assert_allclose(totals[i], sum(expected), rtol=1e-5)
    # Left padding (positions restart at the first real token) gives the same numbers.
    left = {k: np.zeros_like(v) for k, v in b.items()}
    for i, s in enumerate(seqs):
        n = len(s)
        for k in b:
            left[k][i, 16 - n:] = b[k][i, :n]
    shifted = np.asarray(logprobs.response_log_probs(model, params, *(left[k] for k in
                                                                      ("tokens", "positions", "segment_ids", "loss_mask"))))
    for i, s in enumerate(seqs):
        np.testing.assert_allclose(shifted[i, 16 - len(s):], per_token[i, :len(s)], rtol=1e-5, atol=1e-6)


def test_response_log_probs_match_the_sampler(model_and_params):
    """Recomputed log-probs of sampled tokens equal those recorded while sampling (same temperature)."""
    model, params = model_and_params
    rng = np.random.RandomState(1)
    prompts = [list(rng.randint(3, 64, n)) for n in (2, 6, 4, 5)]
    tokens, lengths = sampling.prompts_to_batch(prompts, pad_id=0, bucket=8)
    out = sampling.generate(model, params, tokens, lengths, max_new_tokens=10, rng=jax.random.PRNGKey(3),
                            temperature=0.7, eos_id=2, pad_id=0)
    new, mask, sampled = (np.asarray(x) for x in (out.tokens, out.mask, out.logprobs))
    seqs = [p + list(new[i, :mask[i].sum()]) for i, p in enumerate(prompts)]
    masks = [[0] * len(p) + [1] * int(mask[i].sum()) for i, p in enumerate(prompts)]
    b = _right_padded(seqs, masks, 24)
    recomputed = np.asarray(logprobs.response_log_probs(model, params, b["tokens"], b["positions"],
                                                        b["segment_ids"], b["loss_mask"], temperature=0.7))
    for i, p in enumerate(prompts):
        n = int(mask[i].sum())
        np.testing.assert_allclose(recomputed[i, len(p):len(p) + n], sampled[i, :n], atol=1e-5)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    words = "please tell me which word comes now the answer is red blue green cat dog sun".split()
    rng = np.random.RandomState(0)
    lines = [" ".join(rng.choice(words, 8)) + "." for _ in range(300)]
    return tokenizer_lib.train_tokenizer(iter(lines), tmp_path_factory.mktemp("tok") / "t", 300)


def test_sft_learns_the_responses_but_not_the_prompts(tok, tmp_path):
    """Prompts follow a fixed, learnable template; with the SFT mask only the answers are learnt:
    their loss goes near zero while the template's (never a target) stays high."""
    rng = np.random.RandomState(0)
    colours = ["red", "blue", "green", "cat", "dog", "sun"]
    path = tmp_path / "toy.jsonl"
    with open(path, "w") as f:
        for _ in range(200):
            c = rng.choice(colours)
            f.write(json.dumps({"prompt": f"please tell me which word comes now {c}",
                                "response": f"the answer is {c}."}) + "\n")
    examples = sft.ChatExamples(str(path), tok, seq_len=64)
    it = sft.make_sft_iterator(examples, seq_len=64, batch_size=8, seed=0)
    model = Model(ModelConfig(vocab_size=384, num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, scan_unroll=2))
    steps = 120
    optimizer, schedule = optim.make_optimizer(learning_rate=1e-2, warmup_steps=10, total_steps=steps)
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       rng=jax.random.PRNGKey(0))
    batch = next(it)
    real = (batch["segment_ids"] > 0) & (batch["positions"] > 0)  # every token but BOS
    prompt_mask = (real & (batch["loss_mask"] == 0)).astype(np.int32)
    eval_step = jax.jit(lm.make_eval_step(model))
    initial_prompt_loss = np.divide(*map(float, eval_step(params, {**batch, "loss_mask": prompt_mask})))
    step = jax.jit(lm.make_train_step(model, optimizer, schedule), donate_argnums=0)
    for _ in range(steps):
        state, metrics = step(state, next(it))

    response_loss = np.divide(*map(float, eval_step(state.params, batch)))
    prompt_loss = np.divide(*map(float, eval_step(state.params, {**batch, "loss_mask": prompt_mask})))
    assert response_loss < 0.05, response_loss
    assert prompt_loss > 0.8 * initial_prompt_loss, (prompt_loss, initial_prompt_loss)  # ~ln(V), not ~0


def _run_sft(workdir, data_dir, tokenizer_path, *extra):
    sizes = dict(corpus_train=4, corpus_valid=4, sft_train=300, sft_valid=24, eval_per_family=1,
                 preferences_train=4, preferences_valid=4, rl_prompts=4, redteam_prompts=4)
    cmd = [sys.executable, "-m", "experiments.sft", f"--workdir={workdir}", f"--config.data.dir={data_dir}",
           f"--config.data.tokenizer={tokenizer_path}", "--config.model.num_layers=2", "--config.model.d_model=32",
           "--config.model.num_heads=2", "--config.model.num_kv_heads=1", "--config.model.scan_unroll=2",
           "--config.data.batch_size=8", "--config.train.steps=8", "--config.train.checkpoint_every=4",
           "--config.train.log_every=1", "--config.train.eval_every=8", "--config.train.samples=2",
           "--config.optim.warmup_steps=2", "--config.eval.max_new_tokens=8", "--config.eval.batch_size=8",
           # This test's 512-piece tokenizer makes a few reasoning demonstrations longer than seq_len=160.
           "--config.data.too_long=skip",
           *[f"--config.data.tinyworld.{k}={v}" for k, v in sizes.items()], *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_binary_on_tinyworld_with_crash_and_exact_resume(tmp_path):
    from jaxlm.data import tinyworld
    data_dir = tmp_path / "data"
    tinyworld.make_all(str(data_dir), log=lambda _: None, corpus_train=4, corpus_valid=4, sft_train=300, sft_valid=24,
                       eval_per_family=1, preferences_train=4, preferences_valid=4, rl_prompts=4, redteam_prompts=4)
    texts = [json.loads(l) for l in open(data_dir / "sft_train.jsonl")]
    tok = tokenizer_lib.train_tokenizer(iter(r["prompt"] + "\n" + r["response"] for r in texts),
                                        tmp_path / "tok", 512)
    workdir = tmp_path / "sft"

    crashed = _run_sft(workdir, data_dir, tok.path, "--config.train.crash_after_step=6")
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    assert "Initial model: gold-judge score" in crashed.stdout
    before = {m["step"]: m for m in map(json.loads, open(workdir / "metrics.jsonl"))}
    assert sorted(before) == [0, 1, 2, 3, 4, 5, 6]  # step 0: the initial model's judge score

    resumed = _run_sft(workdir, data_dir, tok.path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step 4" in resumed.stdout and "Initial model" not in resumed.stdout
    by_step = {}
    for m in map(json.loads, open(workdir / "metrics.jsonl")):
        by_step.setdefault(m["step"], {}).update(m)
    assert sorted(by_step) == list(range(9))
    for s in (5, 6):  # recomputed after the resume: the same numbers, bit for bit
        assert by_step[s]["loss"] == before[s]["loss"] and by_step[s]["grad_norm"] == before[s]["grad_norm"]
    assert "eval_loss" in by_step[8] and "judge_score" in by_step[8] and "judge_score" in by_step[0]

    report = json.load(open(workdir / "eval.json"))
    families = json.load(open(data_dir / "summary.json"))["eval_families"]
    assert report["num_prompts"] == len(families) and set(report["families"]) == set(families)  # one per family
    assert 0.0 <= report["judge_score"] <= 1.0 and "judge_score" in report["init"]
    assert "# step 8" in open(workdir / "samples.txt").read()
    params, meta = checkpoint.load_params(str(workdir))
    assert meta["stage"] == "sft" and meta["model"]["d_model"] == 32
    assert meta["tokenizer"] == str(workdir / "tokenizer.model") and os.path.exists(meta["tokenizer"])
