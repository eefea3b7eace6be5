"""The shared training loop (jaxlm.loop) on a toy problem (tests/scripts/loop_toy.py), in one
process and in two: SIGKILL and resume is bitwise exact; SIGTERM sent to one process makes both
save the same step and exit 0, and the rerun continues as if nothing happened; a NaN loss stops the
run naming the last good checkpoint; a checkpoint moves between process counts with the data
position replayed; evaluation agrees across processes whose shards end at different batches.

The toy's data is laid out so that every process count sees the same rows per global step (in
another order), so losses across layouts agree to float rounding (RTOL), and runs in one layout
agree bit for bit."""

import json
import os
import sys

import numpy as np
import pytest

from launch import ROOT, run
from jaxlm import checkpoint

SCRIPT = os.path.join(ROOT, "tests", "scripts", "loop_toy.py")
RTOL = 1e-5  # fixed before measuring: only float summation order differs between layouts


def toy(workdir, *flags, processes=1, per_process=None):
    args = [sys.executable, SCRIPT, f"--workdir={workdir}", *flags]
    return run(args, processes=processes, per_process=per_process, timeout=240,
               distributed=lambda address, n, i: [f"--port={address.split(':')[1]}", f"--processes={n}",
                                                  f"--process_id={i}"])


def metrics(workdir) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}


def params(workdir, step=None):
    return np.asarray(checkpoint.load_params(str(workdir), step)[0]["w"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    (result,) = toy(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_sigkill_and_resume_is_bitwise(straight, tmp_path):
    (crashed,) = toy(tmp_path, "--crash_after_step=6")
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 4
    (resumed,) = toy(tmp_path)
    assert resumed.returncode == 0 and "Resuming from step 4" in resumed.stdout, resumed.stderr[-3000:]
    assert metrics(tmp_path) == metrics(straight)  # every logged number, bit for bit
    np.testing.assert_array_equal(params(tmp_path), params(straight))


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(straight, tmp_path):
    # log_every=2: the processes exchange their stop flags at even steps, so a SIGTERM after step 5
    # on process 1 stops both after step 6, each with the same checkpoint (saving is a collective).
    results = toy(tmp_path, processes=2, per_process={1: ["--sigterm_after_step=5"]})
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Stopped at step 6" in r.stdout and "stopped=True" in r.stdout, r.stdout[-2000:]
    assert "SIGTERM received" in results[1].stderr
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [4, 6]
    assert max(metrics(tmp_path)) == 6
    for r in toy(tmp_path, processes=2):  # the rerun finishes the run
        assert r.returncode == 0 and "Resuming from step 6" in r.stdout, r.stderr[-3000:]
    got, want = metrics(tmp_path), metrics(straight)
    assert sorted(got) == sorted(want) == [2, 4, 6, 8, 10, 12]
    for step in want:  # two processes, stopped and resumed == one process, uninterrupted
        np.testing.assert_allclose(got[step]["loss"], want[step]["loss"], rtol=RTOL, err_msg=f"step {step}")
    for step in (4, 8, 12):  # the held-out shards hold 2 and 1 batches: the processes agree when to stop
        np.testing.assert_allclose(got[step]["eval_loss"], want[step]["eval_loss"], rtol=RTOL)
        assert got[step]["eval_rows"] == want[step]["eval_rows"] == 5
    np.testing.assert_allclose(params(tmp_path), params(straight), rtol=RTOL)


def test_checkpoints_move_between_process_counts_with_the_data_replayed(straight, tmp_path):
    legs = ((1, 4), (2, 8), (1, 12))
    outputs = {}
    for processes, last in legs:
        results = toy(tmp_path, f"--steps={last}", processes=processes)
        for r in results:
            assert r.returncode == 0, r.stderr[-3000:]
        outputs[last] = results[0].stdout
    for last in (8, 12):
        assert f"Resuming from step {last - 4}" in outputs[last] and f"replaying {last - 4} batches" in outputs[last]
    got, want = metrics(tmp_path), metrics(straight)
    assert sorted(got) == sorted(want)
    for step in want:
        np.testing.assert_allclose(got[step]["loss"], want[step]["loss"], rtol=RTOL, err_msg=f"step {step}")
    np.testing.assert_allclose(params(tmp_path), params(straight), rtol=RTOL)


def test_a_nan_loss_stops_the_run_naming_the_last_good_checkpoint(tmp_path):
    (result,) = toy(tmp_path, "--nan_at_step=7")
    assert result.returncode == 1
    assert "loss became nan at step 8" in result.stderr and "last good checkpoint is step 4" in result.stderr
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 4  # nothing saved after
    assert max(metrics(tmp_path)) == 6


def test_the_metrics_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports torch when it is installed, ~3 s (idle) to 13 s (loaded) at every binary's
    start; jaxlm.metrics imports it with torch hidden. Only a check where torch is installed."""
    pytest.importorskip("torch")
    import subprocess
    code = ("import sys; from jaxlm import metrics; w = metrics.MetricsWriter(sys.argv[1]); w._tb.add_scalar('x', 1.0, 1);"
            "w._tb.flush(); assert 'torch' not in sys.modules, 'torch imported'; import torch; print(torch.ones(1))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tensor([1.])" in result.stdout  # torch still imports afterwards
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
