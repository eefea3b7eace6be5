"""Plumbing every experiment binary shares: workdir, config file, mesh, SIGTERM, NaN guard.

Kept small on purpose: the binaries themselves stay flat and readable top to bottom; only the
parts that must behave identically in every stage live here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys

import jax
import ml_collections
from absl import flags, logging

from jaxlm import sharding
from jaxlm.sharding import any_process, barrier, host_copy  # the binaries' multi-host helpers


def start(cfg: ml_collections.ConfigDict, workdir: str, stage: str) -> str:
    """Initialise multi-process JAX if asked, create the workdir, write config.json. Returns workdir."""
    if not flags.FLAGS["verbosity"].present:  # orbax and grain log every save at INFO.
        logging.set_verbosity(logging.WARNING)
    dist = cfg.get("distributed", ml_collections.ConfigDict())
    if sharding.maybe_initialize_distributed(dist.get("coordinator_address", ""), dist.get("num_processes", 0),
                                             dist.get("process_id", -1)):
        print(f"Process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local "
              f"{jax.default_backend()} devices, {jax.device_count()} in all", flush=True)
    workdir = os.path.abspath(workdir)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump({"stage": stage, **cfg.to_dict()}, f, indent=2, default=str)
    return workdir


def every(step: int, period: int) -> bool:
    """True on every `period`-th step; a period of 0 (or less) means never, not a division by zero."""
    return period > 0 and step % period == 0


def mesh_from_config(cfg: ml_collections.ConfigDict):
    m = cfg.mesh
    return sharding.make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor)


def config_dict(obj) -> dict:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)


class StopSignal:
    """Turns SIGTERM (preemption, `kill`, SLURM time limit) into a flag the loop checks each step,
    so the run saves a checkpoint and exits cleanly instead of dying mid-step.

    Several processes get the signal at slightly different steps, and saving is a collective, so
    `check(step)` is what the loop asks: with one process it is the flag itself; with several,
    the processes exchange their flags every `sync_every` steps (a tiny all-gather, and a host
    sync: pick a step the loop syncs at anyway, e.g. its logging interval) and stop together.
    """

    def __init__(self, sync_every: int = 1):
        self.requested = False
        self.sync_every = max(1, sync_every)
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def check(self, step: int) -> bool:
        """Whether every process stops after `step` (call it on every process, every step)."""
        if jax.process_count() == 1:
            return self.requested
        return step % self.sync_every == 0 and any_process(self.requested)

    def _handle(self, signum, frame):
        self.requested = True
        print("\nSIGTERM received: saving a checkpoint and exiting.", file=sys.stderr, flush=True)

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


class NonFiniteLoss(RuntimeError):
    pass


def check_finite(step: int, metrics: dict, last_good_step: int | None, checkpoint_dir: str):
    """Stop the run with a clear message when the loss is NaN or infinite (nothing is saved after)."""
    loss = float(metrics.get("loss", 0.0))
    if not math.isfinite(loss):
        where = (f"the last good checkpoint is step {last_good_step} in {checkpoint_dir}" if last_good_step is not None
                 else "no checkpoint was written before it")
        raise NonFiniteLoss(f"loss became {loss} at step {step}; stopping. {where}. Lower the learning rate "
                            f"or check the data, then rerun the same command to resume from that checkpoint.")


def crash_if_asked(step: int, crash_after_step: int, ckpt) -> None:
    """Testing only (`--config.train.crash_after_step`): SIGKILL the process right after `step`.

    Waits for the checkpoints already started, so the resume tests see exactly the saves made
    before the crash and lose every later step, as a real kill between steps would.
    """
    if crash_after_step and step == crash_after_step:
        ckpt.wait()
        os.kill(os.getpid(), signal.SIGKILL)


def exit_on_non_finite(error: NonFiniteLoss, ckpt, progress) -> None:
    """A binary's end after `check_finite` raised: close the checkpointer (the last good save
    stays), close the progress bar, print the error (it names the step and the checkpoint to
    resume from) and exit with status 1."""
    ckpt.close()
    progress.close()
    print(f"\nERROR: {error}", file=sys.stderr, flush=True)
    sys.exit(1)
