"""Checkpoints: an orbax CheckpointManager holding everything a run needs to resume bit-for-bit.

Each checkpoint step directory holds three items:
- `state`: the stage's train-state pytree (step, params, optimizer state, rng, and whatever else
  the stage keeps: critic, KL controller, ...), saved asynchronously and sharded as it lives;
- `data`: each process's data-iterator position (grain's own orbax handler, one JSON per process);
- `meta`: JSON with the run's config and anything a later stage needs to rebuild the model
  (model config, tokenizer path, reward normalisation).

Saves are atomic (orbax writes to a temporary directory and renames it), so a run killed with
SIGKILL leaves either the previous checkpoint or the new one, never half of one. A checkpoint that
exists but cannot be read (a truncated or missing file, garbage metadata) is moved aside to
`<step>.damaged` (kept for a person to look at; orbax ignores the name, so that step can be saved
again), reported in one line, and the one before it is used. A checkpoint that reads but holds
arrays of other shapes than the run asks for is not damaged: it belongs to another model, and
restoring stops with `RunMismatch` before anything is touched.

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
import sys
from typing import Any

import grain.checkpoint as grain_ckpt
import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxlm import sharding

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


DAMAGED_SUFFIX = ".damaged"


class RunMismatch(ValueError):
    """The checkpoints in a directory are another run's (another model or stage) than the one asked for."""


class Checkpointer:
    """Save/restore a stage's state, data position and metadata under `directory`.

    `create=False` for reading another run: a missing directory is a FileNotFoundError, not created.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True, create: bool = True):
        self.directory = os.path.abspath(directory)
        if not create and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"no such directory: {self.directory}")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=create, cleanup_tmp_directories=create)
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
        directory holds no (readable) checkpoint. Unreadable checkpoints are moved aside to
        `<step>.damaged` (one line says so); one whose arrays have other shapes raises RunMismatch.
        """
        for step in reversed(self.all_steps()):
            try:
                saved = saved_shapes(os.path.join(self.directory, str(step), "state"))
            except Exception as e:
                self._set_aside(step, e)
                continue
            wanted = sorted(map(_shape_key, jax.tree.leaves(abstract_state)))
            if saved != wanted:
                raise RunMismatch(f"checkpoint {self.directory}/{step} holds {len(saved)} arrays of other shapes than "
                                  f"the {len(wanted)} this command builds ({_first_difference(saved, wanted)}): it is "
                                  "another model's or another stage's. Start this run in another --workdir (or pass "
                                  "--overwrite to move the old run aside)")
            try:
                return step, *self.restore(step, abstract_state, data_iterator=data_iterator)
            except Exception as e:  # A damaged checkpoint: move it aside and fall back to the previous one.
                self._set_aside(step, e)
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        """Rename a damaged step to `<step>.damaged` (kept, and out of orbax's way), say so in one line."""
        _quiet_cancelled_reads()
        source = os.path.join(self.directory, str(step))
        target, n = source + DAMAGED_SUFFIX, 1
        while os.path.exists(target):
            n += 1
            target = f"{source}{DAMAGED_SUFFIX}{n}"
        reason = (str(error).strip().splitlines() or [""])[0][:160]
        if jax.process_index() == 0:
            os.rename(source, target)
            print(f"WARNING: checkpoint {source} is damaged ({type(error).__name__}: {reason}); moved to {target}, "
                  f"resuming from an earlier one", flush=True)
        sharding.barrier(f"checkpoint-set-aside-{step}")
        self._manager.reload()

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
        """The meta of `step`, or of the newest step whose meta reads (a damaged newest one is skipped)."""
        if step is not None:
            return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        found = newest_meta(self.directory)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return resolve_run_paths(found[1], run_dir(self.directory))

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def saved_shapes(state_dir: str) -> list[tuple]:
    """(shape, dtype) of every array saved in a step's `state` item, sorted (read from its metadata only)."""
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
    return sorted(_shape_key(m) for m in jax.tree.leaves(dict(tree)))


def _shape_key(leaf) -> tuple:
    return tuple(int(d) for d in leaf.shape), str(jax.numpy.dtype(leaf.dtype))


def _first_difference(saved: list, wanted: list) -> str:
    only_saved = [s for s in saved if s not in wanted]
    only_wanted = [w for w in wanted if w not in saved]
    return (f"saved e.g. {only_saved[0][0] if only_saved else 'nothing else'}, "
            f"this command e.g. {only_wanted[0][0] if only_wanted else 'nothing else'}")


def newest_meta(directory: str) -> tuple[int, dict] | None:
    """(step, meta) of the newest step in a checkpoint directory whose meta JSON reads, without orbax
    (cheap, read-only, the same on every process); None when there is none."""
    if not os.path.isdir(directory):
        return None
    steps = sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True)
    for step in steps:
        try:
            with open(os.path.join(directory, str(step), "meta", "metadata")) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict):
            return step, meta
    return None


def _quiet_cancelled_reads() -> None:
    """After a failed restore, tensorstore's reads still in flight call back into orbax's closed
    event loop and print one traceback each (hundreds for a model); those say nothing more than the
    one-line warning does, so they are dropped. Every other uncaught exception prints as before."""
    if not getattr(sys.excepthook, "_jaxlm_quiet", False):
        previous_except = sys.excepthook

        def excepthook(kind, value, tb):
            if not _cancelled_read(value):
                previous_except(kind, value, tb)

        excepthook._jaxlm_quiet = True
        sys.excepthook = excepthook
    if not getattr(sys.unraisablehook, "_jaxlm_quiet", False):  # how they mostly arrive ("Exception ignored")
        previous_unraisable = sys.unraisablehook

        def unraisablehook(unraisable):
            if not _cancelled_read(unraisable.exc_value):
                previous_unraisable(unraisable)

        unraisablehook._jaxlm_quiet = True
        sys.unraisablehook = unraisablehook


def _cancelled_read(error) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def model_kind(params) -> str:
    """What a parameter tree is, in words (for errors): a reward model's {trunk, head} or a language model's."""
    if isinstance(params, dict) and {"trunk", "head"} <= set(params):
        return "a reward model (trunk and scalar head: a reward run)"
    return "a language model (a pretrain, sft, dpo, ppo, grpo or cai run)"


def run_dir(directory: str) -> str:
    """The run directory of a checkpoint directory (its parent when it is RUN/checkpoints)."""
    directory = os.path.abspath(directory)
    return os.path.dirname(directory) if os.path.basename(directory) == "checkpoints" else directory


def relative_run_paths(meta: dict, workdir: str) -> dict:
    """`meta` as saved: its `tokenizer`, when inside the run, relative to it, so a run directory can
    be moved or copied and still read."""
    path = meta.get("tokenizer")
    if isinstance(path, str) and os.path.isabs(path) and _inside(path, workdir):
        return {**meta, "tokenizer": os.path.relpath(path, workdir)}
    return meta


def resolve_run_paths(meta: dict, directory: str) -> dict:
    """`meta` as read from the run in `directory`: its `tokenizer` an absolute path inside the run.

    Relative paths are the run's own; an absolute path from before runs stored them relative
    (or from the run's old place, if it was moved) gives way to the run's own copy of the same
    name. A path that leaves the run directory is refused: a checkpoint says nothing about files
    outside it, and reading one would trust whoever wrote the meta.
    """
    path = meta.get("tokenizer")
    if not isinstance(path, str) or not path:
        return meta
    own = os.path.join(directory, os.path.basename(path.rstrip("/")))
    if not os.path.isabs(path):
        resolved = os.path.join(directory, path)
    elif _inside(path, directory) or not os.path.exists(own):
        resolved = path
    else:
        resolved = own  # moved run
    if not _inside(resolved, directory):
        raise ValueError(f"the checkpoint meta of {directory} names the tokenizer {path}, outside the run directory; "
                         "refusing it (a run keeps its tokenizer inside it: copy it there)")
    return {**meta, "tokenizer": os.path.abspath(resolved)}


def _inside(path: str, directory: str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(directory)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


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
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{path}: no such run directory")
    if step is None:
        found = newest_meta(directory)
        if found is None:
            raise FileNotFoundError(f"no checkpoint found in {path}")
        step, meta = found
    else:
        ckpt = Checkpointer(directory, async_save=False, create=False)
        meta = ckpt.restore_meta(step)
        ckpt.close()
    meta = resolve_run_paths(meta, run_dir(directory))
    state_dir = os.path.join(directory, str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
    if item not in tree:
        raise KeyError(f"checkpoint {path} step {step} has no '{item}' (it has {sorted(tree)})")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), dict(tree))
    if shardings is not None:
        try:
            target[item] = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), target[item],
                                        shardings)
        except ValueError:  # another pytree: a reward model where a language model is asked for, or the reverse
            raise RunMismatch(f"{path} is a {meta.get('stage', '?')} run, {model_kind(target[item])}; this needs "
                              f"{model_kind(shardings)}") from None
    try:
        restored = checkpointer.restore(state_dir, target)
    except Exception as e:  # e.g. another run's damaged checkpoint: say which (not ours to move aside)
        _quiet_cancelled_reads()
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"checkpoint {directory}/{step} cannot be restored ({type(e).__name__}: {reason})") from None
    return restored[item], meta

