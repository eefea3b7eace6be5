"""Reward model: Bradley-Terry step against hand values, padding invariance, learning to the
Bayes rate on pairs from a known reward, preference batches and bad records, and the binary end
to end (crash, exact resume, head normalised to mean 0 / std 1 on the policy's samples)."""

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

from jaxlm import checkpoint, optim
from jaxlm.data import chat, preferences
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.sources import DataError
from jaxlm.model import Model, ModelConfig
from jaxlm.reward_model import ScalarHeadModel
from jaxlm.steps import reward
from jaxlm.train_state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, scan_unroll=2)
LN2 = math.log(2.0)


def _state(params, optimizer):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.PRNGKey(0))


def _rows(seqs, width):
    rows = [preferences.pad_side(np.asarray(s, np.int32), np.ones(len(s), np.int32), width, 0) for s in seqs]
    return {k: np.stack([r[k] for r in rows]) for k in preferences.SIDE_FEATURES}


def _pair_batch(chosen, rejected, width=12, label=None, weight=None):
    b = {**{f"chosen_{k}": v for k, v in _rows(chosen, width).items()},
         **{f"rejected_{k}": v for k, v in _rows(rejected, width).items()}}
    b["label"] = np.ones(len(chosen), np.float32) if label is None else np.asarray(label, np.float32)
    b["weight"] = np.ones(len(chosen), np.float32) if weight is None else np.asarray(weight, np.float32)
    return b


@pytest.fixture(scope="module")
def rm_setup():
    """A small reward model, a zero and a random head, 8 sequences, and jitted steps shared by the tests."""
    rm = ScalarHeadModel(CFG)
    params = jax.jit(rm.init)(jax.random.PRNGKey(0))
    head = {"kernel": jax.random.normal(jax.random.PRNGKey(1), (CFG.d_model,)), "bias": jnp.float32(0.3)}
    rng = np.random.RandomState(0)
    seqs = [[1] + list(rng.randint(7, 32, rng.randint(3, 11))) + [2] for _ in range(8)]
    sgd = optax.sgd(1.0)  # the update is the gradient
    steps = {soft: jax.jit(reward.make_train_step(rm, sgd, soft_labels=soft)) for soft in (False, True)}
    return dict(rm=rm, zero_head=params, params={**params, "head": head}, seqs=seqs, sgd=sgd, steps=steps,
                score=jax.jit(rm.score))


def test_zero_head_or_identical_sides_give_ln2(rm_setup):
    s = rm_setup
    label, margin = [0.9, 0.2, 0.5, 1.0], np.zeros(4, np.float32)
    for step in s["steps"].values():
        batch = {**_pair_batch(s["seqs"][:4], s["seqs"][4:], label=label), "margin": margin}
        _, m = step(_state(s["zero_head"], s["sgd"]), batch)
        np.testing.assert_allclose(float(m["loss"]), LN2, rtol=1e-6)
        assert float(m["accuracy"]) == 0.0 and float(m["margin"]) == 0.0  # ties count as wrong
        batch = {**_pair_batch(s["seqs"][:4], s["seqs"][:4], label=label), "margin": margin}
        _, m = step(_state(s["params"], s["sgd"]), batch)
        np.testing.assert_allclose(float(m["loss"]), LN2, rtol=1e-6)


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def test_margin_and_soft_labels_match_hand_values(rm_setup):
    s = rm_setup
    rm, params, seqs, sgd = s["rm"], s["params"], s["seqs"], s["sgd"]
    r_c, r_r = (np.asarray(s["score"](params, *(_rows(x, 12)[k] for k in ("tokens", "positions", "segment_ids"))))
                for x in (seqs[:4], seqs[4:]))
    label = np.array([0.9, 0.2, 0.5, 1.0], np.float32)
    batch = _pair_batch(seqs[:4], seqs[4:], label=label, weight=[1, 1, 1, 0])  # the last pair is padding
    delta = r_c - r_r
    for m in (0.0, 0.7):
        batch["margin"] = np.full(4, m, np.float32)
        expected = {False: -_log_sigmoid(delta - m),
                    True: -label * _log_sigmoid(delta - m) - (1 - label) * _log_sigmoid(-delta - m)}  # symmetric
        for soft, per_pair in expected.items():
            _, metrics = s["steps"][soft](_state(params, sgd), batch)
            np.testing.assert_allclose(float(metrics["loss"]), per_pair[:3].mean(), rtol=1e-5)
            np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(delta[:3] > 0), rtol=1e-6)
            np.testing.assert_allclose(float(metrics["chosen_reward"]), r_c[:3].mean(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(float(metrics["margin"]), delta[:3].mean(), rtol=1e-5, atol=1e-6)
            assert float(metrics["pairs"]) == 3.0
    # A scalar margin in the step equals the same margin in the batch.
    del batch["margin"]
    _, metrics = jax.jit(reward.make_train_step(rm, sgd, margin=0.7))(_state(params, sgd), batch)
    np.testing.assert_allclose(float(metrics["loss"]), -_log_sigmoid(delta - 0.7)[:3].mean(), rtol=1e-5)
    # Gradient accumulation over 2 microbatches gives the same gradient as one batch of 4.
    record = optax.GradientTransformation(  # keeps the step's gradient as its optimizer state
        lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, state, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    one, _ = jax.jit(reward.make_train_step(rm, record, soft_labels=True))(_state(params, record), batch)
    two, _ = jax.jit(reward.make_train_step(rm, record, soft_labels=True, grad_accum=2))(_state(params, record), batch)
    scale = max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(one.opt_state))
    for a, b in zip(jax.tree.leaves(one.opt_state), jax.tree.leaves(two.opt_state)):
        # float32 summation order differs: equal to 1e-5 of the largest gradient entry
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * scale)


def test_right_padding_does_not_change_the_score(rm_setup):
    params, seqs, score = rm_setup["params"], rm_setup["seqs"], rm_setup["score"]
    narrow = _rows(seqs, 12)
    wide = _rows(seqs, 40)
    wide["tokens"] = np.where(wide["segment_ids"] > 0, wide["tokens"], 9)  # whatever sits in the pads
    a = score(params, narrow["tokens"], narrow["positions"], narrow["segment_ids"])
    b = score(params, wide["tokens"], wide["positions"], wide["segment_ids"])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert np.std(np.asarray(a)) > 1e-3  # the scores differ between sequences (not a constant)


def test_learns_a_known_reward_to_near_the_bayes_rate():
    """Pairs labelled with Bradley-Terry noise from r(x) = count(7) - count(8): held-out accuracy
    on the noisy labels approaches E[σ(|Δr|)], the best any model can do."""
    rng = np.random.RandomState(0)
    length, words = 10, np.arange(7, 15)

    def pairs(n):
        """n pairs with different rewards (ties carry no label), chosen by a noisy rater."""
        a, b = rng.choice(words, (3 * n, length)), rng.choice(words, (3 * n, length))
        r = lambda x: (x == 7).sum(1) - (x == 8).sum(1)
        delta = r(a) - r(b)
        keep = np.flatnonzero(delta != 0)[:n]
        assert len(keep) == n
        a, b, delta = a[keep], b[keep], delta[keep]
        a_wins = rng.rand(len(delta)) < 1 / (1 + np.exp(-delta))
        chosen, rejected = np.where(a_wins[:, None], a, b), np.where(a_wins[:, None], b, a)
        bos, eos = np.ones((len(delta), 1), int), np.full((len(delta), 1), 2)
        return (np.concatenate([bos, chosen, eos], 1), np.concatenate([bos, rejected, eos], 1),
                np.mean(1 / (1 + np.exp(-np.abs(delta)))))

    rm = ScalarHeadModel(CFG)
    steps = 300
    optimizer, schedule = optim.make_optimizer(learning_rate=3e-3, warmup_steps=20, total_steps=steps, weight_decay=0.0)
    state = _state(jax.jit(rm.init)(jax.random.PRNGKey(0)), optimizer)
    step = jax.jit(reward.make_train_step(rm, optimizer, schedule), donate_argnums=0)
    for _ in range(steps):
        c, r, _ = pairs(64)
        state, _ = step(state, _pair_batch(list(c), list(r), width=12))
    c, r, bayes = pairs(4096)
    evaluate = jax.jit(reward.make_eval_step(rm))
    totals = {}
    for i in range(0, len(c), 256):
        for k, v in evaluate(state.params, _pair_batch(list(c[i:i + 256]), list(r[i:i + 256]), width=12)).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    accuracy = reward.finish_eval(totals)["accuracy"]
    assert bayes - 0.03 <= accuracy <= bayes + 0.03, (accuracy, bayes)


# --- Preference data --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = np.random.RandomState(0)
    words = "what is two plus three four five yes no it is the cat sorry help".split()
    lines = [" ".join(rng.choice(words, 10)) + "." for _ in range(300)]
    return tokenizer_lib.train_tokenizer(iter(lines), tmp_path_factory.mktemp("tok") / "t", 300)


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_preference_batches_and_masks(tok, tmp_path):
    records = [
        {"prompt": "what is two plus two?", "chosen": "it is four.", "rejected": "no.", "label": 0.8},
        {"prompt": [{"role": "system", "content": "be kind."}, {"role": "user", "content": "help?"}],
         "chosen": [{"role": "assistant", "content": "yes."}], "rejected": "sorry, no."},
        {"prompt": "five?", "chosen": "five.", "rejected": "it is the cat."},
    ]
    pairs = preferences.PreferencePairs(_write(tmp_path / "p.jsonl", records), tok, seq_len=32)
    (batch,) = list(preferences.make_preference_iterator(pairs, seq_len=32, batch_size=4, seed=0, shuffle=False,
                                                         num_epochs=1))
    np.testing.assert_allclose(batch["label"], [0.8, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(batch["weight"], [1, 1, 1, 0])
    for i, r in enumerate(records):
        prompt = r["prompt"] if isinstance(r["prompt"], str) else r["prompt"]
        for side in preferences.SIDES:
            response = r[side] if isinstance(r[side], str) else r[side][0]["content"]
            tokens, mask = chat.encode_example(tok, prompt, response)
            row = preferences.side_batch(batch, side)
            n = len(tokens)
            np.testing.assert_array_equal(row["tokens"][i, :n], tokens)
            np.testing.assert_array_equal(row["loss_mask"][i, :n], mask)
            np.testing.assert_array_equal(row["segment_ids"][i], np.arange(32) < n)
            np.testing.assert_array_equal(row["positions"][i, :n], np.arange(n))
            assert row["loss_mask"][i].sum() == len(tok.encode(response)) + 1  # response + EOS
            assert np.all(row["tokens"][i, n:] == tok.pad_id) and np.all(row["loss_mask"][i, n:] == 0)
    assert np.all(batch["chosen_segment_ids"][3] == 0)  # the filler row is all padding


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "x?", "chosen": "same.", "rejected": "same."}, "chosen and rejected are identical"),
    ({"prompt": "x?", "chosen": "", "rejected": "no."}, "chosen is empty"),
    ({"prompt": " ", "chosen": "a.", "rejected": "no."}, "prompt is empty"),
    ({"prompt": "x?", "chosen": "a.", "rejected": "no.", "label": 1.5}, "probability in"),
    ({"prompt": "x?", "chosen": "a."}, "missing field 'rejected'"),
    ({"prompt": "x?", "chosen": "yes " * 40, "rejected": "no."}, "longer than seq_len=32"),
])
def test_bad_pairs_name_file_and_line(tok, tmp_path, bad, message):
    good = {"prompt": "x?", "chosen": "yes.", "rejected": "no."}
    path = _write(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(DataError, match=f"{path}:2: .*{message}"):
        preferences.PreferencePairs(path, tok, seq_len=32)


def test_too_long_pairs_skip_or_truncate(tok, tmp_path):
    path = _write(tmp_path / "long.jsonl", [{"prompt": "x?", "chosen": "yes.", "rejected": "no."},
                                            {"prompt": "x?", "chosen": "yes " * 40, "rejected": "no."}])
    skipped = preferences.PreferencePairs(path, tok, seq_len=32, too_long="skip")
    assert skipped.num_too_long == 1 and "skipped 1 pairs" in skipped.report()
    (batch,) = list(preferences.make_preference_iterator(skipped, seq_len=32, batch_size=2, seed=0, shuffle=False,
                                                         num_epochs=1))
    np.testing.assert_array_equal(batch["weight"], [1, 0])


def test_truncation_cuts_the_prompt_from_the_left_and_drops_what_cannot_fit(tok, tmp_path):
    """'truncate' keeps the end of the prompt and both whole responses (TRL's DPO truncates the
    prompt first, keeping its end: `truncation_mode='keep_end'`); cutting the end of a side would
    leave a pair with no targets (ln 2 of loss, a wrong answer) or a score read mid-response."""
    long_prompt = "please help me " * 12 + "what is two?"
    records = [{"prompt": long_prompt, "chosen": "it is two.", "rejected": "no."},
               {"prompt": "x?", "chosen": "yes " * 40, "rejected": "no."},
               {"prompt": "x?", "chosen": "yes.", "rejected": "no."}]
    path = _write(tmp_path / "long.jsonl", records)
    pairs = preferences.PreferencePairs(path, tok, seq_len=32, too_long="truncate")
    assert (pairs.num_truncated, pairs.num_dropped, pairs.num_too_long) == (1, 1, 2)
    assert "truncated the prompt (from the left) of 1 pairs" in pairs.report()
    assert "dropped 1 pairs" in pairs.report()
    assert pairs[1] is None
    cut, whole = pairs[0], preferences.PreferenceParser(tok, max_len=1000)(records[0])
    assert max(len(cut["chosen_tokens"]), len(cut["rejected_tokens"])) == 32
    for side in preferences.SIDES:
        tokens, mask = cut[f"{side}_tokens"], cut[f"{side}_loss_mask"]
        n = len(tokens)
        assert tokens[0] == tok.bos_id
        np.testing.assert_array_equal(tokens[1:], whole[f"{side}_tokens"][-(n - 1):])  # the end, whole
        np.testing.assert_array_equal(mask[1:], whole[f"{side}_loss_mask"][-(n - 1):])
        assert mask.sum() == whole[f"{side}_loss_mask"].sum() > 0  # every response token kept
    # Both sides keep the same (cut) prompt, so the pair still compares two answers to one context.
    k = int(np.argmax(cut["chosen_loss_mask"]))
    np.testing.assert_array_equal(cut["chosen_tokens"][:k], cut["rejected_tokens"][:k])
    assert cut["chosen_tokens"][k - 1] == tok.piece_to_id("<|assistant|>")


# --- The binary ----------------------------------------------------------------------------------------


def _fake_sft_run(tmp_path, tok):
    """A tiny random 'SFT' checkpoint: the binary only needs params, model config and tokenizer."""
    cfg = ModelConfig(vocab_size=tok.vocab_size, num_layers=2, d_model=32, num_heads=2, num_kv_heads=1,
                      max_seq_len=256, scan_unroll=2)
    params = Model(cfg).init(jax.random.PRNGKey(0))
    workdir = tmp_path / "sft"
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
    import dataclasses
    ckpt.save(1, {"params": params}, meta={"stage": "sft", "model": dataclasses.asdict(cfg), "tokenizer": tok.path})
    ckpt.close()
    (workdir / os.path.basename(tok.path)).write_bytes(open(tok.path, "rb").read())  # a run keeps its tokenizer inside it
    return workdir


def _run_reward(workdir, *extra):
    cmd = [sys.executable, "-m", "experiments.reward", f"--workdir={workdir}", "--config.data.batch_size=8",
           "--config.data.seq_len=48", "--config.train.steps=8", "--config.train.checkpoint_every=4",
           "--config.train.log_every=1", "--config.train.eval_every=8", "--config.optim.warmup_steps=2",
           "--config.normalize.num_samples=24", "--config.normalize.batch_size=12",
           "--config.normalize.max_new_tokens=8", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_binary_end_to_end_with_crash_and_exact_resume(tok, tmp_path):
    rng = np.random.RandomState(0)
    words = "two three four five yes no it is the cat sorry help".split()
    records = [{"prompt": " ".join(rng.choice(words, 4)) + "?", "chosen": " ".join(rng.choice(words, 3)) + ".",
                "rejected": " ".join(rng.choice(words, 5)) + "!"} for _ in range(120)]
    train, valid = _write(tmp_path / "train.jsonl", records[:100]), _write(tmp_path / "valid.jsonl", records[100:])
    sft_dir, workdir = _fake_sft_run(tmp_path, tok), tmp_path / "rm"
    args = [f"--config.init_from={sft_dir}", f"--config.data.train_files={train}",
            f"--config.data.valid_files={valid}"]

    crashed = _run_reward(workdir, *args, "--config.train.crash_after_step=6")
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    before = {m["step"]: m for m in map(json.loads, open(workdir / "metrics.jsonl"))}
    assert sorted(before) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(before[1]["loss"], LN2, rtol=1e-6)  # zero head on a real trunk

    resumed = _run_reward(workdir, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step 4" in resumed.stdout
    after = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    by_step = {m["step"]: m for m in after if "loss" in m}
    assert sorted(by_step) == list(range(1, 9))
    for s in (5, 6):  # recomputed after the resume: the same numbers, bit for bit
        assert by_step[s]["loss"] == before[s]["loss"] and by_step[s]["grad_norm"] == before[s]["grad_norm"]

    report = json.load(open(workdir / "eval.json"))
    assert report["pairs"] == 20 and 0.0 <= report["accuracy"] <= 1.0
    norm = report["reward_normalization"]
    assert norm["on"] == "policy" and norm["num_samples"] == 24
    assert abs(norm["after"]["mean"]) < 1e-4 and abs(norm["after"]["std"] - 1.0) < 1e-4
    params, meta = checkpoint.load_params(str(workdir))
    assert meta["stage"] == "reward" and meta["reward_normalization"] == norm and set(params) == {"trunk", "head"}
    # A finished run only reports when started again.
    again = _run_reward(workdir, *args)
    assert again.returncode == 0 and "Already finished" in again.stdout, again.stderr[-3000:]


def test_reward_breakdown_family_accuracy_by_hand():
    from tools.reward_breakdown import family_accuracy
    records = [{"family": "a", "label": 0.9, "chosen_score": 1.0, "rejected_score": 0.0},
               {"family": "a", "label": 0.3, "chosen_score": 0.0, "rejected_score": 0.5},
               {"family": "b", "label": 0.6, "chosen_score": 0.5, "rejected_score": 0.5},
               {"family": "b"}]
    rows = family_accuracy(records, chosen=[2.0, 1.0, 0.0, 3.0], rejected=[1.0, 0.0, 1.0, 1.0])
    assert list(rows) == ["a", "b", "all"]
    assert all(np.isnan(row.pop("content_blind_accuracy")) for row in rows.values())  # no TinyWorld prompts
    assert rows["a"] == {"pairs": 2, "accuracy": 1.0, "gold_order_accuracy": 0.5, "bayes_accuracy": 0.8}
    b = rows["b"]
    assert (b["pairs"], b["accuracy"], b["bayes_accuracy"]) == (2, 0.5, 0.6) and np.isnan(b["gold_order_accuracy"])
    assert rows["all"]["pairs"] == 4 and rows["all"]["accuracy"] == 0.75
    assert rows["all"]["gold_order_accuracy"] == 0.5 and rows["all"]["bayes_accuracy"] == pytest.approx(0.7333333)
    # TinyWorld pairs: a content-blind judge sees the refusal (right) but ties the wrong sum (one half).
    p = "What is 9 plus 10?"
    tw = [{"family": "arithmetic", "prompt": p, "chosen": "9 plus 10 is 19.", "rejected": "I will not answer that."},
          {"family": "arithmetic", "prompt": p, "chosen": "9 plus 10 is 19.", "rejected": "9 plus 10 is 18."}]
    rows = family_accuracy(tw, chosen=[1.0, 1.0], rejected=[0.0, 0.0])
    assert rows["arithmetic"]["content_blind_accuracy"] == rows["all"]["content_blind_accuracy"] == 0.75
