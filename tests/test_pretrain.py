"""Pretraining end to end: resume after SIGKILL is bitwise exact, loss beats unigram entropy, bad data errors."""

import json
import math
import os
import subprocess
import sys
from collections import Counter

import jax
import numpy as np
import pytest

from jaxlm import checkpoint, optim, sharding
from jaxlm.data import pipeline
from jaxlm.data.tokenizer import Tokenizer, train_tokenizer
from jaxlm.model import Model, ModelConfig
from jaxlm.steps import lm
from jaxlm.train_state import create_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["mia", "tom", "ana", "leo", "zoe", "sam"]
THINGS = ["ball", "cup", "hat", "book", "kite"]
COLOURS = ["red", "blue", "green", "yellow"]


def toy_document(rng: np.random.RandomState) -> str:
    """A learnable toy language: fixed templates, a few random slots, one fact repeated."""
    who, thing, colour = rng.choice(NAMES), rng.choice(THINGS), rng.choice(COLOURS)
    return (f"{who} has a {colour} {thing}. the {thing} is {colour}. "
            f"{who} likes the {colour} {thing}. what colour is the {thing}? it is {colour}.")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.RandomState(0)
    for name, n in (("train", 2000), ("valid", 100)):
        with open(d / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": toy_document(rng)}) + "\n")
    tok = train_tokenizer([str(d / "train.jsonl")], str(d / "tok"), vocab_size=300)
    return d, tok


def run_pretrain(workdir, corpus_dir, *extra, check=True):
    cmd = [sys.executable, "-m", "experiments.pretrain", f"--workdir={workdir}",
           f"--config.data.train_files={corpus_dir}/train.jsonl", f"--config.data.valid_files={corpus_dir}/valid.jsonl",
           f"--config.data.tokenizer={corpus_dir}/tok.model", "--config.model.num_layers=2", "--config.model.d_model=32",
           "--config.model.num_heads=2", "--config.model.num_kv_heads=1", "--config.data.seq_len=32",
           "--config.data.batch_size=8", "--config.train.steps=12", "--config.train.checkpoint_every=4",
           "--config.train.log_every=4", "--config.train.eval_every=12", "--config.train.eval_batches=2",
           "--config.train.samples=0", "--config.optim.warmup_steps=2", *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_resume_after_sigkill_is_bitwise_identical(corpus, tmp_path):
    corpus_dir, _ = corpus
    run_pretrain(tmp_path / "straight", corpus_dir)
    crashed = run_pretrain(tmp_path / "crashed", corpus_dir, "--config.train.crash_after_step=6", check=False)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    assert checkpoint.Checkpointer(str(tmp_path / "crashed" / "checkpoints")).latest_step() == 4
    resumed = run_pretrain(tmp_path / "crashed", corpus_dir)
    assert "Resuming from step 4" in resumed.stdout

    a, _ = checkpoint.load_params(str(tmp_path / "straight"))
    b, meta = checkpoint.load_params(str(tmp_path / "crashed"))
    assert meta["stage"] == "pretrain" and meta["model"]["d_model"] == 32
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The resumed run's metrics file holds each logged step once, like the straight run's.
    steps = [json.loads(l)["step"] for l in open(tmp_path / "crashed" / "metrics.jsonl")]
    assert steps == [4, 8, 12]
    for name in ("config.json", "tokenizer.model", "tensorboard"):
        assert os.path.exists(tmp_path / "straight" / name)


def test_bad_data_file_names_file_and_line(corpus, tmp_path):
    corpus_dir, _ = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n')
    result = run_pretrain(tmp_path / "run", corpus_dir, f"--config.data.train_files={bad}", check=False)
    assert result.returncode != 0
    assert f"{bad}:3" in result.stderr
    skipped = run_pretrain(tmp_path / "run2", corpus_dir, f"--config.data.train_files={bad}",
                           "--config.data.skip_bad_records=True", "--config.train.steps=1", check=False)
    assert "Skipped 1 bad records" in skipped.stdout, skipped.stderr[-2000:]


def test_loss_falls_well_below_unigram_entropy(corpus):
    """A tiny model learns the toy language: held-out loss far below the unigram entropy."""
    corpus_dir, tok = corpus
    docs = [json.loads(l)["text"] for l in open(corpus_dir / "valid.jsonl")]
    counts = Counter(t for d in docs for t in tok.encode(d) + [tok.eos_id])
    total = sum(counts.values())
    unigram_entropy = -sum(c / total * math.log(c / total) for c in counts.values())

    model = Model(ModelConfig(vocab_size=384, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, scan_unroll=2))
    optimizer, schedule = optim.make_optimizer(learning_rate=3e-3, warmup_steps=10, total_steps=150)
    mesh = sharding.make_mesh()
    state, _ = create_train_state(model, optimizer, mesh, seed=0)
    step = jax.jit(lm.make_train_step(model, optimizer, schedule), donate_argnums=0)
    it = pipeline.make_lm_iterator(str(corpus_dir / "train.jsonl"), tok, seq_len=64, batch_size=16, seed=0)
    for _ in range(150):
        state, m = step(state, next(it))
    eval_step = jax.jit(lm.make_eval_step(model))
    sums = [eval_step(state.params, b) for b in
            pipeline.make_lm_iterator(str(corpus_dir / "valid.jsonl"), tok, seq_len=64, batch_size=16, seed=0,
                                      shuffle=False, num_epochs=1)]
    eval_loss = sum(float(s) for s, _ in sums) / sum(float(c) for _, c in sums)
    assert eval_loss < 0.5 * unigram_entropy, (eval_loss, unigram_entropy)


def test_every_treats_a_zero_period_as_never():
    """`--config.train.eval_every=0` (or any *_every) means never: it used to divide by zero."""
    from jaxlm import loop

    assert [s for s in range(1, 10) if loop.every(s, 3)] == [3, 6, 9]
    assert not any(loop.every(s, 0) for s in range(1, 10))
    assert not any(loop.every(s, -1) for s in range(1, 10))
