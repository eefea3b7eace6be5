"""Tests for jaxlm.data sources, packing and pipelines.

Packing is checked against a reference: every document is tokenized directly and split into
seq_len chunks, and the multiset of segments read back from the packed rows must equal the
multiset of chunks (no token lost, duplicated or reordered). Every document starts with a unique
number, so segments identify documents and shards can be compared as sets.
"""

import collections
import json
import logging
import random

import numpy as np
import pytest

from jaxlm.data import packing
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.pipeline import make_lm_iterator
from jaxlm.data.sources import DataError, DocumentSource

SEQ_LEN = 32
WORDS = "the cat dog sat on mat a big small red blue runs jumps quickly house tree river".split()


def _doc(rng: random.Random, i: int) -> str:
    n = rng.choice([1, 3, 6, 10, 25, 60])  # some documents are longer than SEQ_LEN tokens
    return f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """80 documents in a text file (paragraphs, some multi-line) and 60 in a JSONL file."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = [_doc(rng, i) for i in range(140)]
    txt = [d.replace(" big ", " big\n", 1) for d in docs[:80]]  # inner newlines stay in a document
    (root / "a.txt").write_text("\n\n".join(txt) + "\n\n\n")
    with open(root / "b.jsonl", "w") as f:
        for d in docs[80:]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    return root, txt + docs[80:]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(500)]
    return tokenizer_lib.train_tokenizer(iter(lines), tmp_path_factory.mktemp("tok") / "t", 300)


def _lm_iter(corpus, tok, **kw):
    root, _ = corpus
    args = dict(seq_len=SEQ_LEN, batch_size=4, seed=0, shuffle=False, num_epochs=1)
    return make_lm_iterator([str(root / "*.txt"), str(root / "*.jsonl")], tok, **(args | kw))


def _expected_chunks(docs, tok):
    chunks = collections.Counter()
    for d in docs:
        tokens = [tok.bos_id, *tok.encode(d), tok.eos_id]
        for s in range(0, len(tokens), SEQ_LEN):
            chunks[tuple(tokens[s:s + SEQ_LEN])] += 1
    return chunks


def _check_batch(batch, tok, batch_size=4):
    """Layout invariants of one batch; returns its segments as token tuples."""
    assert set(batch) == {"tokens", "positions", "segment_ids", "loss_mask"}
    for v in batch.values():
        assert v.shape == (batch_size, SEQ_LEN) and v.dtype == np.int32
    segments = []
    for tokens, pos, seg, mask in zip(*(batch[k] for k in packing.FEATURES)):
        n_real = int((seg > 0).sum())
        assert (seg[n_real:] == 0).all() and (seg[:n_real] > 0).all()  # padding only at the end
        assert (tokens[n_real:] == tok.pad_id).all() and (pos[n_real:] == 0).all()
        ids = seg[:n_real]
        assert (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all()
        if n_real:
            assert ids[0] == 1
        for s in range(1, int(seg.max()) + 1):
            where = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))  # restart at 0
            # The convention: every real token is a target except its segment's first.
            np.testing.assert_array_equal(mask[where], [0] + [1] * (len(where) - 1))
            segments.append(tuple(int(t) for t in tokens[where]))
        assert (mask[n_real:] == 0).all()
    return segments


# --- Sources -------------------------------------------------------------------------------------


def test_text_paragraphs_and_whole_file_mode(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffone\ntwo\n\n\n  three \n \t \nfour\r\nfive\r\n".encode())
    src = DocumentSource(str(path))
    assert list(src) == ["one\ntwo", "  three ", "four\r\nfive"]
    assert [src.location(i)[1] for i in range(len(src))] == [1, 5, 7]
    whole = DocumentSource(str(path), txt_mode="file")
    assert list(whole) == ["one\ntwo\n\n\n  three \n \t \nfour\r\nfive\r\n"]


def test_jsonl_field_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "x y", "n": 1}\n\n   \n{"body": "héllo\\nz"}\n')
    src = DocumentSource(str(path), text_field="body")
    assert list(src) == ["x y", "héllo\nz"]
    assert src.location(1) == (str(path), 4)
    pairs = DocumentSource(str(path), parse=lambda o: (o["body"], o.get("n")))
    assert pairs[0] == ("x y", 1)


def test_glob_order_and_index_errors(corpus):
    root, docs = corpus
    src = DocumentSource([str(root / "*.txt"), str(root / "*.jsonl")])
    assert len(src) == len(docs) and list(src) == docs
    with pytest.raises(IndexError):
        src.location(len(src))


@pytest.mark.parametrize("content, line, reason", [
    ('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n{"text": "d"}\n', 3, "invalid JSON"),
    ('{"text": "a"}\n{"txt": "b"}\n', 2, "missing field 'text'"),
    ('{"text": "a"}\n\n{"text": ["b"]}\n', 3, "field 'text' is list, expected a string"),
    ('{"text": "a"}\n[1, 2]\n', 2, "expected a JSON object, got list"),
    (b'{"text": "a"}\n{"text": "\xff\xfe"}\n', 2, "not valid UTF-8"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as e:
        DocumentSource(str(path))
    assert str(e.value).startswith(f"{path}:{line}: {reason}")
    assert (e.value.path, e.value.line) == (str(path), line)


def test_bad_utf8_in_text_file_names_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\n\nstill fine\nbut \xc3\x28 here\n\nok\n")
    with pytest.raises(DataError, match=r"bad\.txt:4: not valid UTF-8"):
        DocumentSource(str(path))
    with pytest.raises(DataError, match=r"bad\.txt:4: not valid UTF-8"):
        DocumentSource(str(path), txt_mode="file")
    src = DocumentSource(str(path), skip_bad_records=True)  # the whole paragraph is skipped
    assert list(src) == ["fine", "ok"] and src.skipped == {str(path): 1}


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match=r"no files match pattern '.*nothing-\*\.jsonl'"):
        DocumentSource(str(tmp_path / "nothing-*.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv: unknown extension '\.csv'"):
        DocumentSource(str(tmp_path / "x.csv"))
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(DataError, match=r"dir\.txt: is a directory"):
        DocumentSource(str(tmp_path / "*.txt"))
    (tmp_path / "dir.txt").rmdir()
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no documents in 1 file"):
        DocumentSource(str(tmp_path / "empty.jsonl"))


def test_skip_mode_counts_and_warns(tmp_path, caplog):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a"}\n')
    bad = tmp_path / "mixed.jsonl"
    bad.write_bytes(b'{"text": "b"}\nnot json\n{"text": 1}\n{"text": "c"}\n{"x": 1}\n\xff\n')
    with caplog.at_level(logging.WARNING):
        src = DocumentSource([str(good), str(bad)], skip_bad_records=True)
    assert list(src) == ["a", "b", "c"]
    assert src.skipped == {str(bad): 4} and src.num_skipped == 4
    assert "skipped 4 bad records" in caplog.text and "mixed.jsonl" in caplog.text
    # Without skipping, the first bad line is the error.
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: invalid JSON"):
        DocumentSource([str(good), str(bad)])


def test_skip_mode_in_pipeline(tmp_path, tok, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "the cat"}\n{"text": 5}\n{"text": "a dog"}\n')
    with caplog.at_level(logging.WARNING):
        batches = list(make_lm_iterator(str(path), tok, seq_len=SEQ_LEN, batch_size=2, seed=0,
                                        num_epochs=1, shuffle=False, skip_bad_records=True))
    assert "skipped 1 bad records" in caplog.text
    segments = [s for b in batches for s in _check_batch(b, tok, batch_size=2)]
    assert collections.Counter(segments) == _expected_chunks(["the cat", "a dog"], tok)


# --- Packing and pipelines -----------------------------------------------------------------------


def test_one_epoch_covers_every_token_exactly_once(corpus, tok):
    _, docs = corpus
    expected = _expected_chunks(docs, tok)
    assert any(len(c) == SEQ_LEN for c in expected)  # the corpus exercises splitting
    remainders = []
    for batch_size, shuffle in [(4, False), (5, True), (7, False)]:
        batches = list(_lm_iter(corpus, tok, batch_size=batch_size, shuffle=shuffle))
        segments = [s for b in batches for s in _check_batch(b, tok, batch_size)]
        assert collections.Counter(segments) == expected
        # All batches are full except the last, which is completed with all-padding rows
        # (segment 0, loss_mask 0: checked by _check_batch) instead of being dropped.
        real_rows = [int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches]
        n_rows = sum(real_rows)
        assert real_rows == [batch_size] * (n_rows // batch_size) + [n_rows % batch_size] * (
            n_rows % batch_size > 0)
        remainders.append(n_rows % batch_size)
    assert any(remainders)  # the padded last batch was exercised


def test_documents_decode_from_packed_rows(corpus, tok):
    _, docs = corpus
    whole = {}  # document number -> text, for documents that fit in one row
    for b in _lm_iter(corpus, tok, shuffle=True):
        for s in _check_batch(b, tok):
            if s[0] == tok.bos_id and s[-1] == tok.eos_id:
                text = tok.decode(s)
                whole[int(text.split(":")[0])] = text
    fits = {i for i, d in enumerate(docs) if len(tok.encode(d)) + 2 <= SEQ_LEN}
    assert len(fits) > 20 and set(whole) == fits
    assert all(whole[i] == docs[i] for i in fits)


def test_split_long_marks_each_chunk_start():
    tokens = np.arange(10, 10 + 2 * SEQ_LEN + 5, dtype=np.int32)
    mask = np.ones_like(tokens)
    mask[0] = 0
    chunks = packing.SplitLong(SEQ_LEN).flat_map({"tokens": tokens, "loss_mask": mask})
    assert [len(c["tokens"]) for c in chunks] == [SEQ_LEN, SEQ_LEN, 5]
    np.testing.assert_array_equal(np.concatenate([c["tokens"] for c in chunks]), tokens)
    for c in chunks:
        np.testing.assert_array_equal(c["loss_mask"], [0] + [1] * (len(c["tokens"]) - 1))
    assert mask.sum() == len(tokens) - 1  # the input is not modified


def test_mask_matches_the_loss_functions(corpus, tok):
    """The pipeline marks exactly the targets that `losses.next_token_targets` trains on."""
    from jaxlm import losses  # imports jax; only this test needs it

    batch = next(_lm_iter(corpus, tok, shuffle=True))
    _, weights = losses.next_token_targets(batch["tokens"], batch["segment_ids"],
                                           batch["loss_mask"])
    # weights[t] trains logits at t on tokens[t+1]: shifted, it must equal the mask exactly.
    np.testing.assert_array_equal(np.asarray(weights)[:, :-1], batch["loss_mask"][:, 1:])
    assert batch["loss_mask"][:, 0].sum() == 0


def test_shuffle_is_deterministic_per_seed(corpus, tok):
    def first_batches(seed, n=3):
        it = _lm_iter(corpus, tok, shuffle=True, seed=seed, num_epochs=None)
        return np.stack([next(it)["tokens"] for _ in range(n)])

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    unshuffled = np.stack([b["tokens"] for b in list(_lm_iter(corpus, tok))[:3]])
    assert not np.array_equal(a, unshuffled)


def test_epochs_repeat_with_a_new_order(corpus, tok):
    _, docs = corpus
    two = list(_lm_iter(corpus, tok, shuffle=True, num_epochs=2))
    segments = [s for b in two for s in _check_batch(b, tok)]
    expected = _expected_chunks(docs, tok)
    assert collections.Counter(segments) == expected + expected
    first_docs = [s for s in segments if s[0] == tok.bos_id]
    assert first_docs[:len(docs)] != first_docs[len(docs):]


@pytest.mark.parametrize("shuffle", [False, True])
def test_process_shards_are_disjoint_and_cover_everything(corpus, tok, shuffle):
    _, docs = corpus
    shards = [collections.Counter(
        s for b in _lm_iter(corpus, tok, shuffle=shuffle, process_index=i, process_count=3)
        for s in _check_batch(b, tok)) for i in range(3)]
    # First chunks carry unique document numbers (short tails of long documents may coincide).
    firsts = [{s for s in shard if s[0] == tok.bos_id} for shard in shards]
    assert all(firsts) and len(set.union(*firsts)) == sum(map(len, firsts)) == len(docs)
    assert shards[0] + shards[1] + shards[2] == _expected_chunks(docs, tok)
    with pytest.raises(ValueError, match="process_index=3"):
        _lm_iter(corpus, tok, process_index=3, process_count=3)


@pytest.mark.parametrize("skip, num_packing_bins", [(0, None), (3, 10), (29, 6), (-2, None)])
def test_state_round_trips_through_json(corpus, tok, skip, num_packing_bins):
    """Resuming from a JSON-serialised state gives the identical next batches, across epochs."""
    kw = dict(shuffle=True, seed=7, num_epochs=None, num_packing_bins=num_packing_bins)
    if skip < 0:  # counted from the end of the first epoch: the next batches straddle it
        skip += len(list(_lm_iter(corpus, tok, **(kw | dict(num_epochs=1)))))
    it = _lm_iter(corpus, tok, **kw)
    for _ in range(skip):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    resumed = _lm_iter(corpus, tok, **kw)
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(5)]):
        for k in packing.FEATURES:
            np.testing.assert_array_equal(got[k], want[k])


def test_worker_processes_give_the_same_batches_and_resume(corpus, tok):
    plain = _lm_iter(corpus, tok, shuffle=True)
    expected = [next(plain) for _ in range(8)]
    it = _lm_iter(corpus, tok, shuffle=True, worker_count=1)
    try:
        got = [next(it) for _ in range(5)]
        state = json.loads(json.dumps(it.get_state()))
    finally:
        it.close()
    resumed = _lm_iter(corpus, tok, shuffle=True, worker_count=1)
    try:
        resumed.set_state(state)
        got += [next(resumed) for _ in range(3)]
    finally:
        resumed.close()
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(have["tokens"], want["tokens"])
        np.testing.assert_array_equal(have["segment_ids"], want["segment_ids"])
