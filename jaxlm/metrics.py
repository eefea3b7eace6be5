"""Run outputs a person reads: metrics.jsonl, TensorBoard events and a progress bar.

Only process 0 writes. On resume, metrics.jsonl lines past the restored step (written before a
crash, then recomputed) are dropped, so the file always describes one consistent run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
import tqdm


def _to_python(value: Any):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without importing torch.

    tensorboardX imports torch whenever it is installed (only to accept torch tensors, which we never
    log), which costs 3-13 s at every start of every binary on a machine with torch (the test
    extra, most users'). A `None` in sys.modules makes that `import torch` raise ImportError, which
    tensorboardX handles; the entry is removed at once, so torch imports normally afterwards. Where
    torch is already imported nothing is hidden."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    def __init__(self, workdir: str, *, resume_step: int | None = None, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._truncate_after(resume_step or 0)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))

    def _truncate_after(self, step: int):
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # A line cut short by a crash.
                continue
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]):
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def write_text(self, step: int, tag: str, text: str):
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self):
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir_or_file: str) -> list[dict]:
    path = workdir_or_file if workdir_or_file.endswith(".jsonl") else os.path.join(workdir_or_file, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A tqdm bar over training steps with ETA, showing the latest metrics; silent off process 0."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train"):
        self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                              disable=jax.process_index() != 0, mininterval=1.0, smoothing=0.1)

    def update(self, n: int = 1, **postfix):
        if postfix:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                  refresh=False)
        self._bar.update(n)

    def close(self):
        self._bar.close()


class Throughput:
    """Tokens per second between two log points (wall clock, device work included via the fetch)."""

    def __init__(self):
        self._t, self._tokens = time.perf_counter(), 0.0

    def add(self, tokens: float):
        self._tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self._tokens / max(now - self._t, 1e-9)
        self._t, self._tokens = now, 0.0
        return rate
