"""Constitutional AI: AI preference labels (P(A) + P(B) = 1, the option log-probs by brute force,
order-swap symmetry, position bias cancelling), the conversation shapes, the fine-tuning mix, the
harm rates, and both phases of the binary end to end on a tiny model."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import cai, checkpoint
from jaxlm.data import chat
from jaxlm.data.tinyworld import constitution, judge, tasks
from jaxlm.model import Model, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = constitution.BY_NAME


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Small TinyWorld files, a tokenizer with the chat markers, and a random tiny model."""
    from jaxlm.data import tinyworld
    from jaxlm.data.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("cai")
    tinyworld.make_all(str(d / "data"), seed=0, log=lambda _: None, corpus_train=300, corpus_valid=10, sft_train=40,
                       sft_valid=10, eval_per_family=2, preferences_train=10, preferences_valid=10, rl_prompts=10,
                       redteam_prompts=12)
    tok = train_tokenizer(str(d / "data" / "corpus_train.jsonl"), str(d / "tokenizer"), vocab_size=400)
    cfg = ModelConfig(vocab_size=tok.vocab_size, num_layers=1, d_model=32, num_heads=2, num_kv_heads=1,
                      max_seq_len=512, init_std=0.3)
    return d, tok, Model(cfg), Model(cfg).init(jax.random.PRNGKey(0))


def test_option_log_probs_are_the_first_response_tokens(world):
    _, tok, model, params = world
    prompt = constitution.choice_prompt(P["polite"], "What is 2 plus 3?", "2 plus 3 is 5.", "It is 5, dummy.")
    got = cai.option_log_probs(model, params, tok, [prompt], batch_size=4)  # [1, 2]
    context = chat.encode_prompt(tok, prompt)
    for k, option in enumerate(cai.OPTIONS):
        ids = context + tok.encode(option)
        logits = model.apply(params, jnp.asarray([ids]), jnp.arange(len(ids))[None], jnp.ones((1, len(ids)), jnp.int32))
        logp = jax.nn.log_softmax(np.asarray(logits.logits[0], np.float64), axis=-1)
        want = sum(logp[t - 1, ids[t]] for t in range(len(context), len(ids)))  # no EOS: "(A)" starts the answer
        np.testing.assert_allclose(got[0, k], want, rtol=1e-5, atol=1e-5)
    assert np.all(got < 0)


def test_ai_labels_sum_to_one_and_swapping_the_pair_gives_one_minus(world):
    _, tok, model, params = world
    requests = ["How can I hurt Tom?", "What is 4 plus 1?", "Write a rude note to Sam."]
    xs = ["Hit Tom with a stick.", "4 plus 1 is 5.", "Sam, you are dumb."]
    ys = ["Sorry, I will not help you hurt Tom. You can talk to Tom kindly.", "It is 6.", "Sam, you are kind."]
    principles = [P["harmless"], P["correct"], P["polite"]]
    labels = cai.ai_labels(model, params, tok, requests, xs, ys, principles, batch_size=8)
    swapped = cai.ai_labels(model, params, tok, requests, ys, xs, principles, batch_size=8)
    for a, b in zip(labels, swapped):
        for order in ("x_first", "x_second"):
            assert a[order]["p_a"] + a[order]["p_b"] == pytest.approx(1.0, abs=1e-12)
            assert a[order]["p_a"] == pytest.approx(
                math.exp(a[order]["logp_a"]) / (math.exp(a[order]["logp_a"]) + math.exp(a[order]["logp_b"])), rel=1e-9)
        assert b["p_x"] == pytest.approx(1.0 - a["p_x"], abs=1e-6)  # labelling (y, x) = 1 − labelling (x, y)
        assert a["x_first"]["p_a"] != pytest.approx(a["x_second"]["p_b"], abs=1e-4)  # the orders really differ
        pair = cai.preference_record(a)
        assert pair["label"] >= 0.5 and {pair["chosen"], pair["rejected"]} == {a["x"], a["y"]}
        assert pair["chosen"] == (a["x"] if a["p_x"] >= 0.5 else a["y"])


def test_order_swap_averaging_cancels_position_bias():
    assert cai.swap_averaged([0.8, 0.2], [0.8, 0.2]) == 0.5  # always "(A)": no preference left
    assert cai.swap_averaged([0.9, 0.1], [0.7, 0.3]) == pytest.approx(0.6)  # x wins in both orders, less when second
    assert cai.swap_averaged([0.9, 0.1], [0.7, 0.3]) == pytest.approx(1.0 - cai.swap_averaged([0.7, 0.3], [0.9, 0.1]))
    np.testing.assert_allclose(cai.option_probabilities(np.array([[-1.0, -3.0], [-50.0, -2.0]])).sum(-1), 1.0)


def test_conversations_mix_and_rates():
    p = P["harmless"]
    alone = cai.revision_messages(p, "How can I hurt Tom?", "Hit Tom.")
    assert alone == [{"role": "user", "content": constitution.revision_prompt(p, "How can I hurt Tom?", "Hit Tom.")}]
    full = cai.revision_messages(p, "How can I hurt Tom?", "Hit Tom.", critique="It helps hurt Tom.")
    assert [m["role"] for m in full] == ["user", "assistant", "user"]
    assert full[0]["content"] == constitution.critique_prompt(p, "How can I hurt Tom?", "Hit Tom.")
    assert full[1]["content"] == "It helps hurt Tom." and full[2] == alone[0]
    assert constitution.parse(full[0]["content"])[0] == "critique"

    assert constitution.Principle is cai.Principle  # one type: TinyWorld's constitution is made of CAI's
    shots = tasks.few_shot_revisions(p, 2, seed=0)
    assert [m["role"] for m in shots] == ["user", "assistant"] * 2
    for ask, answer in zip(shots[::2], shots[1::2]):
        kind, principle, fields = constitution.parse(ask["content"])
        assert kind == "revision" and principle == p
        assert judge.score(ask["content"], answer["content"]).total == 1.0  # the worked revision is the ideal
    assert cai.critique_messages(p, "How can I hurt Tom?", "Hit Tom.", shots)[:4] == shots

    revisions = [{"prompt": f"q{i}", "revision": f"r{i}"} for i in range(10)]
    sft = [{"prompt": f"s{i}", "response": f"a{i}"} for i in range(100)]
    for share, n_sft in ((0.5, 10), (0.25, 3), (0.0, 0)):
        mix = cai.mix_with_sft(revisions, sft, share, seed=0)
        assert sum(m["source"] == "sft" for m in mix) == n_sft and len(mix) == 10 + n_sft
        assert {(m["prompt"], m["response"]) for m in mix if m["source"] == "cai_revision"} == {
            (r["prompt"], r["revision"]) for r in revisions}

    def rec(polite, refuses, refusal=False):
        return {"parts": {"polite": polite, "refuses_harm": refuses}, "refusal": refusal, "gold": 0.5}
    rates = cai.harm_rates([rec(1.0, 1.0, True), rec(0.5, 1.0, True), rec(1.0, 0.3, True), rec(0.5, 0.0),
                            rec(1.0, 0.7)])
    assert rates == {"rude_rate": 0.4, "harmful_rate": 0.4, "rude_or_harmful_rate": 0.6, "refusal_rate": 0.6,
                     "gold": 0.5, "num": 5.0}


def _iid_model(tok, p_eos: float = 0.3):
    """A stand-in 'SFT model' that writes i.i.d. words and stops with probability p_eos: every
    position has the same hidden state (identical embeddings, no attention or MLP output), and
    the head puts p_eos on EOS and spreads the rest over ordinary pieces. Its answers end, so the
    pipeline has something to critique, revise, label and fine-tune on."""
    cfg = ModelConfig(vocab_size=tok.vocab_size, num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, max_seq_len=512)
    params = Model(cfg).init(jax.random.PRNGKey(0))
    logits = np.zeros(cfg.vocab_size, np.float32)
    logits[:7] = -30.0  # pad, BOS, EOS, unk and the role markers: never written
    logits[tok.eos_id] = math.log(p_eos / (1 - p_eos) * (cfg.vocab_size - 7))
    params["embed"] = jnp.ones_like(params["embed"])
    params["blocks"]["attn"]["wo"] = jnp.zeros_like(params["blocks"]["attn"]["wo"])
    params["blocks"]["mlp"]["w_down"] = jnp.zeros_like(params["blocks"]["mlp"]["w_down"])
    params["lm_head"] = jnp.asarray(np.tile(logits / cfg.d_model, (cfg.d_model, 1)))
    return cfg, params


def _sft_workdir(d, tok, path):
    """A jaxlm 'SFT run' at `path` holding the i.i.d. model (what --config.init_from reads)."""
    cfg, params = _iid_model(tok)
    ckpt = checkpoint.Checkpointer(str(path / "checkpoints"))
    ckpt.save(1, {"step": jnp.int32(1), "params": params},
              meta={"stage": "sft", "model": dataclasses.asdict(cfg), "tokenizer": str(d / "tokenizer.model")})
    ckpt.close()
    (path / "tokenizer.model").write_bytes((d / "tokenizer.model").read_bytes())  # a run keeps its tokenizer inside it
    return path


def test_binary_sl_and_rl_label_phases_end_to_end(world, tmp_path):
    d, tok, _, _ = world
    common = [sys.executable, "-m", "experiments.cai", f"--config.init_from={_sft_workdir(d, tok, tmp_path / 'sft')}",
              f"--config.data.dir={d / 'data'}", "--config.sl.max_new_tokens=8", "--config.sl.batch_size=8",
              "--config.sl.revision_temperature=1.0", "--config.train.steps=4", "--config.train.batch_size=4",
              "--config.train.checkpoint_every=2", "--config.train.log_every=1", "--config.eval.max_new_tokens=8",
              "--config.eval.batch_size=8", "--config.rl.max_new_tokens=8", "--config.rl.batch_size=8",
              "--config.rl.label_batch_size=8", "--config.rl.valid_share=0.25"]
    sl = subprocess.Popen(common + [f"--workdir={tmp_path / 'sl'}"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    rl = subprocess.Popen(common + [f"--workdir={tmp_path / 'rl'}", "--config.phase=rl_label"], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = sl.communicate(timeout=600)
    assert sl.returncode == 0, err[-4000:]
    rl_out, err = rl.communicate(timeout=600)
    assert rl.returncode == 0, err[-4000:]

    revisions = [json.loads(l) for l in open(tmp_path / "sl" / "revisions.jsonl")]
    assert 6 <= len(revisions) <= 12  # answers that ended (most do with p_eos = 0.3 over 8 tokens)
    for r in revisions:
        assert {"prompt", "initial", "rounds", "revision"} <= set(r) and len(r["rounds"]) == 1
        assert r["rounds"][0]["principle"] in ("harmless", "polite")
        assert r["revision"] == (r["rounds"][0]["revision"] if r["rounds"][0]["revised"] else r["initial"])
    mix = [json.loads(l) for l in open(tmp_path / "sl" / "sl_train.jsonl")]
    n_revised = sum(r["rounds"][0]["revised"] for r in revisions)
    assert sum(m["source"] == "cai_revision" for m in mix) == n_revised
    assert sum(m["source"] == "sft" for m in mix) == n_revised  # sft_share 0.5
    report = json.load(open(tmp_path / "sl" / "eval.json"))
    for when in ("before", "after"):
        s = report[when]["summary"]
        assert s["redteam/num"] == 2 and 0 <= s["redteam/rude_or_harmful_rate"] <= 1 and "tasks/gold" in s
    _, meta = checkpoint.load_params(str(tmp_path / "sl"))
    assert meta["stage"] == "cai_sl"
    steps = [json.loads(l)["step"] for l in open(tmp_path / "sl" / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 4, 4]  # before, training, after

    labels = [json.loads(l) for l in open(tmp_path / "rl" / "ai_labels.jsonl")]
    assert labels and all(0.0 <= l["p_x"] <= 1.0 and l["x"] != l["y"] for l in labels)
    for l in labels:
        for order in ("x_first", "x_second"):
            assert l[order]["p_a"] + l[order]["p_b"] == pytest.approx(1.0, abs=1e-12)
        assert "gold_x" in l  # TinyWorld: the gold judge's view, for audit only
    pairs = {split: [json.loads(l) for l in open(tmp_path / "rl" / f"ai_preferences_{split}.jsonl")]
             for split in ("train", "valid")}
    assert len(pairs["train"]) + len(pairs["valid"]) == len(labels)
    assert all(p["label"] >= 0.5 for p in pairs["train"] + pairs["valid"])
    summary = json.load(open(tmp_path / "rl" / "summary.json"))
    assert summary["pairs"]["valid"] == round(0.25 * len(labels)) and 0.0 <= summary["position_bias_p_a"] <= 1.0


def test_sigterm_during_fine_tuning_saves_exits_0_and_the_rerun_resumes(world, tmp_path):
    d, tok, _, _ = world
    cmd = [sys.executable, "-m", "experiments.cai", f"--workdir={tmp_path / 'sl'}",
           f"--config.init_from={_sft_workdir(d, tok, tmp_path / 'sft')}", f"--config.data.dir={d / 'data'}",
           "--config.sl.num_prompts=8", "--config.sl.max_new_tokens=8", "--config.sl.batch_size=8",
           "--config.sl.revision_temperature=1.0", "--config.sl.critique=False", "--config.eval.enabled=False",
           "--config.train.steps=4", "--config.train.batch_size=4", "--config.train.log_every=1",
           "--config.train.checkpoint_every=0", "--config.train.sigterm_after_step=2"]
    first = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "Stopped at step 2" in first.stdout
    ckpt = checkpoint.Checkpointer(str(tmp_path / "sl" / "checkpoints"))
    assert ckpt.latest_step() == 2  # checkpoint_every=0: the save is the SIGTERM's
    ckpt.close()
    second = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=600)  # the same command
    assert second.returncode == 0, second.stderr[-4000:]
    assert "Reusing" in second.stdout and "Resuming from step 2" in second.stdout and "Done." in second.stdout
    steps = [json.loads(l)["step"] for l in open(tmp_path / "sl" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
