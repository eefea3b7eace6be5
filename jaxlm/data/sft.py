"""SFT data: chat examples from JSONL, tokenized with the chat template, in LM batches.

    JSONL {prompt, response} or {messages: [...]} ─ DocumentSource(parse=ChatExampleParser)
      ─[process_index::process_count]─ shuffle ─ repeat ─ drop skipped ─ first-fit packing
      (or one example per row) ─ batch ─▶ {tokens, positions, segment_ids, loss_mask} [B, T]

The batches have the pretraining contract (`jaxlm.data.packing`), so `jaxlm.steps.lm` trains
them unchanged; only the loss mask differs: 1 on assistant tokens and their closing EOS
(`jaxlm.data.chat`), never on the prompt or on padding. Packing keeps each example whole in
one row, as its own segment, so its mask is the same packed or not (tested).

Tokenizing happens inside the source's `parse`, so `DocumentSource` validates every record at
start-up and a bad one fails with its file and line: not JSON, missing fields, empty prompt or
response, unknown roles, or a sequence longer than `seq_len`. The last has a policy,
`too_long`: 'error' (default), 'skip' (the record is dropped) or 'truncate' (its first
`seq_len` tokens are kept: the end of the response and its EOS are lost). Skipped and truncated
records are counted exactly, because DocumentSource parses every record once while indexing.

Left out: splitting long conversations into several examples, prompt truncation from the left,
and per-turn loss weights.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import grain
import numpy as np

from jaxlm.data import chat, packing
from jaxlm.data.sources import DocumentSource

TOO_LONG_POLICIES = ("error", "skip", "truncate")


def check_too_long_policy(too_long: str) -> None:
    if too_long not in TOO_LONG_POLICIES:
        raise ValueError(f"too_long={too_long!r}; choose one of {TOO_LONG_POLICIES}")


class ChatExampleParser:
    """JSON object -> {tokens, loss_mask} (int32 arrays), or None when skipped as too long.

    Records are `{prompt_field: str, response_field: str}` or `{messages_field: [{role,
    content}, ...]}` (ending with an assistant turn). Every assistant turn of a conversation is
    learned, or with `last_turn_only` just the last one (the earlier turns are context, as in a
    preference pair's prompt; `chat.encode_continuation`). `num_too_long` counts the records over
    `max_len` seen by this parser (skipped or truncated). A class, so it pickles for grain.
    """

    def __init__(self, tokenizer, *, max_len: int, too_long: str = "error", prompt_field: str = "prompt",
                 response_field: str = "response", messages_field: str = "messages", last_turn_only: bool = False):
        check_too_long_policy(too_long)
        self.tokenizer, self.max_len, self.too_long = tokenizer, max_len, too_long
        self.last_turn_only = last_turn_only
        self.prompt_field, self.response_field, self.messages_field = prompt_field, response_field, messages_field
        self.num_too_long = 0

    def encode(self, obj: dict) -> tuple[list[int], list[int]]:
        if self.messages_field in obj:
            messages = obj[self.messages_field]
            if not isinstance(messages, list):
                raise TypeError(f"field {self.messages_field!r} is {type(messages).__name__}, expected a list")
            if self.last_turn_only and len(messages) > 1:
                return chat.encode_continuation(self.tokenizer, messages[:-1], messages[-1:])
            return chat.encode_example(self.tokenizer, messages)
        if self.prompt_field in obj or self.response_field in obj:
            for field in (self.prompt_field, self.response_field):
                if field not in obj:
                    raise KeyError(f"missing field {field!r}")
            return chat.encode_example(self.tokenizer, obj[self.prompt_field], obj[self.response_field])
        raise KeyError(f"expected a {self.messages_field!r} list or {self.prompt_field!r} and "
                       f"{self.response_field!r} fields")

    def __call__(self, obj: dict) -> dict[str, np.ndarray] | None:
        tokens, loss_mask = self.encode(obj)
        if len(tokens) > self.max_len:
            if self.too_long == "error":
                raise ValueError(f"conversation of {len(tokens)} tokens is longer than seq_len={self.max_len}; "
                                 "raise seq_len, or set too_long='skip' or 'truncate'")
            self.num_too_long += 1
            if self.too_long == "skip":
                return None
            tokens, loss_mask = tokens[:self.max_len], loss_mask[:self.max_len]
        return {"tokens": np.asarray(tokens, np.int32), "loss_mask": np.asarray(loss_mask, np.int32)}


class ChatExamples(DocumentSource):
    """Tokenized chat examples (a grain random-access source); `src[i]` is a dict or None (skipped).

    `num_too_long` is the number of records skipped or truncated by the `too_long` policy;
    `num_skipped`/`skipped` count bad records dropped with `skip_bad_records=True`.
    """

    def __init__(self, patterns: str | os.PathLike | Sequence[str | os.PathLike], tokenizer, *, seq_len: int,
                 too_long: str = "error", skip_bad_records: bool = False, prompt_field: str = "prompt",
                 response_field: str = "response", messages_field: str = "messages", last_turn_only: bool = False):
        parser = ChatExampleParser(tokenizer, max_len=seq_len, too_long=too_long, prompt_field=prompt_field,
                                   response_field=response_field, messages_field=messages_field,
                                   last_turn_only=last_turn_only)
        super().__init__(patterns, parse=parser, skip_bad_records=skip_bad_records)
        self.too_long = too_long
        self.num_too_long = parser.num_too_long  # counted while indexing: once per record

    def report(self) -> str:
        """One line for the log: what was skipped or truncated, or '' when nothing was."""
        parts = []
        if self.num_skipped:
            parts.append(f"skipped {self.num_skipped} bad records {self.skipped}")
        if self.num_too_long:
            verb = "skipped" if self.too_long == "skip" else "truncated"
            parts.append(f"{verb} {self.num_too_long} conversations longer than seq_len")
        return "; ".join(parts)


def _is_kept(example) -> bool:
    return example is not None


class PadExample(grain.transforms.Map):
    """One example per row: {tokens, positions, segment_ids, loss_mask} [seq_len], padded right."""

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len, self.pad_id = seq_len, pad_id

    def map(self, example):
        n = len(example["tokens"])
        real = np.arange(self.seq_len) < n
        tokens = np.full(self.seq_len, self.pad_id, np.int32)
        tokens[:n] = example["tokens"]
        loss_mask = np.zeros(self.seq_len, np.int32)
        loss_mask[:n] = example["loss_mask"]
        return {"tokens": tokens, "positions": np.where(real, np.arange(self.seq_len), 0).astype(np.int32),
                "segment_ids": real.astype(np.int32), "loss_mask": loss_mask}


def sft_dataset(examples: ChatExamples, *, seq_len: int, batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, packed: bool = True, pad_id: int = 0, process_index: int = 0,
                process_count: int = 1, num_packing_bins: int | None = None,
                read_threads: int = 2) -> grain.IterDataset:
    """Batches of SFT rows (see the module docstring); `batch_size` is per process.

    `num_epochs=None` repeats forever (training); evaluation uses `shuffle=False, num_epochs=1`,
    whose last batch is completed with padding rows (no targets), so every example counts once.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    ds = grain.MapDataset.source(examples)[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"process {process_index} of {process_count} gets no records: the source has only "
                         f"{len(examples)}")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).filter(_is_kept)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64))
    if packed:
        rows = packing.pack(it, seq_len=seq_len, num_packing_bins=num_packing_bins or max(batch_size, 32),
                            pad_id=pad_id, seed=seed, shuffle_bins=shuffle)
    else:
        rows = it.map(PadExample(seq_len, pad_id))
    return rows.batch(batch_size, batch_fn=functools.partial(packing.pad_batch, batch_size=batch_size, pad_id=pad_id))


def make_sft_iterator(examples: ChatExamples, **kwargs) -> grain.DatasetIterator:
    """`iter(sft_dataset(...))`: has `get_state()`/`set_state()` for exact resumption."""
    return iter(sft_dataset(examples, **kwargs))
