"""Tests for jaxlm.data.tokenizer: training, lossless round trips, fixed special ids, errors.

One BPE tokenizer is trained per module on a small generated corpus (well under a second).
"""

import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest

from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the cat dog sat on mat a big small red blue runs jumps quickly house tree river "
         "mountain said hello world and but because when while 12 345").split()

SAMPLES = [
    "hello world",
    "The cat sat on the mat.",
    "  leading, inner  double   and trailing spaces  ",
    "tabs\tand\nnewlines\n\nand a blank line\r\n",
    "unicode via byte fallback: héllo wörld, 日本語, Ελληνικά, emoji 🤖🎉",
    "digits 0123456789 and symbols ~!@#$%^&*()_+{}|:\"<>?",
    "<|system|>Be brief.<|user|>hi there<|assistant|>hello",
    "",
    " ",
    "\u0000 nul and \u200b zero-width",
]


def _corpus(n_lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) + "."
            for _ in range(n_lines)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "sub" / "tokenizer"
    return tokenizer_lib.train_tokenizer(iter(_corpus(2000)), out, vocab_size=400,
                                         user_defined_symbols=("<|tool|>",))


def test_special_ids_are_fixed(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    # Role markers first (ids 4, 5, 6), then the extra user-defined symbols.
    assert [tok.piece_to_id(s) for s in tokenizer_lib.ROLE_MARKERS] == [4, 5, 6]
    assert tok.piece_to_id("<|tool|>") == 7
    assert tok.piece_to_id("surely-not-a-piece") == tok.unk_id
    assert tok.vocab_size == 400


@pytest.mark.parametrize("marker", [*tokenizer_lib.ROLE_MARKERS, "<|tool|>"])
def test_markers_are_single_tokens_in_context(tok, marker):
    marker_id = tok.piece_to_id(marker)
    assert tok.encode(marker) == [marker_id]
    for text in (f"say{marker}hi", f"a {marker} b", f"{marker}{marker}"):
        ids = tok.encode(text)
        assert ids.count(marker_id) == text.count(marker)
        assert tok.decode(ids) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_lossless_and_never_unk(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.unk_id not in ids
    assert tok.bos_id not in ids and tok.eos_id not in ids  # encode adds no specials
    assert tok.decode(ids) == text


def test_unseen_characters_fall_back_to_bytes(tok):
    ids = tok.encode("日")  # never in the training corpus: three UTF-8 byte pieces
    assert [tok.id_to_piece(i) for i in ids] == ["<0xE6>", "<0x97>", "<0xA5>"]


def test_decode_drops_pad_bos_eos_and_accepts_arrays(tok):
    ids = tok.encode("the big dog")
    padded = [tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(padded) == "the big dog"
    assert tok.decode(np.asarray(padded, np.int32)) == "the big dog"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_common_words_are_merged(tok):
    # A trained BPE, not a byte-level identity: frequent words take one or two pieces.
    assert len(tok.encode("the cat sat on the mat")) <= 12


def test_load_and_pickle_give_the_same_tokenizer(tok):
    assert os.path.isfile(tok.path) and os.path.isfile(tok.path[:-len(".model")] + ".vocab")
    loaded = Tokenizer.load(tok.path)
    unpickled = pickle.loads(pickle.dumps(loaded))
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text) == unpickled.encode(text)
    assert unpickled.path == tok.path


def test_missing_file_error_names_path(tmp_path):
    path = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.load(path)


def test_non_sentencepiece_file_error_names_path(tmp_path):
    path = tmp_path / "garbage.model"
    path.write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(ValueError, match=r"garbage\.model is not a SentencePiece model"):
        Tokenizer.load(path)


def test_vocab_too_small_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        tokenizer_lib.train_tokenizer(iter(_corpus(10)), tmp_path / "t", vocab_size=100)


def test_cli_trains_from_text_and_jsonl(tmp_path):
    lines = _corpus(400, seed=1)
    (tmp_path / "a.txt").write_text("\n\n".join(lines[:200]) + "\n")
    with open(tmp_path / "b.jsonl", "w") as f:
        for line in lines[200:]:
            f.write(json.dumps({"body": line}) + "\n")
    out = tmp_path / "out" / "tokenizer"
    cmd = [sys.executable, "-m", "tools.train_tokenizer", f"--input={tmp_path}/*.txt",
           f"--input={tmp_path}/*.jsonl", "--text_field=body", "--vocab_size=320", f"--out={out}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    tok = Tokenizer.load(f"{out}.model")
    assert tok.vocab_size == 320 and tok.piece_to_id("<|assistant|>") == 6
    assert tok.decode(tok.encode(lines[250])) == lines[250]

    # Bad input: a clean one-line error naming the file and line, not a traceback.
    with open(tmp_path / "b.jsonl", "a") as f:
        f.write('{"body": 3}\n')
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "b.jsonl:201: field 'body' is int, expected a string" in result.stderr
    assert "Traceback" not in result.stderr
