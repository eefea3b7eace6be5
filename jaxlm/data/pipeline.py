"""grain pipelines that turn documents into packed language-modelling batches.

    DocumentSource ─[process_index::process_count]─ shuffle(seed) ─ repeat(num_epochs)
      ─ map(tokenize: [BOS] + encode(text) + [EOS]) ─ to_iter_dataset ─ (mp_prefetch)
      ─ split long documents ─ first-fit packing ─ batch (+ padding rows) ─▶ numpy batches

A batch is a dict of `[batch_size, seq_len]` int32 arrays: `tokens`, `positions`, `segment_ids`,
`loss_mask` (see `packing.py`). The loss convention, shared with the training step:
`loss_mask[b, t] = 1` means tokens[b, t] is a target, predicted from the tokens before it in its
segment. It is 1 on every real token except each segment's first (a BOS, or the first token of a
continuation chunk of a document longer than seq_len) and 0 on padding.

Determinism and resumption: everything before packing is index-based (grain `MapDataset`), so the
iterator state is a few integers; `it.get_state()` is a JSON-serialisable dict and
`it.set_state(state)` resumes at exactly the next batch. Store it in the checkpoint.

Sharding: process `i` of `n` reads records `i, i+n, i+2n, ...` of the source (in the source's file
order, before shuffling), so shards are disjoint and together cover every record. `batch_size`
is per process.

Epochs: each epoch is shuffled differently (grain folds the epoch into the seed). Packing runs
across epoch boundaries, so one row may hold the end of one epoch and the start of the next.

Evaluation: `make_lm_iterator(..., shuffle=False, num_epochs=1)` reads every record once, in
order, and stops; its last batch is completed with padding rows (segment 0, loss_mask 0) instead
of being dropped, so held-out loss covers every token. Processes may produce different numbers of
eval batches: on several hosts, agree on a count (e.g. the minimum) before running collectives.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

from absl import flags
import grain
import numpy as np

from jaxlm.data import packing
from jaxlm.data.sources import DocumentSource
from jaxlm.data.tokenizer import Tokenizer


class TokenizeDocument(grain.transforms.Map):
    """text -> {tokens: [BOS] + encode(text) + [EOS], loss_mask: 0 on BOS, 1 elsewhere} (int32)."""

    def __init__(self, tokenizer: Tokenizer):
        if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
            raise ValueError(f"{tokenizer} has no BOS or EOS piece; LM packing needs both")
        self.tokenizer = tokenizer

    def map(self, text: str) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode(text)
        tokens = np.empty(len(ids) + 2, np.int32)
        tokens[0], tokens[1:-1], tokens[-1] = self.tokenizer.bos_id, ids, self.tokenizer.eos_id
        loss_mask = np.ones_like(tokens)
        loss_mask[0] = 0
        return {"tokens": tokens, "loss_mask": loss_mask}


def lm_dataset(
    source: DocumentSource,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_packing_bins: int | None = None,
    worker_count: int = 0,
    read_threads: int = 2,
) -> grain.IterDataset:
    """The pipeline as a grain `IterDataset` (see the module docstring); iterate it for batches.

    `num_packing_bins` (rows filled at once) defaults to `max(batch_size, 32)`: more bins pack
    tighter (at seq_len=128 on short documents, 32 bins left ~5% padding where 4 left ~10%).
    `read_threads` threads read and tokenize ahead of packing; `worker_count > 0` moves reading and
    tokenizing into that many processes (same batches; the state then holds one entry per worker,
    so resume with the same `worker_count`).
    """
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len=}, {batch_size=}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
    pad_id = max(tokenizer.pad_id, 0)

    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"process {process_index} of {process_count} gets no records: the source "
                         f"has only {len(source)}")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map(TokenizeDocument(tokenizer))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64))
    if worker_count > 0:
        # grain's mp_prefetch reads absl flags and raises if they are unparsed (not an absl binary).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    bins = num_packing_bins or max(batch_size, 32)
    rows = packing.pack(it, seq_len=seq_len, num_packing_bins=bins, pad_id=pad_id, seed=seed,
                        shuffle_bins=shuffle)
    return rows.batch(batch_size, batch_fn=functools.partial(
        packing.pad_batch, batch_size=batch_size, pad_id=pad_id))


def make_lm_iterator(
    sources: DocumentSource | str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    text_field: str = "text",
    skip_bad_records: bool = False,
    txt_mode: str = "paragraphs",
    num_packing_bins: int | None = None,
    worker_count: int = 0,
) -> grain.DatasetIterator:
    """An iterator of packed LM batches with `get_state()`/`set_state()` for exact resumption.

    `sources` is a `DocumentSource` or the globs to build one from (with `text_field`,
    `skip_bad_records`, `txt_mode`). Build the source yourself to read its skip counts
    (`source.skipped`); they are also logged as a warning.
    """
    if not isinstance(sources, DocumentSource):
        sources = DocumentSource(sources, text_field=text_field, skip_bad_records=skip_bad_records,
                                 txt_mode=txt_mode)
    return iter(lm_dataset(
        sources, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed, shuffle=shuffle,
        num_epochs=num_epochs, process_index=process_index, process_count=process_count,
        num_packing_bins=num_packing_bins, worker_count=worker_count))
