"""SFT, reward model and DPO in two processes (one CPU device each, localhost coordinator, gloo),
as tests/test_multiprocess.py checks pretraining: both processes train on the global batches made
of each process's rows, so the losses equal a one-device reference fed those same batches
(computed here with the library's own iterators and steps); and SIGTERM sent to ONE process makes
both save the same step and exit 0 (the shared loop exchanges the flag at log steps), after which a
rerun of the same command finishes with the uninterrupted reference's losses.

Held-out sets are sized so the processes' shards end after different numbers of eval batches: a
process that stopped evaluating first would leave the other hanging in a collective."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch import module, run
from jaxlm import checkpoint, losses, optim
from jaxlm.data import preferences, sft
from jaxlm.data.tokenizer import Tokenizer, train_tokenizer
from jaxlm.model import Model, ModelConfig
from jaxlm.reward_model import ScalarHeadModel
from jaxlm.steps import dpo, lm, reward
from jaxlm.train_state import TrainState

PROCESSES, BATCH, SEQ_LEN, STEPS = 2, 8, 48, 6
# SIGTERM reaches process 1 after step 3; flags are exchanged at log steps (every 2), so both stop
# after step 4, which is no regular checkpoint step (5 and 6 are): the stop itself saved it.
LOG_EVERY, CHECKPOINT_EVERY, SIGTERM_AFTER, STOP_STEP = 2, 5, 3, 4
ADAM_EPS = 1e-3  # as in test_multiprocess.py: keeps summation-order noise from being amplified by Adam
RTOL = 1e-5  # fixed before measuring (test_multiprocess.py observes 1e-7 relative)
WORDS = "mia tom ana leo has a red blue green cup hat ball likes the is it what colour yes no".split()


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS, n))


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer, SFT and preference JSONL (train, and 9 held-out records: shards of 5 and 4), and
    a random 'SFT' run to start from."""
    d = tmp_path_factory.mktemp("mp_stages")
    rng = np.random.RandomState(0)
    with open(d / "text.txt", "w") as f:
        f.write("\n\n".join(_sentence(rng, 12) for _ in range(300)))
    tok = train_tokenizer([str(d / "text.txt")], str(d / "tok"), vocab_size=300)
    conversations = [{"prompt": _sentence(rng, 5) + "?", "response": _sentence(rng, 4) + "."} for _ in range(73)]
    pairs = [{"prompt": _sentence(rng, 5) + "?", "chosen": _sentence(rng, 3) + ".", "rejected": _sentence(rng, 5) + "!"}
             for _ in range(73)]
    files = {"sft_train": _write(d / "sft_train.jsonl", conversations[:64]),
             "sft_valid": _write(d / "sft_valid.jsonl", conversations[64:]),
             "pairs_train": _write(d / "pairs_train.jsonl", pairs[:64]),
             "pairs_valid": _write(d / "pairs_valid.jsonl", pairs[64:])}
    cfg = ModelConfig(vocab_size=tok.vocab_size, num_layers=1, d_model=32, num_heads=2, num_kv_heads=1,
                      max_seq_len=64)
    ckpt = checkpoint.Checkpointer(str(d / "init" / "checkpoints"))
    ckpt.save(1, {"params": Model(cfg).init(jax.random.PRNGKey(0))},
              meta={"stage": "sft", "model": dataclasses.asdict(cfg), "tokenizer": tok.path})
    ckpt.close()
    (d / "init" / tok.path.rsplit("/", 1)[-1]).write_bytes(open(tok.path, "rb").read())  # a run keeps its tokenizer inside it
    return d, files, Tokenizer.load(tok.path), cfg


def _command(stage, workdir, d, *flags):
    return module(f"experiments.{stage}", f"--workdir={workdir}", f"--config.init_from={d / 'init'}",
                  f"--config.data.batch_size={BATCH}", f"--config.data.seq_len={SEQ_LEN}",
                  f"--config.train.steps={STEPS}", f"--config.train.log_every={LOG_EVERY}",
                  f"--config.train.checkpoint_every={CHECKPOINT_EVERY}", "--config.optim.warmup_steps=1",
                  "--config.optim.learning_rate=3e-3", f"--config.optim.eps={ADAM_EPS}", *flags)


STAGES = {
    "sft": lambda f: ["--config.data.train_files=" + f["sft_train"], "--config.data.valid_files=" + f["sft_valid"],
                      "--config.train.eval_every=3", "--config.train.samples=0",
                      "--config.data.packed=False"],  # one conversation a row: held-out shards of 2 and 1 batches
    "reward": lambda f: ["--config.data.train_files=" + f["pairs_train"],
                         "--config.data.valid_files=" + f["pairs_valid"], "--config.train.eval_every=3",
                         "--config.normalize.on=data", "--config.normalize.num_samples=8",
                         "--config.normalize.batch_size=8"],
    "dpo": lambda f: ["--config.data.train_files=" + f["pairs_train"], "--config.data.valid_files=" + f["pairs_valid"],
                      "--config.eval.every=3"],
}


def _optimizer():
    return optim.make_optimizer(learning_rate=3e-3, warmup_steps=1, total_steps=STEPS, min_learning_rate_ratio=0.1,
                                b1=0.9, b2=0.95, eps=ADAM_EPS, weight_decay=0.0, grad_clip=1.0)


def _per_process(make_iterator):
    return [make_iterator(i) for i in range(PROCESSES)]


def _concat(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _eval_reference(eval_fn, make_iterator, empty) -> dict[str, float]:
    """Sums over the global eval batches of the two shards (a shard already done contributes `empty`)."""
    shards = [list(it) for it in _per_process(make_iterator)]
    assert len(shards[0]) != len(shards[1]), [len(s) for s in shards]  # the agreement path is exercised
    totals = {}
    for j in range(max(map(len, shards))):
        sums = jax.device_get(eval_fn(_concat([s[j] if j < len(s) else empty for s in shards])))
        items = sums.items() if isinstance(sums, dict) else ((str(i), v) for i, v in enumerate(sums))
        for k, v in items:
            totals[k] = totals.get(k, 0.0) + float(v)
    return totals


def _reference(stage, world) -> dict[int, dict[str, float]]:
    """Per-step losses and held-out metrics at the eval steps, one device, the binaries' global batches."""
    d, files, tok, cfg = world
    model, (tx, schedule) = Model(cfg), _optimizer()
    params, _ = checkpoint.load_params(str(d / "init"))
    pad = max(tok.pad_id, 0)
    common = dict(seq_len=SEQ_LEN, batch_size=BATCH // PROCESSES, seed=0, pad_id=pad, process_count=PROCESSES)
    if stage == "sft":
        train, valid = (sft.ChatExamples([files[k]], tok, seq_len=SEQ_LEN) for k in ("sft_train", "sft_valid"))
        make = lambda data, **kw: lambda i: sft.make_sft_iterator(data, process_index=i, packed=False, **common, **kw)
        step = jax.jit(lm.make_train_step(model, tx, schedule))
        eval_step = jax.jit(lm.make_eval_step(model))
        empty = {k: np.zeros((BATCH // PROCESSES, SEQ_LEN), np.int32) for k in ("tokens", "positions", "segment_ids",
                                                                                "loss_mask")}
        finish = lambda t: {"eval_loss": t["0"] / t["1"]}
        evaluate = lambda p: finish(_eval_reference(lambda b: eval_step(p, b), make(valid, shuffle=False,
                                                                                     num_epochs=1), empty))
    else:
        train, valid = (preferences.PreferencePairs([files[k]], tok, seq_len=SEQ_LEN) for k in ("pairs_train",
                                                                                                   "pairs_valid"))
        make = lambda data, **kw: lambda i: preferences.make_preference_iterator(data, process_index=i, **common, **kw)
        empty = preferences.empty_pair_batch(BATCH // PROCESSES, SEQ_LEN, pad)
        if stage == "reward":
            rm = ScalarHeadModel(cfg)
            params = rm.init(jax.random.PRNGKey(0), params)
            step = jax.jit(reward.make_train_step(rm, tx, schedule))
            eval_step = jax.jit(reward.make_eval_step(rm))
            finish = reward.finish_eval
        else:
            loss = losses.DPOConfig(beta=0.1, loss_type="sigmoid")
            ref = params
            step = jax.jit(lambda s, b: dpo.make_train_step(model, tx, schedule, loss)(s, b, ref))
            dpo_eval = jax.jit(dpo.make_eval_step(model, loss))
            eval_step = lambda p, b: dpo_eval(p, b, ref)
            finish = dpo.finish_eval
        evaluate = lambda p: {f"eval_{k}": v for k, v in finish(_eval_reference(
            lambda b: eval_step(p, b), make(valid, shuffle=False, num_epochs=1), empty)).items()}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.fold_in(jax.random.PRNGKey(0), 1))
    iterators = _per_process(make(train, shuffle=True, num_epochs=None))
    out = {}
    for s in range(1, STEPS + 1):
        state, metrics = step(state, _concat([next(it) for it in iterators]))
        out[s] = {"loss": float(metrics["loss"])}
        if s % 3 == 0:
            out[s].update(evaluate(state.params))
    return out


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_two_processes_stop_together_on_sigterm_and_resume_to_the_reference(stage, world, tmp_path):
    d, files = world[0], world[1]
    command = _command(stage, tmp_path / "run", d, *STAGES[stage](files))
    stopped = run(command, processes=PROCESSES, per_process={1: [f"--config.train.sigterm_after_step={SIGTERM_AFTER}"]})
    for r in stopped:
        assert r.returncode == 0, r.stderr[-4000:]
        assert f"Stopped at step {STOP_STEP}" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SIGTERM received" in stopped[1].stderr
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints"))
    assert ckpt.all_steps() == [STOP_STEP]
    ckpt.close()
    for r in run(command, processes=PROCESSES):
        assert r.returncode == 0, r.stderr[-4000:]
        assert f"Resuming from step {STOP_STEP}" in r.stdout, r.stdout[-3000:]

    logged = {}
    for line in open(tmp_path / "run" / "metrics.jsonl"):
        m = json.loads(line)
        logged.setdefault(m["step"], {}).update(m)
    want = _reference(stage, world)
    assert {s for s in logged if "loss" in logged[s]} == {2, 3, 4, 5, 6}  # log, eval and checkpoint steps
    for s, values in logged.items():
        for k in ("loss", "eval_loss", "eval_accuracy", "eval_margin"):
            if k in want.get(s, {}):
                assert k in values, (s, k)
                np.testing.assert_allclose(values[k], want[s][k], rtol=RTOL, atol=1e-6, err_msg=f"{stage} {s} {k}")
