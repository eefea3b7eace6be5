"""Command-line plumbing of the experiment binaries: multi-process start, workdir, config.json, mesh.

What every training binary shares beyond this (the loop, SIGTERM, the NaN guard) is the library's
`jaxlm.loop`; shared preparation of data and models is `experiments/common.py`.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import flags, logging

from jaxlm import sharding


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


def mesh_from_config(cfg: ml_collections.ConfigDict):
    m = cfg.mesh
    return sharding.make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor)
