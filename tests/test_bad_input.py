"""Bad input and reruns (issue 22): nothing already written is lost, nothing hangs, and the user is
told why in a line.

One tiny finished pretraining run and one pipeline whose data stage is finished (module fixtures,
made by the binaries) are the runs the reruns meet. Every command of the binary-level tests is a
process of its own, forked from one that has done jax's and jaxlm's imports (`server`), all
started together in one fixture (`outcome`) whose results the tests read; the rest are library
calls. "Unchanged"
means every file of the run byte for byte (`snapshot`), the lock file aside.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from forkserver import ForkServer
from launch import ROOT, free_port
from jaxlm import checkpoint, init_source, loop, runtime
from jaxlm.data import sft
from jaxlm.data.sources import DataError
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.model import Model, ModelConfig

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
TIMEOUT = 180  # seconds for any one command: a hang fails the test on it


def snapshot(directory) -> dict[str, str]:
    """sha256 of every file under `directory` (the lock file aside): what "unchanged" compares."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if name != runtime.LOCK_FILE:
                with open(path, "rb") as f:
                    out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    words = ["mia", "tom", "has", "a", "red", "blue", "ball", "the", "is", "cup"]
    with open(d / "train.jsonl", "w") as f:
        for _ in range(200):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 24))}) + "\n")
    with open(d / "bad.jsonl", "w") as f:
        f.write('{"text": "mia has a ball"}\n{"text": "tom has\n')
    with open(d / "sft_long.jsonl", "w") as f:  # every conversation longer than seq_len=16
        for _ in range(20):
            f.write(json.dumps({"prompt": "mia has a red ball " * 3, "response": "the ball is blue " * 10}) + "\n")
    train_tokenizer([str(d / "train.jsonl")], str(d / "tok"), vocab_size=300)
    train_tokenizer([str(d / "train.jsonl")], str(d / "tok2"), vocab_size=290)
    return d


def pretrain_command(workdir, data, *extra):
    return ["-m", "experiments.pretrain", f"--workdir={workdir}",
            f"--config.data.train_files={data / 'train.jsonl'}", f"--config.data.tokenizer={data / 'tok.model'}",
            "--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
            "--config.model.num_kv_heads=1", "--config.data.seq_len=32", "--config.data.batch_size=4",
            "--config.train.steps=4", "--config.train.checkpoint_every=2", "--config.train.log_every=2",
            "--config.train.samples=1", "--config.optim.warmup_steps=1", *extra]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Every command here is a fork of one process that has imported jax and jaxlm (tests/forkserver.py):
    a subprocess's behaviour without ~3 CPU-seconds of imports per command."""
    with ForkServer(ENV, str(tmp_path_factory.mktemp("forks"))) as s:
        yield s


def run_command(server, argv, cwd=ROOT) -> tuple[int, str, str]:
    return server.start(argv, cwd).wait(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def finished(server, tmp_path_factory, data):
    """A finished 4-step pretraining run (checkpoints 2 and 4, samples.txt) and its snapshot."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    code, _, stderr = run_command(server, pretrain_command(workdir, data))
    assert code == 0, stderr[-3000:]
    return workdir, snapshot(workdir)


def copy_of(run, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(run, target)
    return target


def fake_run(path, tok_path, *, stage="sft", params=None, model=None):
    """A run directory with one checkpoint: `params` (a tiny tree by default), meta naming the model
    config and the run's own copy of the tokenizer."""
    model = model or ModelConfig(vocab_size=384, num_layers=1, d_model=16, num_heads=2, num_kv_heads=1)
    ckpt = checkpoint.Checkpointer(str(path / "checkpoints"), async_save=False)
    ckpt.save(1, {"params": params if params is not None else {"w": jnp.zeros((2,))}},
              meta={"stage": stage, "model": dataclasses.asdict(model), "tokenizer": "tokenizer.model", "config": {}})
    ckpt.close()
    shutil.copyfile(tok_path, path / "tokenizer.model")
    return path


SIGTERM_SCRIPT = """
import os, sys, time
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import io_callback
from jaxlm import checkpoint, loop
loop.DATA_WAIT_GRACE_S, loop.STALL_TIMEOUT_S = 1, {stall_timeout}
how = {how!r}

class Batches:  # 'data': a pipeline that filters out every record after the second batch: next() never returns
    def __init__(self): self.n = 0
    def __iter__(self): return self
    def __next__(self):
        self.n += 1
        if self.n > 2 and how == "data":
            print("waiting for a batch", flush=True)
            while True:
                pass
        return {{"x": np.ones(2, np.float32)}}
    def get_state(self): return {{"n": self.n}}
    def set_state(self, state): self.n = state["n"]

def stall(s):  # 'xla': in step 3 the main thread waits inside XLA, as in a collective whose peer is gone
    if s > 4:
        print("stalled in xla", flush=True)
        time.sleep(3600)
    return s

add = jax.jit(lambda s, b: s["s"] + b["x"].sum())
if how == "xla":
    add = jax.jit(lambda s, b: io_callback(stall, jax.ShapeDtypeStruct((), jnp.float32), s["s"] + b["x"].sum()))

def step(s, b):
    s = {{"s": add(s, b)}}
    jax.block_until_ready(s)
    return s, {{"loss": s["s"]}}

# 'xla' saves nothing: no orbax thread is at work beside the blocked step.
loop.train({workdir!r}, checkpoint.Checkpointer({workdir!r} + "/checkpoints"),
           loop.Cadence(steps=10, checkpoint_every=1 if how == "data" else 0), step_fn=step, batches=Batches(),
           init_state=lambda: {{"s": jnp.zeros(())}}, abstract_state=None, meta={{}}, desc="toy")
"""

# Two processes of one run; this test's process holds process 0's lock, as another run would.
LOCK_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from jaxlm import runtime, sharding
sharding.maybe_initialize_distributed("localhost:{port}", 2, int(sys.argv[1]))
try:
    runtime.lock_every_process({workdir!r})
except runtime.WorkdirBusy as e:
    print(f"ERROR: {{e}}", flush=True)
    sys.exit(1)
"""

# A tiny pipeline: its data stage takes a second.
PIPELINE_FLAGS = ["--config.stages=data", "--config.data.corpus_train=20", "--config.data.corpus_valid=4",
                  "--config.data.sft_train=4", "--config.data.sft_valid=4", "--config.data.eval_per_family=1",
                  "--config.data.preferences_train=4", "--config.data.preferences_valid=4", "--config.data.rl_prompts=4",
                  "--config.data.redteam_prompts=2", "--config.data.eval_reasoning=2",
                  "--config.data.reasoning_prompts=4"]


def pipeline_command(workdir, *extra):
    return ["-m", "experiments.pipeline", f"--workdir={workdir}", *PIPELINE_FLAGS, *extra]


@pytest.fixture(scope="module")
def pipeline(server, tmp_path_factory):
    """A pipeline whose data stage is finished, and its snapshot."""
    workdir = tmp_path_factory.mktemp("pipeline") / "run"
    code, _, stderr = run_command(server, pipeline_command(workdir))
    assert code == 0 and os.path.exists(workdir / "data" / "DONE"), stderr[-3000:]
    config = json.load(open(workdir / "config.json"))  # written once the first stage started
    assert config["seed"] == 0 and config["data"]["corpus_train"] == 20
    return workdir, snapshot(workdir)


def _signal_when(proc, ready: str, times: int) -> float:
    """Send `times` SIGTERMs once `proc` printed a line holding `ready`; the time of the first."""
    proc.wait_for_line(ready, timeout=TIMEOUT)
    sent = time.monotonic()
    for _ in range(times):
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.2)
    return sent


@pytest.fixture(scope="module")
def outcome(server, finished, pipeline, data, tmp_path_factory):
    """Every command of the tests below, started at once (each costs little more than jax's import):
    `outcome.out[name]` = (stdout, stderr, exit status); `outcome.dirs[name]` the directory it was
    given; for the SIGTERM commands, also the seconds from the first SIGTERM to the exit."""
    tmp_path = tmp_path_factory.mktemp("outcome")
    run, _ = finished
    pipe, _ = pipeline
    dirs = {n: copy_of(run, tmp_path, n) for n in ("mismatch", "bad_data", "busy", "rerun", "grpo_rerun")}
    dirs.update({n: copy_of(pipe, tmp_path, n) for n in ("pipeline_busy", "pipeline_seed", "pipeline_other_stage")})
    for name in ("busy", "pipeline_busy"):
        runtime.lock_workdir(str(dirs[name]))  # this process holds it, as a first run would
    dirs["lock2"] = tmp_path / "lock2"
    dirs["lock2"].mkdir()
    runtime.lock_workdir(str(dirs["lock2"]))
    policy = fake_run(tmp_path / "policy", data / "tok.model")
    reference = fake_run(tmp_path / "reference", data / "tok2.model")
    reward = fake_run(tmp_path / "reward", data / "tok.model", stage="reward",
                      params={"trunk": {"w": jnp.zeros((2,))}, "head": {"kernel": jnp.zeros((2,))}})
    dirs.update(policy=policy, reward=reward, typo=tmp_path / "typo", pipeline_typo=tmp_path / "pipeline_typo",
                grpo_bad=tmp_path / "grpo_bad")
    for how in ("data", "xla", "xla_twice"):
        dirs[f"sigterm_{how}"] = tmp_path / f"sigterm_{how}"
    sigterm = lambda how, stall_timeout: (["-c", SIGTERM_SCRIPT.format(
        root=ROOT, workdir=str(dirs[f"sigterm_{how}"]), how=how.removesuffix("_twice"), stall_timeout=stall_timeout)],
        ROOT)
    port = free_port()
    lock = lambda i: (["-c", LOCK_SCRIPT.format(root=ROOT, port=port, workdir=str(dirs["lock2"])),
                       str(i)], ROOT)
    commands = {
        "sigterm_data": sigterm("data", 600), "sigterm_xla": sigterm("xla", 1), "sigterm_xla_twice": sigterm("xla", 600),
        "mismatch": (pretrain_command(dirs["mismatch"], data, "--config.model.d_model=48"), ROOT),
        "bad_data": (pretrain_command(dirs["bad_data"], data, f"--config.data.train_files={data / 'bad.jsonl'}"), ROOT),
        "busy": (pretrain_command(dirs["busy"], data), ROOT),
        "lock_process_0": lock(0), "lock_process_1": lock(1),
        # from another directory: the default --config is found from the package
        "typo": (["-m", "experiments.pretrain", f"--workdir={dirs['typo']}",
                  "--config.train.stepz=3"], str(tmp_path)),
        "sft_all_skipped": (["-m", "experiments.sft", f"--workdir={tmp_path / 'sft'}",
                             f"--config.data.train_files={data / 'sft_long.jsonl'}", "--config.data.valid_files=",
                             f"--config.data.tokenizer={data / 'tok.model'}", "--config.data.too_long=skip",
                             "--config.data.seq_len=16", "--config.train.steps=5"], ROOT),
        "dpo_tokenizers": (["-m", "experiments.dpo", f"--workdir={tmp_path / 'dpo'}",
                            f"--config.init_from={policy}", f"--config.reference_from={reference}"], ROOT),
        "hf_import": (["-m", "tools.hf_import", f"--hf={tmp_path}", f"--workdir={policy}"], ROOT),
        "rerun": (pretrain_command(dirs["rerun"], data), ROOT),
        "sample": (["-m", "tools.sample", f"--checkpoint={run}", "--prompt=mia",
                    "--max_new_tokens=4"], str(tmp_path)),
        "sample_reward": (["-m", "tools.sample", f"--checkpoint={reward}", "--prompt=mia"], ROOT),
        "breakdown_sft": (["-m", "tools.reward_breakdown", f"--checkpoint={policy}",
                           f"--pairs={data / 'train.jsonl'}"], ROOT),
        "grpo_bad": (["-m", "experiments.grpo", f"--workdir={dirs['grpo_bad']}",
                      f"--config.policy_from={run}", "--config.grpo.minibatch_size=0"], ROOT),
        "grpo_rerun": (["-m", "experiments.grpo", f"--workdir={dirs['grpo_rerun']}",
                        f"--config.policy_from={run}"], ROOT),
        "pipeline_typo": (pipeline_command(dirs["pipeline_typo"], "--config.stages=data,bogus"), ROOT),
        "pipeline_busy": (pipeline_command(dirs["pipeline_busy"]), ROOT),
        "pipeline_seed": (pipeline_command(dirs["pipeline_seed"], "--config.seed=1"), ROOT),
        "pipeline_other_stage": (pipeline_command(dirs["pipeline_other_stage"],
                                                  "--config.pretrain.flags=--config.train.steps=7"), ROOT),
    }
    procs = {name: server.start(argv, cwd) for name, (argv, cwd) in commands.items()}
    out, seconds = {}, {}
    try:
        sent = {"sigterm_data": _signal_when(procs["sigterm_data"], "waiting for a batch", 1),
                "sigterm_xla": _signal_when(procs["sigterm_xla"], "stalled in xla", 1),
                "sigterm_xla_twice": _signal_when(procs["sigterm_xla_twice"], "stalled in xla", 2)}
        for name, t in sent.items():  # a hang fails here
            procs[name].wait(timeout=60)
            seconds[name] = time.monotonic() - t
        for name, p in procs.items():
            code, stdout, stderr = p.wait(timeout=TIMEOUT)
            out[name] = (stdout, stderr, code)
    finally:
        for p in procs.values():
            if server.exit_code(p.pid, 0) is None:
                os.kill(p.pid, signal.SIGKILL)
    return types.SimpleNamespace(out=out, dirs=dirs, seconds=seconds)


def failed(outcome, name) -> str:
    """The stderr of a command that must have failed with one line and exit status 1."""
    stdout, stderr, code = outcome.out[name]
    assert code == 1 and "Traceback" not in stderr, (name, code, stderr[-3000:])
    return stderr


def test_a_rerun_with_another_model_stops_touching_nothing(outcome, finished):
    # 1: stops before touching anything, says what differs and how to start anew.
    message = failed(outcome, "mismatch")
    assert "--config.model.d_model: the run has 32, this command 48" in message and "--overwrite" in message
    assert snapshot(outcome.dirs["mismatch"]) == finished[1]


def test_bad_data_on_a_finished_run_is_one_line_and_changes_nothing(outcome, finished, data):
    # 5 and 11: file:line alone; config.json (and all else) as it was.
    assert failed(outcome, "bad_data").strip().splitlines()[-1].startswith(f"ERROR: {data / 'bad.jsonl'}:2: ")
    assert snapshot(outcome.dirs["bad_data"]) == finished[1]


def test_a_workdir_in_use_names_the_first_runs_pid_on_every_process(outcome, finished):
    # 4: a second run on a locked workdir names the first one's pid.
    assert f"in use by another run (pid {os.getpid()}" in failed(outcome, "busy")
    assert snapshot(outcome.dirs["busy"]) == finished[1]
    # Multi-process: process 0 finds the lock held; process 1 (whose own lock is free) stops too, not
    # waiting in a collective for process 0.
    for name in ("lock_process_0", "lock_process_1"):
        stdout, stderr, code = outcome.out[name]
        assert code == 1 and f"in use by another run (pid {os.getpid()}" in stdout, (name, stdout, stderr[-3000:])
        assert "found by process(es) [0] of this run" in stdout


def test_a_config_typo_is_one_line_from_any_directory(outcome):
    # 11, 14: one line naming the flag, also outside the repository root.
    assert failed(outcome, "typo").strip().splitlines() == [
        "ERROR: --config.train.stepz=3: no such config field, or a value of the wrong type "
        "('stepz' Did you mean \"steps\" instead of \"stepz\"?)"]


def test_every_record_skipped_is_an_error_with_the_counts(outcome):
    # 2: it used to hang.
    assert "no usable conversations: 20 records read, skipped 20 conversations longer than seq_len" in \
        failed(outcome, "sft_all_skipped")


def test_runs_that_must_share_a_tokenizer_or_not_exist_yet(outcome, tmp_path_factory):
    # 6: DPO's reference must share the policy's tokenizer.
    policy = outcome.dirs["policy"]
    assert f"--config.init_from={policy} and --config.reference_from=" in failed(outcome, "dpo_tokenizers")
    assert "use different tokenizers" in failed(outcome, "dpo_tokenizers")
    # 8: hf_import into an existing run would be shadowed by its checkpoints.
    assert "already holds a sft run (checkpoint 1)" in failed(outcome, "hf_import")


def test_a_rerun_of_a_finished_run_writes_nothing_again(outcome, finished):
    # 15: no second sample; tools.sample prints no orbax INFO lines.
    stdout, stderr, code = outcome.out["rerun"]
    assert code == 0 and "Already finished: step 4 of 4" in stdout, stderr[-3000:]
    rerun = snapshot(outcome.dirs["rerun"])
    assert {k: v for k, v in rerun.items() if not k.startswith("tensorboard")} == \
        {k: v for k, v in finished[1].items() if not k.startswith("tensorboard")}
    stdout, stderr, code = outcome.out["sample"]
    assert code == 0 and stdout.startswith("'mia' → ") and "INFO" not in stderr, stderr[-3000:]


def test_tools_on_a_run_of_the_wrong_stage_name_the_flag_and_both_stages(outcome):
    # 12: one line each: the flag, the stage found, the stage expected.
    policy, reward = outcome.dirs["policy"], outcome.dirs["reward"]
    assert failed(outcome, "breakdown_sft").strip().splitlines() == [
        f"ERROR: --checkpoint={policy} is a sft run, a language model (a pretrain, sft, dpo, ppo, grpo or cai run); this "
        "needs a reward model (a reward run)"]
    assert failed(outcome, "sample_reward").strip().splitlines() == [
        f"ERROR: --checkpoint={reward} is a reward run, a reward model (trunk and scalar head: a reward run): it "
        "scores text and cannot generate; give a language-model run (pretrain, sft, dpo, ppo, grpo, cai)"]


def test_sigterm_ends_a_process_that_cannot_save(outcome):
    # 2: stuck waiting for data (the pipeline filters out every record): exits 1 s after SIGTERM.
    stdout, stderr, code = outcome.out["sigterm_data"]
    assert code == 128 + signal.SIGTERM and "no batch came in 1s" in stderr, stderr[-3000:]
    assert outcome.seconds["sigterm_data"] < 30
    # The checkpoints before stayed (step 2's save may have been in flight).
    assert checkpoint.Checkpointer(str(outcome.dirs["sigterm_data"] / "checkpoints")).all_steps() in ([1], [1, 2])
    # Blocked inside XLA (a collective waiting for a process that is gone), where Python's handler cannot
    # run: the watchdog ends it after STALL_TIMEOUT_S (1 s here), or a second SIGTERM at once.
    stdout, stderr, code = outcome.out["sigterm_xla"]
    assert code == 128 + signal.SIGTERM and "no step, evaluation or save finished in 1s" in stderr, stderr[-3000:]
    stdout, stderr, code = outcome.out["sigterm_xla_twice"]
    assert code == 128 + signal.SIGTERM and "A second SIGTERM: exiting now, without saving." in stderr, stderr[-3000:]
    assert outcome.seconds["sigterm_xla"] < 30 and outcome.seconds["sigterm_xla_twice"] < 30


def test_grpo_follows_the_binaries_rules(outcome, finished):
    # Its own config checks come first: one line, nothing created.
    assert failed(outcome, "grpo_bad").strip().splitlines() == [
        "ERROR: --config.grpo.minibatch_size=0: must be >= 1"]
    assert not outcome.dirs["grpo_bad"].exists()
    # The rerun check: a workdir holding another stage's run stops it, with nothing touched.
    assert "the stage: the run is 'pretrain', this command is 'grpo'" in failed(outcome, "grpo_rerun")
    assert snapshot(outcome.dirs["grpo_rerun"]) == finished[1]


def test_the_pipeline_follows_the_binaries_rules(outcome, pipeline):
    _, before = pipeline
    # Config checks before anything is written: one line, no DIR.
    assert failed(outcome, "pipeline_typo").strip().splitlines() == [
        "ERROR: --config.stages=data,bogus: unknown stage(s) ['bogus']; the stages are data,tokenizer,pretrain,sft,"
        "grpo,preferences,reward,ppo,dpo,cai,evaluate"]
    assert not outcome.dirs["pipeline_typo"].exists()
    # DIR is locked.
    assert f"in use by another run (pid {os.getpid()}" in failed(outcome, "pipeline_busy")
    # A finished stage's settings may not change (its output would not match the config); nothing touched.
    message = failed(outcome, "pipeline_seed")
    assert "--config.seed (stage data is finished): the run has 0, this command 1" in message
    assert "--overwrite" in message and "delete" in message
    # An unfinished stage's may: the finished one is skipped, and config.json stays as it is until a stage runs.
    stdout, stderr, code = outcome.out["pipeline_other_stage"]
    assert code == 0 and "[1/1] data: done earlier" in stdout, stderr[-3000:]
    for name in ("pipeline_busy", "pipeline_seed", "pipeline_other_stage"):
        assert snapshot(outcome.dirs[name]) == before, name


def test_rerun_differences_name_what_makes_another_run():
    config = {"model": {"d_model": 64, "num_layers": 2, "dtype": "float32"},
              "data": {"tokenizer": "", "tokenizer_vocab_size": 1024}, "train": {"steps": 10}}
    meta = {"stage": "pretrain", "config": json.loads(json.dumps(config))}
    assert runtime.rerun_differences("pretrain", config, meta) == []
    longer = {**config, "train": {"steps": 20}, "model": {**config["model"], "dtype": "bfloat16"}}
    assert runtime.rerun_differences("pretrain", longer, meta) == []  # longer, or computed otherwise: same run
    wider = {**config, "model": {**config["model"], "d_model": 96}, "data": {"tokenizer": "",
                                                                              "tokenizer_vocab_size": 512}}
    assert runtime.rerun_differences("sft", wider, meta) == [
        "the stage: the run is 'pretrain', this command is 'sft'",
        "--config.model.d_model: the run has 64, this command 96",
        "--config.data.tokenizer_vocab_size: the run has 1024, this command 512"]
    sft_meta = {"stage": "sft", "config": {"init_from": "/runs/a", "model": {"d_model": 64}}}
    other = {"init_from": "/runs/b", "model": {"d_model": 96}}  # model.* unused with init_from
    assert runtime.rerun_differences("sft", other, sft_meta) == [
        "--config.init_from: the run has '/runs/a', this command '/runs/b'"]
    grpo_meta = {"stage": "grpo", "config": {"policy_from": "/runs/a", "reward_model": {"path": ""}}}
    judged = {"policy_from": "/runs/a", "reward_model": {"path": "/runs/rm"}}  # a source in a block
    assert runtime.rerun_differences("grpo", judged, grpo_meta) == [
        "--config.reward_model.path: the run has '', this command '/runs/rm'"]


def test_config_checks():
    def cfg(lr=1e-3, steps=10, warmup=2, eval_batches=0):
        return ml_collections.ConfigDict({"optim": {"learning_rate": lr, "warmup_steps": warmup},
                                          "train": {"steps": steps, "eval_batches": eval_batches}})
    runtime.validate(cfg())
    for bad, message in ((cfg(lr=-1), "--config.optim.learning_rate=-1: must be > 0"),
                         (cfg(steps=0), "--config.train.steps=0: must be >= 1"),
                         (cfg(steps=-5, warmup=0), "--config.train.steps=-5: must be >= 1"),
                         (cfg(eval_batches=-1), "--config.train.eval_batches=-1")):
        with pytest.raises(runtime.ConfigError, match=re.escape(message)):
            runtime.validate(bad)


def test_a_global_batch_must_split_over_the_batch_axes(monkeypatch):
    # 13: a mesh of 2 data-parallel devices (faked: this process has one) and a batch of 5 rows.
    monkeypatch.setattr(runtime.sharding, "make_mesh", lambda **_: types.SimpleNamespace(
        shape={"data": 2, "fsdp": 1, "tensor": 1}))
    monkeypatch.setattr(runtime.sharding, "describe", lambda _: "data=2 × fsdp=1 × tensor=1")
    cfg = ml_collections.ConfigDict({"mesh": {"data": -1, "fsdp": 1, "tensor": 1}, "data": {"batch_size": 5}})
    with pytest.raises(runtime.ConfigError, match=re.escape("--config.data.batch_size=5 does not split over the 2 "
                                                            "devices of the batch axes")):
        runtime.mesh_from_config(cfg)
    cfg.data.batch_size = 6
    runtime.mesh_from_config(cfg)


def test_config_checks_warn_of_a_warmup_longer_than_the_run(capsys):
    runtime.validate(ml_collections.ConfigDict({"optim": {"learning_rate": 1e-3, "warmup_steps": 50},
                                                "train": {"steps": 40}}))
    out = capsys.readouterr().out
    assert "WARNING: --config.optim.warmup_steps=50 is not shorter than --config.train.steps=40" in out


def _toy_state(value, n=3):
    return {"params": {"w": jnp.full((n,), value, jnp.float32)}, "step": jnp.asarray(int(value), jnp.int32)}


def _abstract(n=3):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), _toy_state(0.0, n))


def _damage(step_dir, how):
    if how == "meta":
        with open(step_dir / "meta" / "metadata", "w") as f:
            f.write("{garbage")
        return
    for root, _, files in os.walk(step_dir / "state"):
        for name in files:
            if os.sep + "d" in root:  # the array data (not the tree metadata)
                path = os.path.join(root, name)
                os.remove(path) if how == "delete" else os.truncate(path, 10)


@pytest.mark.parametrize("how", ["truncate", "delete", "meta"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_carries_on(tmp_path, capsys, how):
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    for step in (1, 2):
        ckpt.save(step, _toy_state(float(step)), meta={"step": step})
    ckpt.close()
    _damage(tmp_path / "2", how)
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    step, state, meta = ckpt.restore_latest(_abstract())
    assert step == 1 and meta == {"step": 1} and float(state["params"]["w"][0]) == 1.0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert "Event loop is closed" not in err  # tensorstore's cancelled reads, once hundreds of tracebacks
    assert len(lines) == 1 and lines[0].startswith(f"WARNING: checkpoint {tmp_path}/2 is damaged (")
    assert lines[0].endswith(f"moved to {tmp_path}/2.damaged, resuming from an earlier one")
    assert os.path.isdir(tmp_path / "2.damaged")  # kept, named as damaged
    ckpt.save(2, _toy_state(5.0), meta={"step": 2})  # the step can be written again
    ckpt.close()
    assert checkpoint.load_params(str(tmp_path))[1] == {"step": 2}


def test_a_checkpoint_of_another_shape_is_not_damage_and_stops_the_run(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save(1, _toy_state(1.0), meta={})
    ckpt.close()
    before = snapshot(tmp_path)
    with pytest.raises(checkpoint.RunMismatch, match=r"saved e\.g\. \(3,\), this command e\.g\. \(4,\)"):
        checkpoint.Checkpointer(str(tmp_path)).restore_latest(_abstract(4))
    assert snapshot(tmp_path) == before


def test_the_loop_refuses_fewer_steps_than_the_run_has_and_writes_config_once_started(tmp_path):
    step = jax.jit(lambda s, b: ({"s": s["s"] + 1.0}, {"loss": s["s"]}))
    batches = type("Batches", (), {"__next__": lambda self: {}, "__iter__": lambda self: self,
                                   "get_state": lambda self: {}, "set_state": lambda self, s: None})()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    meta = {"stage": "toy", "config": {"train": {"steps": 4}}, "tokenizer": str(tmp_path / "tokenizer.model")}

    def train(steps):
        return loop.train(str(tmp_path), checkpoint.Checkpointer(str(tmp_path / "checkpoints")),
                          loop.Cadence(steps=steps, checkpoint_every=2), step_fn=step, batches=batches,
                          init_state=lambda: {"s": jnp.zeros(())},
                          abstract_state={"s": jax.ShapeDtypeStruct((), jnp.float32, sharding=device)},
                          meta=meta, desc="toy")
    train(4)
    devices = {"count": jax.device_count(), "processes": 1, "platform": jax.default_backend()}
    assert json.load(open(tmp_path / "config.json")) == {"stage": "toy", "devices": devices, "train": {"steps": 4}}
    assert checkpoint.newest_meta(str(tmp_path / "checkpoints"))[1]["tokenizer"] == "tokenizer.model"  # 14
    before = snapshot(tmp_path)
    meta["config"] = {"train": {"steps": 2}}
    with pytest.raises(ValueError, match="--config.train.steps=2 is below step 4, where the run in"):
        train(2)
    assert snapshot(tmp_path) == before  # config.json too: written only once a run has started


def test_sources_that_do_not_exist_or_do_not_fit(tmp_path, data):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"--config.init_from={missing}: no such directory"):
        init_source.load_meta(str(missing))
    assert not missing.exists()  # 13: nothing created
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        init_source.load_meta(str(tmp_path / "empty"))
    # 12: a language model where a reward model is asked for (PPO's reward_from an SFT run), and the reverse.
    cfg = ModelConfig(vocab_size=384, num_layers=1, d_model=16, num_heads=2, num_kv_heads=1)
    shapes = jax.eval_shape(Model(cfg).init, jax.random.PRNGKey(0))  # no compile: zeros of the model's shapes
    lm = fake_run(tmp_path / "sft", data / "tok.model", params=jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                                           shapes), model=cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    want_reward = {"trunk": jax.tree.map(lambda _: device, shapes), "head": {"kernel": device, "bias": device}}
    with pytest.raises(checkpoint.RunMismatch, match=re.escape(f"--config.reward_from={lm} is a sft run, a language "
                                                               "model") + ".*; this needs a reward model"):
        init_source.load_params(str(lm), shardings=want_reward, flag="reward_from")
    reward = fake_run(tmp_path / "rm", data / "tok.model", stage="reward",
                      params={"trunk": {"w": jnp.zeros((2,))}, "head": {"kernel": jnp.zeros((2,))}})
    with pytest.raises(ValueError, match="is a reward run, a reward model .* cannot generate"):
        init_source.load_for_inference(str(reward))
    # 14: a moved run (its meta naming the old place, as runs did before) reads its own tokenizer;
    # 16: a tokenizer outside the run is refused.
    def set_tokenizer(run, path):
        with open(run / "checkpoints" / "1" / "meta" / "metadata") as f:
            meta = json.load(f)
        with open(run / "checkpoints" / "1" / "meta" / "metadata", "w") as f:
            json.dump({**meta, "tokenizer": path}, f)
    set_tokenizer(lm, str(lm / "tokenizer.model"))
    moved = tmp_path / "moved"
    shutil.move(str(lm), str(moved))
    assert init_source.load_meta(str(moved))["tokenizer"] == str(moved / "tokenizer.model")
    set_tokenizer(moved, str(data / "tok2.model"))
    with pytest.raises(ValueError, match=re.escape(f"names the tokenizer {data / 'tok2.model'}, outside the run")):
        init_source.load_meta(str(moved))


def test_hugging_face_files_that_are_bad_are_named(tmp_path):
    from safetensors.numpy import save_file

    from jaxlm import hf
    from jaxlm.hf.weights import SafetensorsDir
    (tmp_path / "config.json").write_text('{"architectures": [')
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: not valid JSON"):
        hf.read_hf_config(str(tmp_path))
    save_file({"a": np.ones((64, 64), np.float32)}, str(tmp_path / "model.safetensors"))
    os.truncate(tmp_path / "model.safetensors", 200)
    with pytest.raises(ValueError, match=f"{tmp_path / 'model.safetensors'}: not a readable safetensors file"):
        SafetensorsDir(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../../other/model.safetensors"}}))
    with pytest.raises(ValueError, match="shard '../../other/model.safetensors' is outside the model directory"):
        SafetensorsDir(str(tmp_path))


def test_usable_counts_after_skips(tmp_path, data):
    from experiments import common
    from jaxlm.data.tokenizer import Tokenizer
    tok = Tokenizer.load(str(data / "tok.model"))
    path = tmp_path / "mixed.jsonl"
    shutil.copyfile(data / "sft_long.jsonl", path)
    with open(path, "a") as f:
        for _ in range(3):
            f.write(json.dumps({"prompt": "mia", "response": "a ball"}) + "\n")
    assert common.usable(sft.ChatExamples(str(path), tok, seq_len=32, too_long="skip"), str(path), "x") == 3  # 10
    with pytest.raises(DataError, match="no usable conversations: 20 records read"):
        common.usable(sft.ChatExamples(str(data / "sft_long.jsonl"), tok, seq_len=32, too_long="skip"),
                      str(data / "sft_long.jsonl"), "conversations")


def test_cai_data(tmp_path, capsys):
    from jaxlm import cai
    path = tmp_path / "sft.jsonl"
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
               {"prompt": "a", "response": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cai.read_sft_records(str(path)) == records  # 9: what experiments.sft accepts
    prompts = [{"prompt": "p1"}, {"prompt": "p2"}]
    assert cai.filter_families(prompts, "harmful,redteam", "e.jsonl") == prompts  # no family field: all
    assert "has no 'family' field: evaluating all 2 prompts" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"no prompt of --config.eval.families=redteam \(families here: math\)"):
        cai.filter_families([{"prompt": "p", "family": "math"}], "redteam", "e.jsonl")
    with pytest.raises(DataError, match="revisions.jsonl: none of the 2 answers was revised"):
        cai.revised([{"rounds": [{"revised": False}]}] * 2, "revisions.jsonl")
