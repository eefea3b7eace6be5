"""SentencePiece tokenizer: load, encode/decode, and train our own.

Design decisions:

- Fixed special ids for every model we train: pad=0, bos=1, eos=2, unk=3, then the user-defined
  symbols in order, starting with the chat role markers (`<|system|>`=4, `<|user|>`=5,
  `<|assistant|>`=6). Foreign SentencePiece models load too; their ids are whatever they say.
- Lossless: identity normalisation, no dummy-prefix space, whitespace kept as is, and
  `byte_fallback=True`, so `decode(encode(s)) == s` for every string and nothing becomes `<unk>`.
- `encode` never adds BOS/EOS. Whoever builds a sequence (packing, chat template) adds them
  explicitly, so there is one place per format that decides where they go.
- User-defined symbols (the role markers) always encode as one token wherever they appear in text.

Left out: subword-regularisation sampling, Hugging Face `tokenizers` files, batched encoding
(grain's map runs encoding per document, in threads or worker processes).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")

_log = logging.getLogger(__name__)


class Tokenizer:
    """A SentencePiece model; picklable (it holds the serialised model) for grain workers."""

    def __init__(self, model_proto: bytes, path: str | None = None):
        self.path = path
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except Exception as e:  # RuntimeError or OSError, depending on the damage
            where = path if path is not None else "<in-memory model>"
            raise ValueError(f"{where} is not a SentencePiece model ({e})") from None
        # decode() drops these; -1 means the model has no such piece.
        self._dropped_on_decode = {i for i in (self.pad_id, self.bos_id, self.eos_id) if i >= 0}

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        with open(path, "rb") as f:
            return cls(f.read(), path=path)

    def __getstate__(self):
        return {"proto": self._proto, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["proto"], path=state["path"])

    def __repr__(self):
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"

    # --- Encoding ---------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a list or a 1-D array); pad, BOS and EOS are dropped."""
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"token ids out of range [0, {n}): {bad[:8]}")
        return self._sp.DecodeIds([i for i in ids if i not in self._dropped_on_decode])

    # --- Vocabulary -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def piece_to_id(self, piece: str) -> int:
        """Id of `piece`; `unk_id` if it is not in the vocabulary."""
        return self._sp.PieceToId(piece)

    def id_to_piece(self, token_id: int) -> str:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")
        return self._sp.IdToPiece(token_id)


def _texts_from(inputs, text_field: str) -> Iterator[str]:
    """Training sentences: one per line, since SentencePiece trains on lines."""
    if isinstance(inputs, (str, os.PathLike, list, tuple)):
        from jaxlm.data import sources  # local import: sources does not need the tokenizer

        documents = sources.DocumentSource(inputs, text_field=text_field)
    else:
        documents = inputs
    for doc in documents:
        if not isinstance(doc, str):
            raise TypeError(f"training texts must be str, got {type(doc).__name__}")
        for line in doc.splitlines():
            if line.strip():
                yield line


def train_tokenizer(
    input_files_or_iterator: str | os.PathLike | Sequence[str | os.PathLike] | Iterable[str],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    user_defined_symbols: Sequence[str] = (),
    *,
    model_type: str = "bpe",
    text_field: str = "text",
    input_sentence_size: int = 1_000_000,
    num_threads: int | None = None,
    seed: int = 0,
) -> Tokenizer:
    """Trains a SentencePiece model and writes `{model_prefix}.model` and `.vocab`.

    Args:
      input_files_or_iterator: a path or glob, or a list/tuple of them (read with
        `sources.DocumentSource`: `.txt` paragraphs or the JSONL `text_field`); any other iterable
        is taken as an iterator of texts (to train from an in-memory list, pass `iter(texts)`).
      model_prefix: output path without extension; its directory is created.
      vocab_size: target vocabulary size, including the 4 specials, the user-defined symbols and the
        256 byte pieces. It is a soft limit: on a corpus too small to reach it the vocabulary is
        smaller (logged as a warning); read `Tokenizer.vocab_size`, do not assume it.
      user_defined_symbols: extra pieces that always encode as one token. The chat role markers are
        always included, first, so their ids are 4, 5, 6.
      model_type: "bpe" (fast to train: well under a second per MB) or "unigram" (~10x slower).
      input_sentence_size: at most this many lines (sampled) are used for training.
    """
    symbols = list(dict.fromkeys([*ROLE_MARKERS, *user_defined_symbols]))
    min_size = 4 + len(symbols) + 256 + 1
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size} is too small: 4 specials, {len(symbols)} "
                         f"symbols and 256 byte pieces need at least {min_size}")
    model_prefix = os.fspath(model_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # sampling of input_sentence_size lines
    spm.SentencePieceTrainer.Train(
        sentence_iterator=_texts_from(input_files_or_iterator, text_field),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        user_defined_symbols=symbols,
        byte_fallback=True,
        character_coverage=0.9995,  # rare characters become byte pieces, not vocabulary entries
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=1 << 14,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    with open(model_prefix + ".model", "wb") as f:
        f.write(model.getvalue())
    tokenizer = Tokenizer(model.getvalue(), path=model_prefix + ".model")
    with open(model_prefix + ".vocab", "w", encoding="utf-8") as f:
        for i in range(tokenizer.vocab_size):
            f.write(f"{tokenizer.id_to_piece(i)}\t{tokenizer._sp.GetScore(i)}\n")
    if tokenizer.vocab_size < vocab_size:
        _log.warning("corpus too small for vocab_size=%d: trained %d pieces", vocab_size,
                     tokenizer.vocab_size)
    for s in symbols:  # guards the promise above against SentencePiece option changes
        if tokenizer.encode(s) != [tokenizer.piece_to_id(s)]:
            raise RuntimeError(f"user-defined symbol {s!r} does not encode as one token")
    return tokenizer
