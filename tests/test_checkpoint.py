"""Checkpoints: round trip, keep-last-N, and a damaged newest checkpoint falls back to the previous one."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import checkpoint, sharding
from jaxlm.train_state import abstract_with_shardings


def _state(value):
    return {"params": {"w": jnp.full((4, 3), value, jnp.float32)}, "step": jnp.asarray(int(value), jnp.int32)}


def _abstract(mesh):
    state = _state(0.0)
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
    return abstract_with_shardings(state, shardings)


def test_round_trip_and_keep_last(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, _state(float(step)), meta={"stage": "test", "step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    step, state, meta = ckpt.restore_latest(_abstract(sharding.make_mesh()))
    assert step == 3 and meta == {"stage": "test", "step": 3}
    np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 3.0))
    params, meta = checkpoint.load_params(str(tmp_path))
    np.testing.assert_array_equal(params["w"], np.full((4, 3), 3.0))
    ckpt.close()


def test_damaged_latest_checkpoint_falls_back(tmp_path, capsys):
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3)
    ckpt.save(1, _state(1.0), meta={"step": 1})
    ckpt.save(2, _state(2.0), meta={"step": 2})
    ckpt.close()
    # Damage step 2's array data (a disk error, a partial copy).
    for path in glob.glob(os.path.join(tmp_path, "2", "state", "**", "*"), recursive=True):
        if os.path.isfile(path) and "metadata" not in os.path.basename(path):
            with open(path, "wb") as f:
                f.write(b"garbage")
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    step, state, meta = ckpt.restore_latest(_abstract(sharding.make_mesh()))
    assert step == 1 and meta == {"step": 1}
    np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 1.0))
    out = capsys.readouterr().out
    assert f"{tmp_path}/2 is damaged" in out and f"moved to {tmp_path}/2.damaged" in out
    assert ckpt.all_steps() == [1] and os.path.isdir(tmp_path / "2.damaged")  # kept, out of the way


def test_empty_directory_restores_nothing(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "none"))
    assert ckpt.restore_latest(_abstract(sharding.make_mesh())) is None
