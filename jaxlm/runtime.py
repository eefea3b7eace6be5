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
from jax.experimental import multihost_utils

from jaxlm import sharding


def start(cfg: ml_collections.ConfigDict, workdir: str, stage: str) -> str:
    """Initialise multi-process JAX if asked, create the workdir, write config.json. Returns workdir."""
    if not flags.FLAGS["verbosity"].present:  # orbax and grain log every save at INFO.
        logging.set_verbosity(logging.WARNING)
    dist = cfg.get("distributed", ml_collections.ConfigDict())
    sharding.maybe_initialize_distributed(dist.get("coordinator_address", ""), dist.get("num_processes", 0),
                                          dist.get("process_id", -1))
    workdir = os.path.abspath(workdir)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump({"stage": stage, **cfg.to_dict()}, f, indent=2, default=str)
    return workdir


def mesh_from_config(cfg: ml_collections.ConfigDict):
    m = cfg.mesh
    return sharding.make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor)


def barrier(name: str):
    """All processes wait here (e.g. until process 0 has written a tokenizer)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def config_dict(obj) -> dict:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)


class StopSignal:
    """Turns SIGTERM (preemption, `kill`, SLURM time limit) into a flag the loop checks each step,
    so the run saves a checkpoint and exits cleanly instead of dying mid-step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        print(f"\nSIGTERM received: saving a checkpoint and exiting.", file=sys.stderr, flush=True)

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
