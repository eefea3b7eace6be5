"""Documents from text and JSONL files, as a random-access grain data source.

File formats, chosen by extension:

- `.txt` / `.text` / `.md`: plain UTF-8 text. By default (`txt_mode="paragraphs"`) a file is split
  into documents at blank lines (lines that are empty or whitespace only); a document keeps its
  inner newlines and loses the final one. `txt_mode="file"` makes each whole file one document.
- `.jsonl` / `.ndjson`: one JSON object per line; the document is the string in `text_field`.
  Blank lines are ignored. `parse` replaces the field lookup for other record shapes (SFT,
  preferences): it gets the decoded object and returns the record, or raises ValueError/KeyError/
  TypeError whose message says what is wrong.

Random access, so shuffling and per-process sharding in grain are exact and an iterator's state is
one integer: at construction every file is read once, every record is decoded and validated, and
an index of (file, byte span, line) is kept (28 bytes per record); `source[i]` re-reads one span.
Validating up front means bad data fails before training starts, never at step 50 000, and that
skip counts are exact from the start.

Bad input raises `DataError` naming the file and the 1-based line: invalid UTF-8, invalid JSON,
a line that is not an object, a missing or non-string field. With `skip_bad_records=True` such
records are skipped instead, counted per file in `source.skipped`, and a warning gives the count.
An unreadable file, a glob matching nothing, or no documents at all are always errors.

Left out: compressed files, JSON arrays, remote filesystems, pre-tokenized (ArrayRecord) corpora
for runs where reading every file at start-up costs too much.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

TEXT_EXTENSIONS = (".txt", ".text", ".md")
JSONL_EXTENSIONS = (".jsonl", ".ndjson")
_UTF8_BOM = b"\xef\xbb\xbf"

_log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data. `path` and `line` (1-based, or None) say where."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = "" if path is None else (f"{path}: " if line is None else f"{path}:{line}: ")
        super().__init__(where + message)
        self.path, self.line = path, line


class _BadRecord(Exception):
    """A record is bad; the reason is the message. Becomes a DataError or a counted skip."""


def expand_paths(patterns: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Absolute paths of the files matching the globs (sorted per pattern, each once)."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    paths: dict[str, None] = {}
    for pattern in patterns:
        pattern = os.fspath(pattern)
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise DataError(f"no files match pattern {pattern!r}")
        for p in matches:
            if os.path.isdir(p):
                raise DataError("is a directory, expected a file (use a glob such as dir/*.txt)", p)
            paths[os.path.abspath(p)] = None
    if not paths:
        raise DataError("no input files given")
    return list(paths)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start:e.start + 4]
        raise _BadRecord(f"not valid UTF-8 (byte {e.start} of the line: {bad!r})") from None


class TextField:
    """The default JSONL parse: `obj[field]`, which must be a string. (A class, so it pickles.)"""

    def __init__(self, field: str):
        self.field = field

    def __call__(self, obj: dict) -> str:
        if self.field not in obj:
            raise KeyError(f"missing field {self.field!r}")
        value = obj[self.field]
        if not isinstance(value, str):
            raise TypeError(f"field {self.field!r} is {type(value).__name__}, expected a string")
        return value


class DocumentSource:
    """Random-access documents (grain `RandomAccessDataSource`): `len(src)`, `src[i] -> str`."""

    def __init__(
        self,
        patterns: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        text_field: str = "text",
        parse: Callable[[Any], Any] | None = None,
        skip_bad_records: bool = False,
        txt_mode: str = "paragraphs",
    ):
        if txt_mode not in ("paragraphs", "file"):
            raise ValueError(f"txt_mode must be 'paragraphs' or 'file', got {txt_mode!r}")
        self.files = expand_paths(patterns)
        self.skip_bad_records = skip_bad_records
        self.txt_mode = txt_mode
        self._parse = parse or TextField(text_field)
        self.skipped: dict[str, int] = {}  # file -> number of bad records skipped

        file_idx, starts, ends, lines = [], [], [], []
        for i, path in enumerate(self.files):
            for start, end, line in self._index_file(path):
                file_idx.append(i), starts.append(start), ends.append(end), lines.append(line)
        self._file_idx = np.asarray(file_idx, np.int32)
        self._starts = np.asarray(starts, np.int64)
        self._ends = np.asarray(ends, np.int64)
        self._lines = np.asarray(lines, np.int64)

        if self.skipped:
            _log.warning("skipped %d bad records: %s", self.num_skipped, self.skipped)
        if len(self) == 0:
            raise DataError(f"no documents in {len(self.files)} file(s): {self.files[:5]}")

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    # --- Random access ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int):
        path, line = self.location(index)
        start, end = int(self._starts[index]), int(self._ends[index])
        try:
            with open(path, "rb") as f:  # one open per read: thread-safe, picklable, no fd limit
                f.seek(start)
                raw = f.read(end - start)
            return self._record(path, raw)
        except (OSError, _BadRecord) as e:
            raise DataError(f"could not re-read record (file changed since indexing?): {e}", path,
                            line) from None

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    def location(self, index: int) -> tuple[str, int]:
        """(file, 1-based line) where record `index` starts."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        return self.files[int(self._file_idx[index])], int(self._lines[index])

    def __repr__(self):
        return (f"DocumentSource({len(self)} records in {len(self.files)} files, "
                f"{self.num_skipped} skipped)")

    # --- Reading and indexing ---------------------------------------------------------------------

    def _kind(self, path: str) -> str:
        ext = os.path.splitext(path)[1].lower()
        if ext in JSONL_EXTENSIONS:
            return "jsonl"
        if ext in TEXT_EXTENSIONS:
            return "text"
        raise DataError(f"unknown extension {ext!r}: expected one of "
                        f"{TEXT_EXTENSIONS + JSONL_EXTENSIONS}", path)

    def _record(self, path: str, raw: bytes):
        """The record stored in `raw` (one JSONL line or one text document)."""
        text = _decode(raw)
        if self._kind(path) == "text":
            if self.txt_mode == "paragraphs":  # drop the newline ending the last line
                text = text.removesuffix("\n").removesuffix("\r")
            return text
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise _BadRecord(f"invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise _BadRecord(f"expected a JSON object, got {type(obj).__name__}")
        try:
            return self._parse(obj)
        except (KeyError, TypeError, ValueError) as e:
            reason = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
            raise _BadRecord(reason) from None

    def _bad(self, path: str, line: int, reason: str) -> None:
        if not self.skip_bad_records:
            raise DataError(reason, path, line)
        self.skipped[path] = self.skipped.get(path, 0) + 1

    def _index_file(self, path: str) -> Iterator[tuple[int, int, int]]:
        """Yields (start byte, end byte, first line) of each good record in `path`."""
        kind = self._kind(path)
        try:
            with open(path, "rb") as f:
                if kind == "text" and self.txt_mode == "file":
                    yield from self._index_whole_file(path, f.read())
                else:
                    yield from self._index_lines(path, kind, f)
        except OSError as e:
            raise DataError(f"cannot read file: {e.strerror or e}", path) from None

    def _index_whole_file(self, path: str, data: bytes) -> Iterator[tuple[int, int, int]]:
        offset = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
        if offset == len(data):
            return
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            self._bad(path, data.count(b"\n", 0, e.start) + 1, "not valid UTF-8")
            return
        yield offset, len(data), 1

    def _index_lines(self, path, kind, f) -> Iterator[tuple[int, int, int]]:
        """JSONL records, or text paragraphs (runs of non-blank lines). Lines end at b"\\n" only."""
        offset = 0
        para_start = para_line = None  # the open paragraph, text files only
        para_ok = True
        for lineno, raw in enumerate(f, start=1):  # binary file iteration splits at b"\n" only
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(_UTF8_BOM):
                raw, start = raw[len(_UTF8_BOM):], start + len(_UTF8_BOM)
            blank = not raw.strip()  # ASCII whitespace only: valid on undecoded bytes
            if kind == "jsonl":
                if blank:
                    continue
                try:
                    self._record(path, raw)
                except _BadRecord as e:
                    self._bad(path, lineno, str(e))
                    continue
                yield start, offset, lineno
            elif blank:  # ends the open paragraph
                if para_start is not None and para_ok:
                    yield para_start, start, para_line
                para_start = None
            else:
                if para_start is None:
                    para_start, para_line, para_ok = start, lineno, True
                if para_ok:
                    try:
                        _decode(raw)
                    except _BadRecord as e:  # the whole paragraph is one bad record
                        para_ok = False
                        self._bad(path, lineno, str(e))
        if para_start is not None and para_ok:
            yield para_start, offset, para_line
