"""Checkpoints: an orbax CheckpointManager holding everything a run needs to resume bit-for-bit.

Each checkpoint step directory holds three items:
- `state`: the stage's train-state pytree (step, params, optimizer state, rng, and whatever else
  the stage keeps: critic, KL controller, ...), saved asynchronously and sharded as it lives;
- `data`: each process's data-iterator position (grain's own orbax handler, one JSON per process);
- `meta`: JSON with the run's config and anything a later stage needs to rebuild the model
  (model config, tokenizer path, reward normalisation).

Saves are atomic (orbax writes to a temporary directory and renames it), so a run killed with
SIGKILL leaves either the previous checkpoint or the new one, never half of one. A checkpoint that
exists but cannot be read is reported and the one before it is used.

Process layout: `state` restores onto any mesh and any number of processes (orbax reads each
array's saved shards and reassembles them into the target shardings). `data` cannot: process i
of n reads records i, i+n, ... of the source, so a position in one layout's shards means nothing
in another's. A checkpoint written by a different number of processes therefore restores its
state, leaves the iterator where it was, warns, and sets `data_state_restored = False`; the
training loop then replays the new layout's iterator up to the restored step (`jaxlm.loop`),
which puts it exactly where a run with the new layout would be.

Only jaxlm's own checkpoint directories are read here; `jaxlm.init_source` is where a run
directory or a Hugging Face directory (`hf:PATH`) becomes a model, its weights and a tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain.checkpoint as grain_ckpt
import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


class _IteratorSnapshot:
    """Freezes an iterator's state at save time, so an asynchronous save can't see later batches.

    Also adapts any iterator with get_state()/set_state() of JSON-serialisable dicts to grain's
    handler (which takes the bytes path for objects that are not grain DatasetIterators).
    """

    def __init__(self, iterator):
        self._iterator = iterator
        self._state = json.dumps(iterator.get_state()).encode() if hasattr(iterator, "get_state") else None

    def get_state(self) -> bytes:
        return self._state

    def set_state(self, state: bytes):
        self._iterator.set_state(json.loads(state.decode()))

    def start_prefetch(self):
        pass


class Checkpointer:
    """Save/restore a stage's state, data position and metadata under `directory`."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        # After a restore with a data iterator: True if its position was restored, False if the
        # checkpoint was written by a different number of processes (the iterator is untouched).
        self.data_state_restored: bool | None = None

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, *, data_iterator=None, meta: dict | None = None, force: bool = True) -> bool:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_iterator is not None:
            items["data"] = grain_ckpt.CheckpointSave(_IteratorSnapshot(data_iterator))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_latest(self, abstract_state: Any, *, data_iterator=None) -> tuple[int, Any, dict] | None:
        """Restore the newest readable checkpoint into the shardings of `abstract_state`.

        `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding` set (e.g. from
        jax.eval_shape plus the stage's shardings). Returns (step, state, meta), or None when the
        directory holds no checkpoint. Unreadable checkpoints are logged and skipped.
        """
        for step in reversed(self.all_steps()):
            try:
                return step, *self.restore(step, abstract_state, data_iterator=data_iterator)
            except Exception as e:  # A damaged checkpoint: say which and fall back to the previous one.
                log.error("checkpoint %s/%d cannot be restored (%s: %s); trying the previous one",
                          self.directory, step, type(e).__name__, str(e).splitlines()[0][:300])
                print(f"WARNING: checkpoint {self.directory}/{step} is unreadable "
                      f"({type(e).__name__}); falling back to an earlier one", flush=True)
        return None

    def restore(self, step: int, abstract_state: Any, *, data_iterator=None) -> tuple[Any, dict]:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        self.data_state_restored = None if data_iterator is None else self._restore_data(step, data_iterator)
        return restored["state"], restored["meta"] or {}

    def _restore_data(self, step: int, data_iterator) -> bool:
        """Restore this process's iterator position; False (and a warning) if the layout changed."""
        index, count = jax.process_index(), jax.process_count()
        data_dir = os.path.join(self.directory, str(step), "data")
        saved = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []
        if f"process_{index}-of-{count}.json" in saved:
            self._manager.restore(step, args=ocp.args.Composite(
                data=grain_ckpt.CheckpointRestore(_IteratorSnapshot(data_iterator))))
            return True
        layouts = {name.rsplit("-of-", 1)[-1].removesuffix(".json") for name in saved if "-of-" in name}
        if not layouts or str(count) in layouts:  # Missing, or missing this process's file: damaged.
            raise FileNotFoundError(f"checkpoint {self.directory}/{step} has no data-iterator state for process "
                                    f"{index} of {count} (it holds {saved or 'none'})")
        message = (f"checkpoint {self.directory}/{step} was written by {' or '.join(sorted(layouts))} processes, "
                   f"this run has {count}: the model and optimizer state are restored, but each process's data "
                   f"position belongs to the old layout's shards and is not restored")
        log.warning(message)
        if index == 0:
            print(f"WARNING: {message}.", flush=True)
        return False

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def checkpoint_dir(path: str) -> str:
    """Accept a run's workdir or its checkpoints/ directory."""
    path = os.path.abspath(path)
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


def load_params(path: str, step: int | None = None, *, item: str = "params", shardings: Any = None) -> tuple[Any, dict]:
    """Load one subtree of a saved state (`params`, or e.g. `policy` / `critic`) and the run's metadata.

    `path` is a run's workdir or its checkpoints/ directory. The subtree lands on `shardings`
    (a matching tree of jax.sharding.Sharding, e.g. the next stage's parameter shardings) or, by
    default, on the first local device.
    """
    directory = checkpoint_dir(path)
    ckpt = Checkpointer(directory, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint found in {path}")
    meta = ckpt.restore_meta(step)
    ckpt.close()
    state_dir = os.path.join(directory, str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
    if item not in tree:
        raise KeyError(f"checkpoint {path} step {step} has no '{item}' (it has {sorted(tree)})")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), dict(tree))
    if shardings is not None:
        target[item] = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), target[item], shardings)
    restored = checkpointer.restore(state_dir, target)
    return restored[item], meta

