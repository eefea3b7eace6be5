"""The one training loop every stage runs: restore or initialise, step, log, evaluate, save, stop.

    outcome = loop.train(workdir, ckpt, cadence, step_fn=step, batches=it, init_state=init,
                         abstract_state=target, meta=meta, evaluate=evaluate)

Contract. `step_fn(state, batch) -> (state, metrics)`, where `metrics` is a dict of scalars
(device or host) with `loss` (or the `finite_keys` given); `batches` is an iterator with
`get_state()/set_state()`, whose position is saved in every checkpoint. Step k (1-based) is the
k-th call of `step_fn`; checkpoint k holds the state after it, so a run resumes at k + 1 and a
resumed run sees exactly the batches an uninterrupted one would (bit for bit).

What lives here, once, because copies of it drifted apart in six binaries:
- restore the newest readable checkpoint, or `init_state()`; a checkpoint written by another
  number of processes restores its state but not the data position (`checkpoint.py`), so the
  iterator is replayed up to the restored step;
- the cadence: log every `log_every` steps, evaluate every `eval_every` and at the last step,
  save every `checkpoint_every` and at the last step, `hooks` at their own periods;
- SIGTERM: every process must stop at the same step, since saving is a collective, so the flag
  is exchanged at log steps (`StopSignal.check`); then save, exit cleanly, resume later;
- the non-finite guard (names the last good checkpoint), first-step compile time, throughput,
  the progress bar, metrics.jsonl (lines past the restored step dropped) and the hooks the
  resume tests use (`crash_after_step`: SIGKILL; `sigterm_after_step`: a preemption).
Stage-specific work plugs in as callables: `evaluate`, `initial_eval`, `hooks`, `finalize`
(reward normalisation before the last checkpoint), `on_finish` (final judge, eval.json).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax

from jaxlm import checkpoint, lora, metrics as metrics_lib, sharding

Metrics = dict[str, float]
DATA_WAIT_GRACE_S = 10  # After SIGTERM, how long a wait for the next batch may last before the process exits.
STALL_TIMEOUT_S = 300  # After SIGTERM, how long the loop may make no progress (no step, eval or save done:
#                         a collective waiting for a process that is gone) before the process exits.


@dataclasses.dataclass(frozen=True)
class Cadence:
    """How long a run is and how often it logs, evaluates and saves (0 = never; the last step
    always evaluates and saves)."""

    steps: int
    log_every: int = 1
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    crash_after_step: int = 0  # Testing only: SIGKILL right after this step.
    sigterm_after_step: int = 0  # Testing only: this process sends itself SIGTERM after this step.

    @classmethod
    def from_config(cls, train, **overrides) -> "Cadence":
        """From a config's `train` block (fields it lacks keep their defaults)."""
        fields = {f.name: train[f.name] for f in dataclasses.fields(cls) if f.name in train}
        return cls(**{**fields, **overrides})


@dataclasses.dataclass
class Outcome:
    state: Any
    start_step: int  # The step the run started from (0, or the restored checkpoint's).
    stopped: bool  # SIGTERM: saved and stopped before the last step.
    last_eval: Metrics  # The last `evaluate` result (empty if none ran in this process).


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(state, step) -> metrics or None`, every `every` steps (its metrics join that step's line)."""

    every: int
    fn: Callable[[Any, int], Mapping[str, Any] | None]


def train(workdir: str, ckpt: checkpoint.Checkpointer, cadence: Cadence, *, step_fn: Callable, batches: Iterator,
          init_state: Callable[[], Any], abstract_state: Any, meta: dict, desc: str,
          place: Callable[[Any], Any] = lambda batch: batch, mesh=None,
          evaluate: Callable[[Any, int], Mapping[str, Any]] | None = None,
          initial_eval: Callable[[Any], Mapping[str, Any]] | None = None, hooks: Sequence[Hook] = (),
          finalize: Callable[[Any], tuple[Any, dict]] | None = None,
          on_finish: Callable[[Any, metrics_lib.MetricsWriter, Metrics], None] | None = None,
          tokens_per_step: int = 0, finite_keys: Sequence[str] = ("loss",),
          progress_keys: Mapping[str, str] | None = None, step_outputs: Sequence[str] = ()) -> Outcome:
    """Run `cadence.steps` steps of `step_fn` from the newest checkpoint in `ckpt` (or step 0).

    `place(batch)` puts a host batch where the step expects it (`sharding.global_batch`); `mesh`
    makes the sharding rules visible while the step traces. `initial_eval(state)` runs on a fresh
    start and is logged at step 0. `finalize(state) -> (state, meta)` replaces the last step's
    state (and extends its meta) before it is saved, outside the sharding rules (host-side work on
    whole arrays). `on_finish(state, writer, last_eval)` runs
    once the last step is saved, also when a rerun finds the run already finished.
    Metrics that are strings go to TensorBoard's text tab, not metrics.jsonl.
    `progress_keys` maps progress-bar names to metric keys; `step_outputs` are JSONL files in the
    workdir whose lines carry a `step`, truncated like metrics.jsonl on resume.
    """
    steps = cadence.steps
    meta = checkpoint.relative_run_paths(meta, workdir)
    if ckpt.latest_step() is not None and "lora" in meta:  # a LoRA run resumes only on the base it started on
        lora.check_same_base(ckpt.restore_meta().get("lora", {}).get("base_fingerprint"),
                             meta["lora"].get("base_fingerprint") or {}, run=workdir, base=meta["lora"]["base"])
    start_step, state = _restore_or_init(ckpt, abstract_state, batches, init_state)
    if start_step > steps:
        ckpt.close()
        raise ValueError(f"--config.train.steps={steps} is below step {start_step}, where the run in {workdir} "
                         f"already is; give at least {start_step} steps to resume it, or use another --workdir for a "
                         "shorter run")
    write_config(workdir, meta)
    # Lines past the restored step are written again; a fresh start also drops what a run killed
    # before its first checkpoint wrote at step 0 (initial_eval writes it again).
    keep_until = start_step if start_step else -1
    _truncate_step_files([os.path.join(workdir, name) for name in step_outputs], keep_until)
    writer = metrics_lib.MetricsWriter(workdir, resume_step=keep_until)
    progress_keys = dict(progress_keys or {"loss": "loss"})
    last_eval: Metrics = {}
    if initial_eval is not None and start_step == 0:
        values = dict(initial_eval(state))
        if values:
            _write(writer, 0, values)

    progress = metrics_lib.Progress(total=steps, initial=min(start_step, steps), desc=desc)
    stop = StopSignal(sync_every=cadence.log_every)
    throughput = metrics_lib.Throughput()
    last_saved = ckpt.latest_step()
    stopping = False
    compile_start = time.perf_counter()
    rules = sharding.use_rules(mesh) if mesh is not None else contextlib.nullcontext()
    try:
        with rules:
            for step in range(start_step + 1, steps + 1):
                with stop.waiting_for_data():
                    batch = next(batches)
                state, step_metrics = step_fn(state, place(batch))
                throughput.add(tokens_per_step)
                progress.update(1)
                if step == start_step + 1:
                    jax.block_until_ready(step_metrics)
                    print(f"\nFirst step (compile + run) took {time.perf_counter() - compile_start:.1f}s", flush=True)
                    throughput.rate()
                if step == cadence.sigterm_after_step:
                    os.kill(os.getpid(), signal.SIGTERM)  # Through the real handler, as a preemption would.
                stopping = stop.check(step) and step < steps
                last = step == steps
                save_now = every(step, cadence.checkpoint_every) or last or stopping
                eval_now = evaluate is not None and (every(step, cadence.eval_every) or last)
                due = [h for h in hooks if every(step, h.every)]
                if every(step, cadence.log_every) or save_now or eval_now or due:
                    values = {k: float(v) for k, v in jax.device_get(dict(step_metrics)).items()}
                    check_finite(step, {"loss": sum(values[k] for k in finite_keys)}, last_saved,
                                         ckpt.directory)
                    if tokens_per_step:
                        values["tokens_per_second"] = throughput.rate()
                    if eval_now:
                        last_eval = dict(evaluate(state, step))
                        values.update(last_eval)
                    for hook in due:
                        values.update(hook.fn(state, step) or {})
                    _write(writer, step, values)
                    progress.update(0, **{name: values[k] for name, k in progress_keys.items() if k in values})
                    stop.beat()
                if save_now and not (last and finalize is not None):
                    ckpt.save(step, state, data_iterator=batches, meta=meta)
                    last_saved = step
                    stop.beat()
                if stopping:
                    break
                crash_if_asked(step, cadence.crash_after_step, ckpt)
        if finalize is not None and start_step < steps and not stopping:
            # Outside the sharding rules: host-side work on whole arrays (e.g. scoring samples).
            state, extra = finalize(state)
            ckpt.save(steps, state, data_iterator=batches, meta={**meta, **extra})
            last_saved = steps
        ckpt.close()  # Waits for the last save; SIGTERM's watchdog still covers a save that never ends.
    except NonFiniteLoss as e:
        writer.close()
        exit_on_non_finite(e, ckpt, progress)
    finally:
        stop.restore()
    progress.close()
    if stopping:
        writer.close()
        print(f"Stopped at step {last_saved}; rerun the same command to resume.", flush=True)
        return Outcome(state, start_step, True, last_eval)
    if start_step >= steps:
        print(f"Already finished: step {start_step} of {steps} ({ckpt.directory})", flush=True)
    if on_finish is not None:
        on_finish(state, writer, last_eval)
    writer.close()
    return Outcome(state, start_step, False, last_eval)


# --- The pieces ------------------------------------------------------------------------------------


def write_config(workdir: str, meta: Mapping[str, Any]) -> None:
    """WORKDIR/config.json = {"stage", "devices", **meta["config"]} (process 0, atomically), written
    once the run has started: a command that failed before (bad data, bad flags) leaves the run's own
    untouched. `devices` (count over all processes, processes, platform) is what the run saw, so a
    report can turn wall time into device-seconds."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "config.json")
    tmp = f"{path}.tmp.{os.getpid()}"
    devices = {"count": jax.device_count(), "processes": jax.process_count(), "platform": jax.default_backend()}
    with open(tmp, "w") as f:
        json.dump({"stage": meta.get("stage"), "devices": devices, **(meta.get("config") or {})}, f, indent=2,
                  default=str)
    os.replace(tmp, path)


def every(step: int, period: int) -> bool:
    """True on every `period`-th step; a period of 0 (or less) means never, not a division by zero."""
    return period > 0 and step % period == 0


class StopSignal:
    """Turns SIGTERM (preemption, `kill`, SLURM time limit) into a flag the loop checks each step,
    so the run saves a checkpoint and exits cleanly instead of dying mid-step.

    Several processes get the signal at slightly different steps, and saving is a collective, so
    `check(step)` is what the loop asks: with one process it is the flag itself; with several,
    the processes exchange their flags every `sync_every` steps (a tiny all-gather, and a host
    sync: pick a step the loop syncs at anyway, e.g. its logging interval) and stop together.

    A SIGTERM must end the process even when the loop never gets to check. Python runs signal
    handlers in the main thread only, between bytecodes, so a main thread blocked inside XLA (a
    collective waiting for a process that is gone) never runs one: the C-level handler also writes
    the signal's number to a socket (`signal.set_wakeup_fd`), and a thread reading it counts the
    SIGTERMs. After the first, a watchdog exits the process (status 143, unsaved, one line saying
    why) when the loop makes no progress: no batch `DATA_WAIT_GRACE_S` seconds into a wait for one
    (a data pipeline that filters out every record spins forever), no step, eval or save finished
    for `STALL_TIMEOUT_S`; a second SIGTERM exits at once.
    """

    live = 0  # StopSignals watching now (a forked child stops reporting to their sockets)

    def __init__(self, sync_every: int = 1):
        self.requested = False
        self.sync_every = max(1, sync_every)
        self._waiting = False
        self._progress = time.monotonic()  # when the loop last began a step or finished a piece of one
        self._closed = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)  # the C handler must never block
        self._previous_wakeup = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        StopSignal.live += 1
        threading.Thread(target=self._count_signals, daemon=True, name="sigterm-watch").start()

    @contextlib.contextmanager
    def waiting_for_data(self):
        self.beat()
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def beat(self):
        """The loop made progress (the watchdog's clock restarts)."""
        self._progress = time.monotonic()

    def check(self, step: int) -> bool:
        """Whether every process stops after `step` (call it on every process, every step)."""
        if jax.process_count() == 1:
            return self.requested
        return step % self.sync_every == 0 and sharding.any_process(self.requested)

    def _handle(self, signum, frame):
        # In the main thread, when it can run: the flag at once. Messages, counting and exits are
        # the watch thread's, which sees every SIGTERM, also those this handler never runs for.
        self.requested = True

    def _count_signals(self):
        received = 0
        while True:
            try:
                data = self._reader.recv(64)
            except OSError:
                data = b""
            if not data:  # restore() closed the socket
                self._reader.close()
                return
            for _ in range(data.count(bytes([signal.SIGTERM]))):  # other signals' numbers come here too
                received += 1
                if received > 1:
                    _hard_exit("A second SIGTERM: exiting now, without saving.")
                self.requested = True
                print("\nSIGTERM received: saving a checkpoint and exiting (a second SIGTERM exits at once, "
                      "unsaved).", file=sys.stderr, flush=True)
                threading.Thread(target=self._watchdog, daemon=True, name="sigterm-watchdog").start()

    def _watchdog(self):
        """Exit (143, unsaved) when the loop makes no progress after SIGTERM (see the class docstring)."""
        signalled = time.monotonic()
        while not self._closed:
            time.sleep(0.1)
            idle = time.monotonic() - max(signalled, self._progress)
            if self._waiting and idle > DATA_WAIT_GRACE_S and not self._closed:
                _hard_exit(f"SIGTERM: no batch came in {DATA_WAIT_GRACE_S}s (does the data filter out every "
                           "record?); exiting without saving.")
            if idle > STALL_TIMEOUT_S and not self._closed:
                _hard_exit(f"SIGTERM: no step, evaluation or save finished in {STALL_TIMEOUT_S}s (a collective "
                           "waiting for a process that is gone?); exiting without saving.")

    def restore(self):
        self._closed = True
        StopSignal.live -= 1
        signal.set_wakeup_fd(self._previous_wakeup)
        signal.signal(signal.SIGTERM, self._previous)
        self._writer.close()  # the watch thread reads the end of the stream and stops


def _forget_wakeup_fd_in_child():
    """A forked child (a data worker) inherits the socket: its own SIGTERMs must not count as the parent's."""
    if StopSignal.live:
        with contextlib.suppress(ValueError):  # forked from another thread than the main one
            signal.set_wakeup_fd(-1)


os.register_at_fork(after_in_child=_forget_wakeup_fd_in_child)


def _hard_exit(message: str) -> None:
    print(f"\n{message}", file=sys.stderr, flush=True)
    os._exit(128 + signal.SIGTERM)


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


def _write(writer: metrics_lib.MetricsWriter, step: int, values: Mapping[str, Any]) -> None:
    """Numbers to metrics.jsonl and TensorBoard; strings (e.g. sampled answers) to TensorBoard's text tab."""
    for k, v in values.items():
        if isinstance(v, str):
            writer.write_text(step, k, v)
    writer.write(step, {k: v for k, v in values.items() if not isinstance(v, str)})


def _restore_or_init(ckpt: checkpoint.Checkpointer, abstract_state, batches, init_state) -> tuple[int, Any]:
    restored = ckpt.restore_latest(abstract_state, data_iterator=batches) if ckpt.latest_step() is not None else None
    if restored is None:
        return 0, init_state()
    step, state, _ = restored
    print(f"Resuming from step {step} ({ckpt.directory})", flush=True)
    if not ckpt.data_state_restored:  # Written by another number of processes (checkpoint.py).
        print(f"Data: replaying {step} batches to this process layout's position", flush=True)
        for _ in range(step):
            next(batches)
    return step, state


def _truncate_step_files(paths: Sequence[str], step: int) -> None:
    """Drop lines past `step` (written after the restored checkpoint, and about to be written again)."""
    if jax.process_index() != 0:
        return
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            kept = [line for line in f if line.strip() and _step_of(line) <= step]
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:  # A line cut short by a crash.
        return float("inf")


def sum_batches(eval_fn: Callable[[Any], Any], batches: Iterator, *, empty: Callable[[], Any],
                place: Callable[[Any], Any] = lambda batch: batch, max_batches: int = 0) -> dict[str, float]:
    """Sum `eval_fn(place(batch))` (a dict or tuple of sums) over batches, on every process.

    Processes' data shards may end after different numbers of batches, and `eval_fn` is a
    collective, so the processes agree before each batch whether any still has one; a process
    that is done feeds `empty()` (a batch that counts nowhere: zero weights or masks) meanwhile.
    Returns the sums as floats (a tuple's entries keyed "0", "1", ...).
    """
    totals: dict[str, float] = {}
    count = 0
    while not max_batches or count < max_batches:
        batch = next(batches, None)
        if not sharding.any_process(batch is not None):
            break
        sums = jax.device_get(eval_fn(place(empty() if batch is None else batch)))
        items = sums.items() if isinstance(sums, Mapping) else ((str(i), s) for i, s in enumerate(sums))
        for k, v in items:
            totals[k] = totals.get(k, 0.0) + float(v)
        count += 1
    return totals
