"""Command-line plumbing of the experiment binaries: the entry point, multi-process start, the workdir
(a lock, the rerun check), config checks, mesh.

`run(main)` is every binary's `app.run`: bad input (a DataError naming file:line, a config error,
another run in the workdir) reaches the user as its message alone, with exit status 1; any
`--verbosity` flag shows the traceback as well. `start(cfg, workdir, stage)`, before anything is
written:
- checks the shared config blocks (optimizer, cadence, sizes): a negative learning rate or zero
  steps is an error, a warm-up longer than the run a warning;
- locks the workdir, every process its own lock file (WORKDIR/.lock for process 0, .lock.I for
  process I), and the processes agree: a second run on the same workdir stops on every process,
  naming the first one's pid, also when the two runs have different numbers of processes;
- compares the command with the run already in the workdir (its newest checkpoint's meta): the
  stage, the runs it starts from (`init_from`, `policy_from`, ...) and, for a fresh model, the
  model's shape and tokenizer flags must be the same, else it stops, saying what differs, with
  nothing touched; `--overwrite` moves the old run aside (DIR.replaced-TIME) and starts anew in DIR.
config.json is written by the loop once the run has started (`jaxlm.loop.write_config`), so a
command that fails before leaves a run's files as they were.

What every training binary shares beyond this (the loop, SIGTERM, the NaN guard) is the library's
`jaxlm.loop`; shared preparation of data and models is `experiments/common.py`.
"""

from __future__ import annotations

import ast
import fcntl
import os
import sys
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from jaxlm import checkpoint, sharding

_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Move the run already in --workdir aside (to WORKDIR.replaced-"
                               "TIME, nothing is deleted) and start a new one there.")

LOCK_FILE = ".lock"  # process 0's; process I of a multi-process run holds LOCK_FILE.I
# Runs a stage starts from: a rerun must name the same ones (dotted: a field of a block).
SOURCE_FIELDS = ("init_from", "policy_from", "reward_from", "reference_from", "feedback_from", "reward_model.path")
# Model fields that change how it computes, not what it is: a rerun may change them.
COMPUTE_FIELDS = ("dtype", "remat", "scan_unroll", "attention_impl", "logits_chunk", "attention_chunk")


class ConfigError(ValueError):
    """A command-line config the binary cannot run (names the flag)."""


class WorkdirBusy(RuntimeError):
    """Another process holds the workdir's lock."""


# What reaches the user as a message alone (tracebacks with --verbosity): bad data, bad flags,
# missing files, another run in the workdir. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, NotImplementedError, WorkdirBusy)


def run(main: Callable) -> None:
    """`app.run(main)`, with bad input and bad flags printed as one message and exit status 1."""
    try:
        app.run(main, flags_parser=_parse_flags)
    except USER_ERRORS as e:
        if _traceback_wanted():
            raise
        print(f"ERROR: {_message(e)}", file=sys.stderr, flush=True)
        sys.exit(1)


def _parse_flags(argv: list[str]):
    """absl's parser; a `--config.x.y=v` override naming no field (ml_collections raises
    AttributeError or KeyError) becomes a ConfigError naming the flag."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, TypeError) as e:
        raise ConfigError(override_error(e, argv)) from None


def override_error(e: Exception, argv: list[str]) -> str:
    """The message for a `--config.x.y=v` override that ml_collections refused, naming the flag."""
    text = str(e.args[0]) if e.args else str(e)
    try:
        text = str(ast.literal_eval(text))  # ml_collections wraps the KeyError's repr
    except (ValueError, SyntaxError):
        pass
    text = " ".join(text.split())
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    named = [a for a in overrides if repr(a.split("=", 1)[0].rsplit(".", 1)[-1]) in text] or overrides
    return f"{named[0] + ': ' if named else ''}no such config field, or a value of the wrong type ({text})"


def exit_on_config_error(e: Exception) -> None:
    """For an override refused while `--config` is being defined (ml_collections applies them to the
    default config at import time, before `run`): the message alone, exit status 1."""
    if _traceback_wanted():
        raise e
    print(f"ERROR: {override_error(e, sys.argv)}", file=sys.stderr, flush=True)
    sys.exit(1)


def flag_error(e: Exception, flag: str, value: str) -> Exception:
    """`e` (a ValueError or FileNotFoundError about the path `value`) as the same kind of error, its
    message beginning with the flag that gave the path: `--flag=value...`."""
    text = str(e)
    text = f"--{flag}={text}" if text.startswith(value) else f"--{flag}={value}: {text}"
    return (FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError)(text)


def _traceback_wanted() -> bool:
    try:
        if flags.FLAGS["verbosity"].present:
            return True
    except Exception:  # flags not parsed
        pass
    return any(a.startswith(("--verbosity", "-v=", "--v=")) or a == "-v" for a in sys.argv[1:])


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return str(e) or type(e).__name__


def start(cfg: ml_collections.ConfigDict, workdir: str, stage: str) -> str:
    """Check the config, initialise multi-process JAX if asked, create and lock the workdir, and stop
    if it holds another run (see the module docstring). Returns the workdir, absolute."""
    if not flags.FLAGS["verbosity"].present:  # orbax and grain log every save at INFO.
        logging.set_verbosity(logging.WARNING)
    validate(cfg)
    dist = cfg.get("distributed", ml_collections.ConfigDict())
    if sharding.maybe_initialize_distributed(dist.get("coordinator_address", ""), dist.get("num_processes", 0),
                                             dist.get("process_id", -1)):
        print(f"Process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local "
              f"{jax.default_backend()} devices, {jax.device_count()} in all", flush=True)
    workdir = os.path.abspath(workdir)
    lock_every_process(workdir)
    found = checkpoint.newest_meta(os.path.join(workdir, "checkpoints"))
    # any_process: every process has looked before process 0 moves the run away.
    if flags.FLAGS["overwrite"].value and sharding.any_process(found is not None):
        if jax.process_index() == 0:
            moved = move_aside(workdir)
            print(f"--overwrite: the run that was in {workdir} is now in {moved}; starting a new one", flush=True)
        sharding.barrier("overwrite")
        if jax.process_index() != 0:  # its lock file moved with the old run: take one in the new WORKDIR
            os.close(_LOCKS.pop(workdir))
            lock_workdir(workdir)
    elif found is not None:
        differences = rerun_differences(stage, cfg.to_dict(), found[1])
        if differences:
            raise checkpoint.RunMismatch(
                f"{workdir} holds a {found[1].get('stage', '?')} run (checkpoint {found[0]}) made with other settings "
                "than this command:\n  " + "\n  ".join(differences) + "\nNothing was changed. To start a new run, use "
                f"another --workdir, or add --overwrite to move this one aside (to {workdir}.replaced-TIME) and "
                f"start again in {workdir}.")
    return workdir


_LOCKS: dict[str, int] = {}  # workdir -> the open lock file, held until the process ends


def lock_workdir(workdir: str, process: int | None = None) -> None:
    """Hold an exclusive lock on WORKDIR/.lock (process 0; WORKDIR/.lock.I for process I) for the life
    of this process (released by the OS even after SIGKILL); if another process holds it, raise
    WorkdirBusy naming that one's pid."""
    holder = _try_lock(workdir, jax.process_index() if process is None else process)
    if holder is not None:
        raise WorkdirBusy(_busy_message(workdir, holder))


def _try_lock(workdir: str, process: int) -> str | None:
    """Lock this process's lock file of WORKDIR; None when done, else what the holder wrote ("PID TIME")."""
    path = os.path.join(workdir, LOCK_FILE if process == 0 else f"{LOCK_FILE}.{process}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        return holder
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _LOCKS[workdir] = fd
    return None


def _busy_message(workdir: str, holder: str) -> str:
    pid, _, since = holder.partition(" ")
    since = f", since {since}" if since else ""
    return (f"{workdir} is in use by another run (pid {pid or 'unknown'}{since}); wait for it to end, or use another "
            "--workdir")


def lock_every_process(workdir: str) -> None:
    """Create WORKDIR and lock it on every process (`lock_workdir`). With several processes they then
    agree (a collective), so all of them stop when any finds its lock held, rather than the others
    waiting in a collective for the ones that stopped; the message names the holder's pid."""
    os.makedirs(workdir, exist_ok=True)
    holder = _try_lock(workdir, jax.process_index())
    if jax.process_count() == 1:
        if holder is not None:
            raise WorkdirBusy(_busy_message(workdir, holder))
        return
    pid = int(holder.split()[0]) if holder and holder.split()[0].isdigit() else (0 if holder is None else -1)
    pids = np.asarray(sharding.host_copy(np.asarray([pid], np.int64))).ravel()  # -1: held, pid unknown
    if pids.any():
        known = [int(p) for p in pids if p > 0]
        raise WorkdirBusy(f"{_busy_message(workdir, str(known[0]) if known else '')} (found by process(es) "
                          f"{[i for i, p in enumerate(pids) if p]} of this run)")


def move_aside(workdir: str) -> str:
    """Rename WORKDIR to WORKDIR.replaced-TIME (nothing is deleted), make WORKDIR anew and lock it."""
    target = f"{workdir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    while os.path.exists(target):
        target += "+"
    os.rename(workdir, target)
    old = _LOCKS.pop(workdir, None)
    os.makedirs(workdir)
    lock_workdir(workdir)
    if old is not None:
        os.close(old)
    return target


def rerun_differences(stage: str, config: dict, run_meta: dict) -> list[str]:
    """What makes this command another run than the one whose newest checkpoint meta is `run_meta`:
    the stage, the runs it starts from, and for a fresh model (no `init_from`) the model's shape
    fields and the tokenizer flags. Empty when the command resumes (or reruns) that run."""
    run_config = run_meta.get("config") or {}
    out = []
    if run_meta.get("stage") not in (None, stage):
        out.append(f"the stage: the run is {run_meta['stage']!r}, this command is {stage!r}")
    for key in SOURCE_FIELDS:
        old, new = _field(run_config, key), _field(config, key)
        if _same_path(old) != _same_path(new):
            out.append(f"--config.{key}: the run has {old!r}, this command {new!r}")
    for key in ("rank", "targets"):  # LoRA adapters' shapes
        old, new = (run_config.get("lora") or {}).get(key), (config.get("lora") or {}).get(key)
        if old is not None and new is not None and old != new:
            out.append(f"--config.lora.{key}: the run has {old!r}, this command {new!r}")
    if "init_from" in config and (config.get("init_from") or run_config.get("init_from")):
        return out  # the model and tokenizer come from init_from
    for key, new in sorted((config.get("model") or {}).items()):
        old = (run_config.get("model") or {}).get(key, new)
        if key not in COMPUTE_FIELDS and old != new:
            out.append(f"--config.model.{key}: the run has {old!r}, this command {new!r}")
    data, run_data = config.get("data") or {}, run_config.get("data") or {}
    if _same_path(run_data.get("tokenizer", "")) != _same_path(data.get("tokenizer", "")):
        out.append(f"--config.data.tokenizer: the run has {run_data.get('tokenizer')!r}, this command "
                   f"{data.get('tokenizer')!r}")
    elif not data.get("tokenizer") and run_data.get("tokenizer_vocab_size", data.get("tokenizer_vocab_size")) != \
            data.get("tokenizer_vocab_size"):
        out.append(f"--config.data.tokenizer_vocab_size: the run has {run_data.get('tokenizer_vocab_size')!r}, "
                   f"this command {data.get('tokenizer_vocab_size')!r}")
    return out


def _field(config: dict, dotted: str):
    """config["a"]["b"] for "a.b"; "" where the config has no such field."""
    for key in dotted.split("."):
        config = config.get(key, "") if isinstance(config, dict) else ""
    return config


def _same_path(path) -> str:
    if not path or not isinstance(path, str):
        return path or ""
    prefix = "hf:" if path.startswith("hf:") else ""
    return prefix + os.path.realpath(path[len(prefix):])


def validate(cfg: ml_collections.ConfigDict) -> None:
    """The shared blocks' values a run cannot use, named by flag (ConfigError); a warm-up longer than
    the run is a warning. Stage-specific fields are the binaries' to check."""
    def need(ok: bool, flag: str, value, what: str):
        if not ok:
            raise ConfigError(f"--config.{flag}={value}: {what}")

    for block in ("optim", "policy_optim", "critic_optim"):
        o = cfg.get(block)
        if o is None:
            continue
        need(o.learning_rate > 0, f"{block}.learning_rate", o.learning_rate, "must be > 0")
        need(o.get("warmup_steps", 0) >= 0, f"{block}.warmup_steps", o.get("warmup_steps"), "must be >= 0")
        need(0 <= o.get("min_learning_rate_ratio", 0) <= 1, f"{block}.min_learning_rate_ratio",
             o.get("min_learning_rate_ratio"), "must be in [0, 1]")
        for key in ("weight_decay", "grad_clip"):
            need(o.get(key, 0) >= 0, f"{block}.{key}", o.get(key), "must be >= 0")
        for key in ("b1", "b2"):
            need(0 <= o.get(key, 0) < 1, f"{block}.{key}", o.get(key), "must be in [0, 1)")
    t = cfg.get("train") or {}
    for key in ("steps", "iterations"):
        if key in t:
            need(t[key] >= 1, f"train.{key}", t[key], "must be >= 1")
    for key in ("log_every", "checkpoint_every", "eval_every", "eval_batches", "samples", "sample_every"):
        if key in t:
            need(t[key] >= 0, f"train.{key}", t[key], "must be >= 0 (0 = never, or all for eval_batches)")
    for key, low in (("keep_checkpoints", 1), ("grad_accum", 1), ("batch_size", 1), ("seq_len", 1)):
        if key in t:
            need(t[key] >= low, f"train.{key}", t[key], f"must be >= {low}")
    d = cfg.get("data") or {}
    for key in ("batch_size", "seq_len"):
        if key in d:
            need(d[key] >= 1, f"data.{key}", d[key], "must be >= 1")
    if "optim" in cfg and "steps" in t and cfg.optim.get("warmup_steps", 0) >= t["steps"]:
        print(f"WARNING: --config.optim.warmup_steps={cfg.optim.warmup_steps} is not shorter than "
              f"--config.train.steps={t['steps']}: the learning rate never reaches "
              f"--config.optim.learning_rate={cfg.optim.learning_rate}", flush=True)


def mesh_from_config(cfg: ml_collections.ConfigDict):
    """The mesh of `cfg.mesh`; every global batch in the config must split evenly over its batch axes."""
    m = cfg.mesh
    mesh = sharding.make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor)
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    for block, key in (("data", "batch_size"), ("train", "batch_size"), ("rollout", "batch_size"),
                       ("ppo", "minibatch_size")):
        value = (cfg.get(block) or {}).get(key)
        if isinstance(value, int) and value % split:
            raise ConfigError(f"--config.{block}.{key}={value} does not split over the {split} devices of the batch "
                              f"axes (mesh {sharding.describe(mesh)}); use a multiple of {split}, or change "
                              "--config.mesh.*")
    return mesh
