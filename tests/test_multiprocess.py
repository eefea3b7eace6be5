"""Multi-process pretraining on localhost equals one process over the same global batches.

One run in three legs, each resuming the previous leg's checkpoint:

    1 process, 1 device        steps 1-4    (the layout of a laptop)
    2 processes × 2 devices    steps 5-8    (fsdp=4 spans both processes; gloo collectives)
    1 process, 1 device        steps 9-12

Each process of the middle leg reads its own shard of the data (records i::2). The reference,
computed here in one process, feeds the concatenation of the per-process batches the pipeline
makes for each layout, replaying each new layout's iterators up to the resumed step exactly as
experiments/pretrain.py does when a checkpoint comes from another process count. Losses of every
step, held-out losses and parameters after steps 8 and 12 must match. The held-out set is chosen
so that the two processes' shards hold different numbers of eval batches (a hang if the
processes did not agree on when to stop). A second test checks which launch environments
(SLURM, sbatch's own shell, explicit flags) start JAX's multi-controller runtime.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm import checkpoint, optim, sharding
from jaxlm.data import packing, pipeline
from jaxlm.data.sources import DocumentSource
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.model import Model, ModelConfig
from jaxlm.steps import lm
from jaxlm.train_state import create_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ_LEN, EVAL_BATCHES = 8, 32, 4
LEGS = ((1, 4), (2, 8), (1, 12))  # (processes, last step)
# Float summation order differs between 1 and 4 devices; Adam's first steps divide gradients by
# their own magnitude, so near-zero gradient entries would turn that noise into O(lr) parameter
# differences with eps=1e-8. eps=1e-3 keeps the comparison about the layout (see sharded_step.py).
ADAM_EPS = 1e-3
RTOL, ATOL = 1e-5, 5e-7  # Observed: losses within 1e-7 (relative), parameters within 1.2e-7.

NAMES = ["mia", "tom", "ana", "leo", "zoe", "sam"]
THINGS = ["ball", "cup", "hat", "book", "kite"]
COLOURS = ["red", "blue", "green", "yellow"]


def _document(rng):
    who, thing, colour = rng.choice(NAMES), rng.choice(THINGS), rng.choice(COLOURS)
    return f"{who} has a {colour} {thing}. the {thing} is {colour}. {who} likes the {colour} {thing}."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("mp_corpus")
    rng = np.random.RandomState(0)
    for name, n in (("train", 400), ("valid", 5)):
        with open(d / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": _document(rng)}) + "\n")
    tokenizer = train_tokenizer([str(d / "train.jsonl")], str(d / "tok"), vocab_size=300)
    return d, tokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_leg(workdir, corpus_dir, processes: int, steps: int, samples: int = 0) -> list[str]:
    """experiments.pretrain as `processes` local processes; returns each process's stdout."""
    args = [sys.executable, "-m", "experiments.pretrain", f"--workdir={workdir}",
            f"--config.data.train_files={corpus_dir}/train.jsonl", f"--config.data.valid_files={corpus_dir}/valid.jsonl",
            f"--config.data.tokenizer={corpus_dir}/tok.model", "--config.model.num_layers=2",
            "--config.model.vocab_size=300",  # = the tokenizer's: samples never hold unused ids
            "--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
            f"--config.data.seq_len={SEQ_LEN}", f"--config.data.batch_size={BATCH}", f"--config.train.steps={steps}",
            "--config.train.checkpoint_every=4", "--config.train.log_every=1", "--config.train.eval_every=4",
            f"--config.train.eval_batches={EVAL_BATCHES}", f"--config.train.samples={samples}",
            "--config.optim.warmup_steps=0", "--config.optim.min_learning_rate_ratio=1.0",  # constant lr
            f"--config.optim.eps={ADAM_EPS}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if processes == 1:
        commands = [args]
    else:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        address = f"localhost:{_free_port()}"
        commands = [args + ["--config.mesh.data=1", "--config.mesh.fsdp=-1",
                            f"--config.distributed.coordinator_address={address}",
                            f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={i}"]
                    for i in range(processes)]
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-4000:]
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outputs


def _train_iterators(corpus_dir, tokenizer, processes: int):
    source = DocumentSource([str(corpus_dir / "train.jsonl")], text_field="text")
    return [pipeline.make_lm_iterator(source, tokenizer, seq_len=SEQ_LEN, batch_size=BATCH // processes, seed=0,
                                      process_index=i, process_count=processes) for i in range(processes)]


def _eval_batches(corpus_dir, tokenizer, processes: int) -> tuple[list[dict], list[int]]:
    """The global eval batches of a layout (padding for shards already done), and each shard's count."""
    source = DocumentSource([str(corpus_dir / "valid.jsonl")], text_field="text")
    shards = [list(pipeline.make_lm_iterator(source, tokenizer, seq_len=SEQ_LEN, batch_size=BATCH // processes,
                                             seed=0, shuffle=False, num_epochs=1, process_index=i,
                                             process_count=processes))[:EVAL_BATCHES] for i in range(processes)]
    empty = {k: np.zeros((BATCH // processes, SEQ_LEN), np.int32) for k in packing.FEATURES}
    batches = [{k: np.concatenate([(s[j] if j < len(s) else empty)[k] for s in shards]) for k in packing.FEATURES}
               for j in range(max(len(s) for s in shards))]
    return batches, [len(s) for s in shards]


def _reference(corpus_dir, tokenizer, model_cfg: ModelConfig):
    """Losses per step, eval loss per leg end and params after each leg, in one process on one device."""
    model = Model(model_cfg)
    optimizer, schedule = optim.make_optimizer(learning_rate=3e-3, warmup_steps=0, total_steps=LEGS[-1][1],
                                               min_learning_rate_ratio=1.0, eps=ADAM_EPS)
    state, _ = create_train_state(model, optimizer, sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), seed=0)
    train_step = jax.jit(lm.make_train_step(model, optimizer, schedule))
    eval_step = jax.jit(lm.make_eval_step(model))
    losses, evals, params, step = {}, {}, {}, 0
    for processes, last in LEGS:
        iterators = _train_iterators(corpus_dir, tokenizer, processes)
        for it in iterators:  # A resumed layout change replays the new layout's batches.
            for _ in range(step):
                next(it)
        for step in range(step + 1, last + 1):
            local = [next(it) for it in iterators]  # Each process's rows, in process order.
            batch = {k: np.concatenate([b[k] for b in local]) for k in packing.FEATURES}
            state, metrics = train_step(state, batch)
            losses[step] = float(metrics["loss"])
        sums = [eval_step(state.params, b) for b in _eval_batches(corpus_dir, tokenizer, processes)[0]]
        evals[last] = sum(float(s) for s, _ in sums) / sum(float(c) for _, c in sums)
        params[last] = jax.device_get(state.params)
    return losses, evals, params


def test_two_processes_equal_one_and_checkpoints_move_between_them(corpus, tmp_path):
    corpus_dir, tokenizer = corpus
    _, eval_counts = _eval_batches(corpus_dir, tokenizer, 2)
    assert eval_counts[0] != eval_counts[1], eval_counts  # The eval agreement path is exercised.

    workdir = tmp_path / "run"
    outputs = {}
    for processes, last in LEGS:
        outputs[last] = _run_leg(workdir, corpus_dir, processes, last, samples=1 if processes > 1 else 0)
    # Leaving a layout: the state restores, the data position is replayed for the new layout.
    for last, saved_by, now in ((8, 1, 2), (12, 2, 1)):
        out = outputs[last][0]
        assert f"Resuming from step {last - 4}" in out, out
        assert f"written by {saved_by} processes, this run has {now}" in out, out
        assert f"replaying {last - 4} batches" in out, out
    assert "Process 0 of 2: 2 local cpu devices, 4 in all" in outputs[8][0]
    assert "Process 1 of 2" in outputs[8][1]
    assert os.path.exists(workdir / "samples.txt")  # Sampled from params gathered across processes.

    meta = checkpoint.Checkpointer(str(workdir / "checkpoints")).restore_meta(12)
    losses, evals, params = _reference(corpus_dir, tokenizer, ModelConfig(**meta["model"]))
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:
        np.testing.assert_allclose(r["loss"], losses[r["step"]], rtol=RTOL, err_msg=f"step {r['step']}")
        if "eval_loss" in r:
            np.testing.assert_allclose(r["eval_loss"], evals[r["step"]], rtol=RTOL, err_msg=f"eval {r['step']}")
    assert sorted(r["step"] for r in rows if "eval_loss" in r) == [4, 8, 12]
    for step in (8, 12):
        saved, _ = checkpoint.load_params(str(workdir), step)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(saved), jax.tree.leaves(params[step])):
            np.testing.assert_allclose(np.asarray(a), b, rtol=RTOL, atol=ATOL, err_msg=f"step {step} {path}")


def test_launcher_detection(monkeypatch):
    """Which environments start the multi-controller runtime (jax.distributed.initialize faked)."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
    monkeypatch.setattr(jax.config, "update", lambda *args: None)
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "TPU_WORKER", "MEGASCALE")):
            monkeypatch.delenv(name)
    assert not sharding.maybe_initialize_distributed()
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert not sharding.maybe_initialize_distributed()  # sbatch's own shell: no srun step, one process
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert not sharding.maybe_initialize_distributed()  # srun -n 1 inside a 4-task allocation
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert sharding.maybe_initialize_distributed() and calls == [()]  # JAX reads SLURM's variables
    assert sharding.maybe_initialize_distributed("10.0.0.1:1234", 2, 1) and calls[-1] == ("10.0.0.1:1234", 2, 1)
    with pytest.raises(ValueError, match="num_processes"):
        sharding.maybe_initialize_distributed("10.0.0.1:1234")
