"""Launching jaxlm commands as one or several local processes (a localhost coordinator, gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run(args: list[str], *, processes: int = 1, devices: int = 1, per_process: dict[int, list[str]] | None = None,
        distributed=lambda address, n, i: [f"--config.distributed.coordinator_address={address}",
                                           f"--config.distributed.num_processes={n}",
                                           f"--config.distributed.process_id={i}"],
        env: dict | None = None, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """`args` (a command line) as `processes` processes of `devices` CPU devices each, all at once;
    `per_process[i]` adds flags to process i only. Returns each process's result, in process order."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {}),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    address = f"localhost:{free_port()}"
    commands = [args + (distributed(address, processes, i) if processes > 1 else []) + (per_process or {}).get(i, [])
                for i in range(processes)]
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    results = []
    try:
        for c, p in zip(commands, procs):
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def module(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", name, *args]
