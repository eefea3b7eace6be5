"""Preference pairs from JSONL, as right-padded batches for reward models and DPO.

Records follow TRL's convention: `{"prompt", "chosen", "rejected"}` plus an optional `label`,
the probability that `chosen` is preferred (soft labels from AI feedback; absent = 1.0). The
prompt is a string or a message list ending with a user turn; `chosen` and `rejected` are
strings (one assistant turn) or message lists continuing the conversation and ending with an
assistant turn. Each side is encoded with the chat template as prompt + response
(`jaxlm.data.chat.encode_continuation`), one sequence per row, padded on the right:

    chosen_tokens, chosen_positions, chosen_segment_ids, chosen_loss_mask      [B, T] int32
    rejected_tokens, rejected_positions, rejected_segment_ids, rejected_loss_mask
    label   [B] float32   P(chosen preferred); 1.0 when the record has none
    weight  [B] float32   1 for a real pair, 0 for a padding row that completes the last batch

`*_loss_mask` covers the side's own assistant tokens and their EOS, never the prompt's (earlier
assistant turns of a multi-turn prompt are context), which is what DPO sums log-probs over; a reward model reads its score at the last real token (the closing EOS), so
right padding never changes a score. Segment ids are 1 on real tokens and 0 on padding.

Bad records fail at start-up with their file and line (`DocumentSource` parses every record
while indexing): empty prompt, chosen or rejected, chosen identical to rejected, a label
outside [0, 1], or a side longer than `seq_len` (unless `too_long` is 'skip' or 'truncate').
Truncation cuts the shared prompt from its left (after BOS), the same tokens from both sides,
so the end of the prompt and both whole responses are kept and the score is still read at the
closing EOS; a pair whose responses do not fit even after the whole prompt but its last token
is dropped. Cutting the end instead would cut the responses away (two identical sequences with
no targets: ln 2 of loss and a wrong answer in accuracy). Both counts are in `report()`.

Left out: TRL's implicit-prompt form (full conversations in chosen/rejected with the prompt
as their common prefix), per-pair margins from rating gaps, and packing (pairs of short
sequences would pack, but the reward is read per row, and DPO needs both sides aligned).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxlm.data import chat
from jaxlm.data.sft import check_too_long_policy
from jaxlm.data.sources import DocumentSource

SIDES = ("chosen", "rejected")
SIDE_FEATURES = ("tokens", "positions", "segment_ids", "loss_mask")


def _continuation(value: Any, field: str) -> list[dict]:
    """A response string as one assistant message; a message list as it is."""
    if isinstance(value, str):
        chat._check_content(value, field)
        return [{"role": chat.ASSISTANT, "content": value}]
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{field} is an empty list")
        return value
    raise TypeError(f"field {field!r} is {type(value).__name__}, expected a string or a list of messages")


class PreferenceParser:
    """JSON object -> {chosen_tokens, chosen_loss_mask, rejected_..., label}, or None if skipped.

    `num_too_long` counts the records with a side over `max_len`: skipped, or with 'truncate'
    `num_truncated` (prompt cut from the left) plus `num_dropped` (did not fit even so).
    `float_fields` are numeric fields copied as float32 (e.g. a precomputed reference's
    log-probs, `jaxlm.steps.dpo.REF_KEYS`); each must be a finite number.
    """

    def __init__(self, tokenizer, *, max_len: int, too_long: str = "error", prompt_field: str = "prompt",
                 chosen_field: str = "chosen", rejected_field: str = "rejected", label_field: str = "label",
                 float_fields: Sequence[str] = ()):
        check_too_long_policy(too_long)
        self.tokenizer, self.max_len, self.too_long = tokenizer, max_len, too_long
        self.fields = {"prompt": prompt_field, "chosen": chosen_field, "rejected": rejected_field}
        self.label_field = label_field
        self.float_fields = tuple(float_fields)
        self.num_too_long = self.num_truncated = self.num_dropped = 0

    def _label(self, obj: dict) -> float:
        if self.label_field not in obj or obj[self.label_field] is None:
            return 1.0
        label = obj[self.label_field]
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0.0 <= label <= 1.0 \
                or math.isnan(label):
            raise ValueError(f"field {self.label_field!r} must be a probability in [0, 1], got {label!r}")
        return float(label)

    def encode(self, obj: dict) -> dict[str, Any]:
        for key, field in self.fields.items():
            if field not in obj:
                raise KeyError(f"missing field {field!r}")
        prompt = chat.to_messages(obj[self.fields["prompt"]])
        if prompt[-1]["role"] != chat.USER:
            raise ValueError("the prompt must end with a user message")
        sides = {side: _continuation(obj[self.fields[side]], self.fields[side]) for side in SIDES}
        if sides["chosen"] == sides["rejected"]:
            raise ValueError("chosen and rejected are identical")
        out = {"label": self._label(obj)}
        for side in SIDES:
            tokens, loss_mask = chat.encode_continuation(self.tokenizer, prompt, sides[side])
            out[f"{side}_tokens"], out[f"{side}_loss_mask"] = tokens, loss_mask
        return out

    def __call__(self, obj: dict) -> dict[str, Any] | None:
        record = self.encode(obj)
        longest = max(len(record[f"{side}_tokens"]) for side in SIDES)
        if longest > self.max_len:
            if self.too_long == "error":
                raise ValueError(f"a side of {longest} tokens is longer than seq_len={self.max_len}; "
                                 "raise seq_len, or set too_long='skip' or 'truncate'")
            self.num_too_long += 1
            if self.too_long == "skip":
                return None
            record = self._truncate_prompt(record, longest - self.max_len)
            if record is None:
                self.num_dropped += 1
                return None
            self.num_truncated += 1
        out = {"label": np.float32(record["label"])}
        for side in SIDES:
            for key in ("tokens", "loss_mask"):
                out[f"{side}_{key}"] = np.asarray(record[f"{side}_{key}"], np.int32)
        for key in self.float_fields:
            value = obj.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"field {key!r} must be a finite number, got {value!r}")
            out[key] = np.float32(value)
        return out


    def _truncate_prompt(self, record: dict, excess: int) -> dict | None:
        """Both sides with `excess` prompt tokens cut after BOS, or None if the prompt is too short.

        The prompt is where each side's loss mask first turns on (a side starts with an
        assistant turn); the prompt's last token (the generation marker) is always kept.
        """
        tokens = record["chosen_tokens"]
        start = 1 if tokens and tokens[0] == self.tokenizer.bos_id else 0
        prompt_len = min(record[f"{side}_loss_mask"].index(1) for side in SIDES)
        if excess > prompt_len - start - 1:
            return None
        out = dict(record)
        for side in SIDES:
            for key in ("tokens", "loss_mask"):
                seq = record[f"{side}_{key}"]
                out[f"{side}_{key}"] = seq[:start] + seq[start + excess:]
        return out


class PreferencePairs(DocumentSource):
    """Tokenized preference pairs (a grain random-access source); `src[i]` is a dict or None.

    `num_too_long`: pairs skipped or truncated by the `too_long` policy (with 'truncate':
    `num_truncated` kept with a shorter prompt, `num_dropped` that did not fit even so);
    `num_skipped`: bad records dropped with `skip_bad_records=True`.
    """

    def __init__(self, patterns: str | os.PathLike | Sequence[str | os.PathLike], tokenizer, *, seq_len: int,
                 too_long: str = "error", skip_bad_records: bool = False, prompt_field: str = "prompt",
                 chosen_field: str = "chosen", rejected_field: str = "rejected", label_field: str = "label",
                 float_fields: Sequence[str] = ()):
        parser = PreferenceParser(tokenizer, max_len=seq_len, too_long=too_long, prompt_field=prompt_field,
                                  chosen_field=chosen_field, rejected_field=rejected_field, label_field=label_field,
                                  float_fields=float_fields)
        self.float_fields = parser.float_fields
        super().__init__(patterns, parse=parser, skip_bad_records=skip_bad_records)
        self.too_long = too_long
        # Counted while indexing: once per record.
        self.num_too_long, self.num_truncated, self.num_dropped = (parser.num_too_long, parser.num_truncated,
                                                                   parser.num_dropped)

    def report(self) -> str:
        parts = []
        if self.num_skipped:
            parts.append(f"skipped {self.num_skipped} bad records {self.skipped}")
        if self.num_too_long and self.too_long == "skip":
            parts.append(f"skipped {self.num_too_long} pairs longer than seq_len")
        if self.num_truncated:
            parts.append(f"truncated the prompt (from the left) of {self.num_truncated} pairs longer than seq_len")
        if self.num_dropped:
            parts.append(f"dropped {self.num_dropped} pairs whose responses do not fit seq_len even with the prompt "
                         "cut to its last token")
        return "; ".join(parts)


def _is_kept(record) -> bool:
    return record is not None


def pad_side(tokens: np.ndarray, loss_mask: np.ndarray, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One right-padded row {tokens, positions, segment_ids, loss_mask} of length seq_len."""
    n = len(tokens)
    real = np.arange(seq_len) < n
    out_tokens = np.full(seq_len, pad_id, np.int32)
    out_tokens[:n] = tokens
    out_mask = np.zeros(seq_len, np.int32)
    out_mask[:n] = loss_mask
    return {"tokens": out_tokens, "positions": np.where(real, np.arange(seq_len), 0).astype(np.int32),
            "segment_ids": real.astype(np.int32), "loss_mask": out_mask}


class PadPair(grain.transforms.Map):
    """A parsed pair -> one padded row per side, flattened into `{side}_{feature}` keys (and its
    `float_fields`)."""

    def __init__(self, seq_len: int, pad_id: int, float_fields: Sequence[str] = ()):
        self.seq_len, self.pad_id, self.float_fields = seq_len, pad_id, tuple(float_fields)

    def map(self, record):
        out = {"label": np.float32(record["label"]), "weight": np.float32(1.0),
               **{k: np.float32(record[k]) for k in self.float_fields}}
        for side in SIDES:
            row = pad_side(record[f"{side}_tokens"], record[f"{side}_loss_mask"], self.seq_len, self.pad_id)
            out.update({f"{side}_{k}": v for k, v in row.items()})
        return out


def pad_pair_batch(rows: Sequence[dict], *, batch_size: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Stack rows into a batch of `batch_size`; missing rows are all padding with weight 0."""
    if not 0 < len(rows) <= batch_size:
        raise ValueError(f"cannot make a batch of {batch_size} from {len(rows)} rows")
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    missing = batch_size - len(rows)
    if missing:
        for k, v in batch.items():
            fill = pad_id if k.endswith("_tokens") else (1.0 if k == "label" else 0)
            batch[k] = np.concatenate([v, np.full((missing, *v.shape[1:]), fill, v.dtype)])
    return batch


def empty_pair_batch(batch_size: int, seq_len: int, pad_id: int = 0, extra_keys: Sequence[str] = ()
                     ) -> dict[str, np.ndarray]:
    """A batch of padding pairs only (weight 0, as `pad_pair_batch` fills): what a process whose
    shard has ended feeds a collective eval step. `extra_keys` are float32 zeros (e.g. a
    precomputed reference's log-probs)."""
    row = {"label": np.float32(1.0), "weight": np.float32(0.0), **{k: np.float32(0.0) for k in extra_keys}}
    for side in SIDES:
        row.update({f"{side}_{k}": v for k, v in pad_side(np.zeros(0, np.int32), np.zeros(0, np.int32), seq_len,
                                                             pad_id).items()})
    return {k: np.stack([v] * batch_size) for k, v in row.items()}


def preference_dataset(pairs: PreferencePairs, *, seq_len: int, batch_size: int, seed: int, shuffle: bool = True,
                       num_epochs: int | None = None, pad_id: int = 0, process_index: int = 0,
                       process_count: int = 1, read_threads: int = 2) -> grain.IterDataset:
    """Batches of preference pairs (module docstring); `batch_size` is per process.

    Evaluation: `shuffle=False, num_epochs=1`; the last batch is completed with weight-0 rows.
    The pairs' `float_fields` travel with them (e.g. precomputed reference log-probs).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    ds = grain.MapDataset.source(pairs)[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"process {process_index} of {process_count} gets no records: the source has only "
                         f"{len(pairs)}")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).filter(_is_kept).map(PadPair(seq_len, pad_id, getattr(pairs, "float_fields", ())))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64))
    return it.batch(batch_size, batch_fn=functools.partial(pad_pair_batch, batch_size=batch_size, pad_id=pad_id))


def make_preference_iterator(pairs: PreferencePairs, **kwargs) -> grain.DatasetIterator:
    """`iter(preference_dataset(...))`, with `get_state()`/`set_state()` for exact resumption."""
    return iter(preference_dataset(pairs, **kwargs))


def side_batch(batch: dict, side: str) -> dict:
    """The `{tokens, positions, segment_ids, loss_mask}` of one side of a preference batch."""
    return {k: batch[f"{side}_{k}"] for k in SIDE_FEATURES}
