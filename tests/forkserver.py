"""Commands run as forks of one process that has already imported jax and jaxlm: each behaves as a
subprocess would (its own exit status, stdout, stderr, signals, cwd) without paying the ~3 CPU-seconds
of imports every `python -m experiments.X` costs. For tests that start many short commands.

    with ForkServer(env) as server:
        proc = server.start(["-m", "experiments.pretrain", "--workdir=DIR"], cwd=ROOT)  # or ["-c", SCRIPT]
        proc.pid                      # for signals
        proc.wait_for_line("ready")   # stdout so far, once a line holds "ready"
        code, stdout, stderr = proc.wait(timeout=60)  # code as Popen's: -N when killed by signal N

The server only imports (it never starts a JAX backend, so no XLA thread exists to be lost in a fork);
each fork sets its cwd, argv and sys.path[0] as `python` would, runs the module or script as __main__,
runs the atexit functions and exits. The server reports each pid, then each exit status, as JSON lines.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELOAD = ("jax", "jax.numpy", "numpy", "experiments.common", "jaxlm.runtime", "jaxlm.loop", "jaxlm.steps.grpo",
           "jaxlm.steps.ppo", "jaxlm.steps.dpo", "jaxlm.rewards", "jaxlm.data.tinyworld", "jaxlm.sampling")

_SERVER = r"""
import atexit, importlib, json, os, runpy, select, sys, traceback
sys.path.insert(0, ROOT)
for name in PRELOAD:
    importlib.import_module(name)
base_path = list(sys.path)

def child(request):
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1), os.dup2(err, 2), os.close(out), os.close(err)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.chdir(request["cwd"])
    argv = request["argv"]
    sys.path[:] = [request["cwd"] if argv[0] == "-m" else ""] + base_path
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush(), sys.stderr.flush()
    finally:
        os._exit(code)

print(json.dumps({"ready": os.getpid()}), flush=True)
running, pending = set(), b""
while True:
    if select.select([0], [], [], 0.05)[0]:  # the fd itself: a file object's buffer would hide lines
        data = os.read(0, 65536)
        if not data:
            break
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                child(request)
            running.add(pid)
            print(json.dumps({"id": request["id"], "pid": pid}), flush=True)
    for pid in list(running):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            running.discard(pid)
            print(json.dumps({"pid": pid, "code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class ForkedProcess:
    def __init__(self, server: "ForkServer", pid: int, stdout: str, stderr: str):
        self.server, self.pid, self.stdout_path, self.stderr_path = server, pid, stdout, stderr

    def output(self) -> tuple[str, str]:
        with open(self.stdout_path) as out, open(self.stderr_path) as err:
            return out.read(), err.read()

    def wait_for_line(self, text: str, timeout: float) -> str:
        """Stdout so far once a line of it holds `text`; AssertionError (with stderr) if the process
        ends or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stdout, stderr = self.output()
            if any(text in line for line in stdout.splitlines()):
                return stdout
            if self.server.exit_code(self.pid, 0.05) is not None:
                break
        raise AssertionError(f"no line with {text!r} from pid {self.pid}:\n{self.output()[1][-3000:]}")

    def wait(self, timeout: float) -> tuple[int, str, str]:
        """(exit status, stdout, stderr); TimeoutError if the process has not ended within `timeout`."""
        code = self.server.exit_code(self.pid, timeout)
        if code is None:
            raise TimeoutError(f"pid {self.pid} still running after {timeout}s:\n{self.output()[1][-3000:]}")
        return (code, *self.output())


class ForkServer:
    """See the module docstring. `directory` holds the commands' output files."""

    def __init__(self, env: dict, directory: str, preload=PRELOAD):
        self.directory, self._codes, self._pids, self._count, self._buffer = directory, {}, {}, 0, b""
        self._ready = False
        code = _SERVER.replace("ROOT", repr(ROOT)).replace("PRELOAD", repr(tuple(preload)))
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        if not self._read_until(lambda: self._ready, timeout=120):
            raise TimeoutError("the fork server did not start")

    def start(self, argv: list[str], cwd: str = ROOT) -> ForkedProcess:
        """Fork a process running `python ARGV` in `cwd` (argv starts with "-m" or "-c")."""
        assert argv[0] in ("-m", "-c"), argv
        self._count += 1
        key = self._count
        out, err = (os.path.join(self.directory, f"{key}.{name}") for name in ("stdout", "stderr"))
        request = {"id": key, "argv": [str(a) for a in argv], "cwd": str(cwd), "stdout": out, "stderr": err}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        if not self._read_until(lambda: key in self._pids, timeout=60):
            raise TimeoutError("the fork server did not answer")
        return ForkedProcess(self, self._pids[key], out, err)

    def exit_code(self, pid: int, timeout: float) -> int | None:
        """The exit status of `pid`, waiting up to `timeout` seconds; None if it is still running."""
        self._read_until(lambda: pid in self._codes, timeout)
        return self._codes.get(pid)

    def _read_until(self, done, timeout: float) -> bool:
        """Read the server's messages until `done()` or `timeout`; whether `done()`."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return False
            data = os.read(fd, 65536)
            if not data:
                raise RuntimeError(f"the fork server ended (exit status {self.proc.wait()})")
            self._buffer += data
            *lines, self._buffer = self._buffer.split(b"\n")
            for line in lines:
                message = json.loads(line)
                if "code" in message:
                    self._codes[message["pid"]] = message["code"]
                elif "id" in message:
                    self._pids[message["id"]] = message["pid"]
                elif "ready" in message:
                    self._ready = True
        return True

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
