"""The device mesh, the logical→mesh rules table, sharded initialisation, multi-host start-up and
the multi-host helpers (`barrier`, `any_process`, `host_copy`).

One mesh with three named axes serves every stage:
- `data`: plain data parallelism (parameters replicated);
- `fsdp`: data parallelism with parameters and optimizer state sharded (ZeRO-3 style);
- `tensor`: Megatron-style tensor parallelism over heads, MLP width and vocabulary.

Code never names mesh axes directly: parameters and activations carry logical names (`embed`,
`mlp`, `heads`, ...) and `DEFAULT_RULES` says where each goes. Changing the parallelism of a run
is a config change (mesh sizes or rules), never a code change.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name → mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # Activations: the residual stream is replicated over `tensor`; the wide parts are split.
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
)

_context = threading.local()


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one size may be -1 meaning 'the rest'."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs "
                         f"{int(np.prod(sizes))} devices, but {len(devices)} are available")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):  # Topology-aware device order (TPU/GPU interconnects).
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def logical_to_spec(names: Sequence[str | None], rules=DEFAULT_RULES, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """PartitionSpec for a tuple of logical names.

    A dimension is left replicated when its rule names a mesh axis already used by an earlier
    dimension, or (given shape and mesh) when its size is not divisible by the mesh axes' size:
    e.g. 2 kv heads on a tensor axis of 4 are replicated rather than failing.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
        if axes and shape is not None and mesh is not None:
            size = int(np.prod([mesh.shape[a] for a in axes]))
            if shape[i] % size:
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def tree_shardings(mesh: Mesh, logical_axes, abstract_tree, rules=DEFAULT_RULES):
    """NamedShardings for a tree of arrays given the matching tree of logical-axis tuples."""
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)
    return jax.tree.map(
        lambda names, a: NamedSharding(mesh, logical_to_spec(names, rules, a.shape, mesh)),
        logical_axes, abstract_tree, is_leaf=is_axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of a [B, T, ...] batch array: batch over the data axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",), rules, mesh=mesh))


@contextlib.contextmanager
def _rules_context(value):
    previous = getattr(_context, "value", None)
    _context.value = value
    try:
        yield
    finally:
        _context.value = previous


def use_rules(mesh: Mesh, rules=DEFAULT_RULES):
    """While tracing under this context, `constrain` pins activations to the mesh."""
    return _rules_context((mesh, rules))


def without_rules():
    """While tracing under this context, `constrain` is a no-op: for the body of a `shard_map`,
    whose arrays are per-device blocks (a sharding constraint there is an error), even when the
    caller traces under `use_rules` (a training step's sampling hook)."""
    return _rules_context(None)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside `use_rules` or on one device."""
    ctx = getattr(_context, "value", None)
    if ctx is None:
        return x
    mesh, rules = ctx
    if mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules, x.shape, mesh)))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, jax.Array]:
    """Assemble a global batch from each process's local rows (works for 1 or many processes)."""
    sharding = batch_sharding(mesh, rules)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def maybe_initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
                                 cpu_collectives: str = "gloo") -> bool:
    """Start JAX's multi-controller runtime when this run spans several processes.

    Explicit flags win: every process gets the same `coordinator_address` (host:port of process
    0, reachable from all) and `num_processes`, and its own `process_id`. Otherwise a launcher is
    detected from its environment and `jax.distributed.initialize()` reads the details itself:
    SLURM (`srun` with more than one task in the step: one process per task; on GPU nodes JAX
    gives each task its `SLURM_LOCALID`-th GPU), Open MPI's `mpirun` with more than one rank, and
    multi-host TPU VMs (`TPU_WORKER_HOSTNAMES` with several hosts).
    A batch script's own shell step (SLURM_NTASKS > 1 but not launched by srun) stays a single
    process rather than waiting forever for tasks that do not exist.

    Must run before any other JAX call. Returns whether the runtime was initialised.
    `cpu_collectives` selects the CPU backend's cross-process collectives (gloo needs nothing
    installed); accelerators use their own (NCCL, ICI) whatever it says.
    """
    if coordinator_address:
        if num_processes <= 0 or process_id < 0:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        if cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    env = os.environ
    slurm_tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    slurm_step = "SLURM_STEP_NODELIST" in env and "SLURM_PROCID" in env  # What JAX's SLURM detection reads.
    tpu_hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    mpi_ranks = int(env.get("OMPI_COMM_WORLD_SIZE") or 1) if "OMPI_MCA_orte_hnp_uri" in env else 1
    if (slurm_tasks > 1 and slurm_step) or mpi_ranks > 1 or "," in tpu_hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        if cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        jax.distributed.initialize()
        return True
    return False


def barrier(name: str):
    """All processes wait here (e.g. until process 0 has written a tokenizer)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True if `flag` is True on any process. A collective: every process must call it."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def host_copy(tree):
    """Numpy copies of whole arrays on every process's host, also when they are sharded across
    processes (then an all-gather: every process must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def describe(mesh: Mesh) -> str:
    return " × ".join(f"{name}={size}" for name, size in mesh.shape.items()) + f" ({mesh.size} devices)"

