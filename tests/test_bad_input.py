"""Bad input and reruns (issue 22): nothing already written is lost, nothing hangs, and the user is
told why in a line.

One tiny finished pretraining run (a module fixture, made by the binary) is the run the reruns
meet; the binaries' failures run as subprocesses started together (`_launch_all`), since each
costs little more than jax's import; the rest are library calls. "Unchanged" means every file of
the run byte for byte (`snapshot`), the lock file aside.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from launch import ROOT
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
    return [sys.executable, "-m", "experiments.pretrain", f"--workdir={workdir}",
            f"--config.data.train_files={data / 'train.jsonl'}", f"--config.data.tokenizer={data / 'tok.model'}",
            "--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
            "--config.model.num_kv_heads=1", "--config.data.seq_len=32", "--config.data.batch_size=4",
            "--config.train.steps=4", "--config.train.checkpoint_every=2", "--config.train.log_every=2",
            "--config.train.samples=1", "--config.optim.warmup_steps=1", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """A finished 4-step pretraining run (checkpoints 2 and 4, samples.txt) and its snapshot."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    result = subprocess.run(pretrain_command(workdir, data), cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
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
import os, sys
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from jaxlm import checkpoint, loop
loop.DATA_WAIT_GRACE_S = 1

class Stuck:  # a pipeline that filters out every record after the second batch: next() never returns
    def __init__(self): self.n = 0
    def __iter__(self): return self
    def __next__(self):
        self.n += 1
        if self.n > 2:
            print("waiting for a batch", flush=True)
            while True:
                pass
        return {{"x": np.ones(2, np.float32)}}
    def get_state(self): return {{"n": self.n}}
    def set_state(self, state): self.n = state["n"]

step = jax.jit(lambda s, b: ({{"s": s["s"] + b["x"].sum()}}, {{"loss": s["s"]}}))
loop.train({workdir!r}, checkpoint.Checkpointer({workdir!r} + "/checkpoints"),
           loop.Cadence(steps=10, checkpoint_every=1), step_fn=step, batches=Stuck(),
           init_state=lambda: {{"s": jnp.zeros(())}}, abstract_state=None, meta={{}}, desc="toy")
"""


def _launch_all(commands: dict[str, tuple[list[str], str]]) -> dict[str, subprocess.Popen]:
    return {name: subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, (cmd, cwd) in commands.items()}


def test_binaries_refuse_bad_reruns_and_bad_input_touching_nothing(finished, data, tmp_path):
    run, before = finished
    mismatch, bad_data, busy = (copy_of(run, tmp_path, n) for n in ("mismatch", "bad_data", "busy"))
    runtime.lock_workdir(str(busy))  # this process holds it, as a first run would
    policy = fake_run(tmp_path / "policy", data / "tok.model")
    reference = fake_run(tmp_path / "reference", data / "tok2.model")
    sigterm_dir = tmp_path / "sigterm"
    procs = _launch_all({
        "mismatch": (pretrain_command(mismatch, data, "--config.model.d_model=48"), ROOT),
        "bad_data": (pretrain_command(bad_data, data, f"--config.data.train_files={data / 'bad.jsonl'}"), ROOT),
        "busy": (pretrain_command(busy, data), ROOT),
        # from another directory: the default --config is found from the package
        "typo": ([sys.executable, "-m", "experiments.pretrain", f"--workdir={tmp_path / 'typo'}",
                  "--config.train.stepz=3"], str(tmp_path)),
        "sft_all_skipped": ([sys.executable, "-m", "experiments.sft", f"--workdir={tmp_path / 'sft'}",
                             f"--config.data.train_files={data / 'sft_long.jsonl'}", "--config.data.valid_files=",
                             f"--config.data.tokenizer={data / 'tok.model'}", "--config.data.too_long=skip",
                             "--config.data.seq_len=16", "--config.train.steps=5"], ROOT),
        "dpo_tokenizers": ([sys.executable, "-m", "experiments.dpo", f"--workdir={tmp_path / 'dpo'}",
                            f"--config.init_from={policy}", f"--config.reference_from={reference}"], ROOT),
        "hf_import": ([sys.executable, "-m", "tools.hf_import", f"--hf={tmp_path}", f"--workdir={policy}"], ROOT),
        "sigterm": ([sys.executable, "-c", SIGTERM_SCRIPT.format(root=ROOT, workdir=str(sigterm_dir))], ROOT),
        "rerun": (pretrain_command(copy_of(run, tmp_path, "rerun"), data), ROOT),
        "sample": ([sys.executable, "-m", "tools.sample", f"--checkpoint={run}", "--prompt=mia",
                    "--max_new_tokens=4"], str(tmp_path)),
    })
    try:
        term = procs.pop("sigterm")
        assert any("waiting for a batch" in line for line in iter(term.stdout.readline, ""))
        t = time.monotonic()
        term.send_signal(signal.SIGTERM)
        assert term.wait(timeout=30) == 128 + signal.SIGTERM and time.monotonic() - t < 20
        assert "no batch came in 1s" in term.stderr.read()
        out = {name: (p.communicate(timeout=TIMEOUT), p.returncode) for name, p in procs.items()}
    finally:
        for p in [term, *procs.values()]:
            if p.poll() is None:
                p.kill()

    def failed(name):
        (stdout, stderr), code = out[name]
        assert code == 1 and "Traceback" not in stderr, (name, stderr[-3000:])
        return stderr

    # 1: another model in the workdir: stops before touching anything, says what differs and how to start anew.
    message = failed("mismatch")
    assert "--config.model.d_model: the run has 32, this command 48" in message and "--overwrite" in message
    assert snapshot(mismatch) == before
    # 5 and 11: bad data on a finished run: file:line alone; config.json (and all else) as it was.
    assert failed("bad_data").strip().splitlines()[-1].startswith(f"ERROR: {data / 'bad.jsonl'}:2: ")
    assert snapshot(bad_data) == before
    # 4: a second run on a locked workdir names the first one's pid.
    assert f"in use by another run (pid {os.getpid()}" in failed("busy")
    assert snapshot(busy) == before
    # 11, 14: a config typo is one line naming the flag, also outside the repository root.
    assert failed("typo").strip().splitlines() == [
        "ERROR: --config.train.stepz=3: no such config field, or a value of the wrong type "
        "('stepz' Did you mean \"steps\" instead of \"stepz\"?)"]
    # 2: every record skipped is an error at start, with the counts (it used to hang).
    assert "no usable conversations: 20 records read, skipped 20 conversations longer than seq_len" in \
        failed("sft_all_skipped")
    # 6: DPO's reference must share the policy's tokenizer.
    message = failed("dpo_tokenizers")
    assert f"--config.init_from={policy} and --config.reference_from={reference} use different tokenizers" in message
    # 8: hf_import into an existing run would be shadowed by its checkpoints.
    assert "already holds a sft run (checkpoint 1)" in failed("hf_import")
    # 15: a rerun of the finished run writes no second sample; tools.sample prints no orbax INFO lines.
    (stdout, stderr), code = out["rerun"]
    assert code == 0 and "Already finished: step 4 of 4" in stdout, stderr[-3000:]
    rerun = snapshot(tmp_path / "rerun")
    assert {k: v for k, v in rerun.items() if not k.startswith("tensorboard")} == \
        {k: v for k, v in before.items() if not k.startswith("tensorboard")}
    (stdout, stderr), code = out["sample"]
    assert code == 0 and stdout.startswith("'mia' → ") and "INFO" not in stderr, stderr[-3000:]
    # 2: SIGTERM ended a process stuck waiting for data; the checkpoints before stayed (step 2's save may
    # have been in flight).
    assert checkpoint.Checkpointer(str(sigterm_dir / "checkpoints")).all_steps() in ([1], [1, 2])


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
    assert json.load(open(tmp_path / "config.json")) == {"stage": "toy", "train": {"steps": 4}}
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
