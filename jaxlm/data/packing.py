"""Packing variable-length token sequences into fixed-shape rows, as grain transformations.

An example is `{"tokens": int32[n], "loss_mask": int32[n]}`. Packing turns a stream of them into
rows of exactly `seq_len` tokens:

    tokens      [T] int32   the examples' tokens, one after another, then pad_id
    positions   [T] int32   0, 1, 2, ... restarting at each example
    segment_ids [T] int32   1, 2, 3, ... per example within the row; 0 = padding
    loss_mask   [T] int32   1 where tokens[t] is a target (predicted from the tokens before it
                            in its segment); always 0 on padding and on a segment's first token

Examples longer than `seq_len` are first split into chunks of at most `seq_len` (`SplitLong`); a
chunk is its own segment, its positions restart, and its first token is not a target (nothing in
its segment precedes it). Examples are never split otherwise: they go whole into the first row
with room (grain's `FirstFitPackIterDataset`), so no document loses its start to a row boundary.

Left out: best-fit packing (grain has `BestFitPackIterDataset`; first fit keeps the example order
closer to the shuffle), concat-then-split packing (no padding, but splits every document).
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

FEATURES = ("tokens", "positions", "segment_ids", "loss_mask")


class SplitLong(grain.experimental.FlatMapTransform):
    """Splits an example into chunks of at most `seq_len`; no chunk's first token is a target."""

    max_fan_out = 1 << 20  # read by MapDataset flat maps only; pack() uses the IterDataset one

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, example):
        tokens, loss_mask = example["tokens"], example["loss_mask"]
        chunks = []
        for start in range(0, len(tokens), self.seq_len):
            mask = loss_mask[start:start + self.seq_len].copy()
            mask[0] = 0
            chunks.append({"tokens": tokens[start:start + self.seq_len], "loss_mask": mask})
        return chunks


def _rename(row):
    """grain's packer names the aux features `tokens_segment_ids`/`tokens_positions`."""
    return {
        "tokens": row["tokens"],
        "positions": row["tokens_positions"],
        "segment_ids": row["tokens_segment_ids"],
        "loss_mask": row["loss_mask"],
    }


def pack(
    examples: grain.IterDataset,
    *,
    seq_len: int,
    num_packing_bins: int,
    pad_id: int = 0,
    seed: int = 0,
    shuffle_bins: bool = False,
) -> grain.IterDataset:
    """Rows `{tokens, positions, segment_ids, loss_mask}` (each `[seq_len]` int32) from examples.

    `num_packing_bins` rows are filled at a time; more bins pack tighter (less padding) but hold
    more examples in memory and move examples further from their shuffled order.
    """
    examples = grain.experimental.FlatMapIterDataset(examples, SplitLong(seq_len))
    rows = grain.experimental.FirstFitPackIterDataset(
        examples,
        length_struct={"tokens": seq_len, "loss_mask": seq_len},
        num_packing_bins=num_packing_bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
        meta_features=("loss_mask",),  # packed and padded, without its own segment ids/positions
        padding_struct={"tokens": pad_id, "loss_mask": 0},
    )
    return rows.map(_rename)


def pad_batch(rows: Sequence[dict], *, batch_size: int, pad_id: int = 0) -> dict:
    """Stacks rows into `[batch_size, T]`; missing rows are all padding (segment 0, no targets).

    Used as `batch_fn`, so a final partial batch is padded, not dropped: held-out loss covers
    every token and every batch has the one compiled shape.
    """
    if not 0 < len(rows) <= batch_size:
        raise ValueError(f"cannot make a batch of {batch_size} from {len(rows)} rows")
    batch = {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in FEATURES}
    missing = batch_size - len(rows)
    if missing:
        for k, v in batch.items():
            fill = pad_id if k == "tokens" else 0
            batch[k] = np.concatenate([v, np.full((missing, v.shape[1]), fill, np.int32)])
    return batch
