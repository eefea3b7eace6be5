"""One training step on 8 simulated CPU devices equals one device, for every kind of mesh."""

import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from jaxlm import sharding

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "sharded_step.py")


def test_sharded_step_matches_single_device():
    # data=8, fsdp=8, tensor=8 and data=2×fsdp=2×tensor=2: loss rtol 1e-5, params rtol 1e-5.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    lines = [l for l in result.stdout.splitlines() if l.endswith(("OK", "MISMATCH"))]
    assert result.returncode == 0 and len(lines) == 4, result.stdout + result.stderr[-3000:]


class _FakeMesh:
    shape = {"data": 2, "fsdp": 2, "tensor": 4}


def test_logical_to_spec_rules():
    mesh = _FakeMesh()
    assert sharding.logical_to_spec(("embed", "mlp"), mesh=mesh, shape=(64, 128)) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", "length")) == P(("data", "fsdp"), None)
    # 2 kv heads cannot be split 4 ways: replicated instead of an error.
    assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), mesh=mesh, shape=(64, 2, 16)) == P("fsdp", None, None)
    # A mesh axis is used at most once per array.
    assert sharding.logical_to_spec(("heads", "kv_heads")) == P("tensor", None)


def test_make_mesh_sizes():
    import jax
    n = jax.device_count()
    assert sharding.make_mesh().shape == {"data": n, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="needs"):
        sharding.make_mesh(data=n + 1)
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh(data=-1, fsdp=-1)
