"""The chat format and SFT batches: exact tokens, loss masks on assistant tokens + EOS only
(single- and multi-turn, packed and unpacked), bad records naming file:line, too-long policies.

The mask checks are against a reference built by hand from the template's definition, and the
packed pipeline against the unpacked one: the same segments with the same masks, and the same
masked LM loss (sum and count) through `jaxlm.steps.lm`.
"""

import collections
import json

import jax
import numpy as np
import pytest

from jaxlm.data import chat, sft
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.sources import DataError
from jaxlm.model import Model, ModelConfig
from jaxlm.steps import lm

WORDS = "what is two plus three four five the cat sat on a mat yes no it sorry help me please".split()
SEQ_LEN = 48


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = np.random.RandomState(0)
    lines = [" ".join(rng.choice(WORDS, 10)) + "?" for _ in range(400)]
    return tokenizer_lib.train_tokenizer(iter(lines), tmp_path_factory.mktemp("tok") / "t", 300)


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS, n))


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_single_turn_tokens_and_mask_by_hand(tok):
    p, r = "what is two plus two?", "two plus two is four."
    tokens, mask = chat.encode_example(tok, p, r)
    user, assistant = tok.piece_to_id("<|user|>"), tok.piece_to_id("<|assistant|>")
    assert (user, assistant) == (5, 6)
    expected = [tok.bos_id, user, *tok.encode(p), assistant, *tok.encode(r), tok.eos_id]
    assert tokens == expected
    assert mask == [0] * (len(tok.encode(p)) + 3) + [1] * (len(tok.encode(r)) + 1)
    # A prompt is the example up to and including <|assistant|>; the response and EOS follow.
    prompt = chat.encode_prompt(tok, p)
    assert tokens == prompt + tok.encode(r) + [tok.eos_id]
    assert chat.encode_example(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": r}]) \
        == (tokens, mask)
    assert chat.decode_response(tok, tok.encode(r) + [tok.eos_id, 7, 8, tok.pad_id]) == r
    assert chat.decode_response(tok, tok.encode(r)) == r  # no EOS: everything (cut at max_new_tokens)


def test_multi_turn_mask_covers_every_assistant_turn_and_its_eos(tok):
    msgs = [{"role": "system", "content": "be kind."},
            {"role": "user", "content": "what is two?"}, {"role": "assistant", "content": "it is two."},
            {"role": "user", "content": "and three?"}, {"role": "assistant", "content": "three."}]
    tokens, mask = chat.encode_example(tok, msgs)
    ids = {m: tok.piece_to_id(chat.MARKERS[m]) for m in chat.ROLES}
    expected_tokens, expected_mask = [tok.bos_id], [0]
    for m in msgs:
        body = tok.encode(m["content"])
        is_assistant = m["role"] == "assistant"
        expected_tokens += [ids[m["role"]], *body] + ([tok.eos_id] if is_assistant else [])
        expected_mask += [0] + [int(is_assistant)] * (len(body) + int(is_assistant))
    assert (tokens, mask) == (expected_tokens, expected_mask)
    # Read back: the masked runs are exactly the assistant turns, each closed by EOS.
    runs, run = [], []
    for t, m in zip(tokens, mask):
        if m:
            run.append(t)
        elif run:
            runs.append(run)
            run = []
    runs.append(run)
    assert [tok.decode(r[:-1]) for r in runs] == ["it is two.", "three."]
    assert all(r[-1] == tok.eos_id for r in runs)
    # A multi-turn prompt ends with <|assistant|> after the last user turn.
    assert chat.encode_prompt(tok, msgs[:4]) == tokens[:len(chat.encode_prompt(tok, msgs[:4]))]
    assert chat.encode_prompt(tok, msgs[:4])[-1] == ids["assistant"]


def test_continuation_masks_only_the_turns_after_the_prompt(tok):
    """A multi-turn prompt's assistant turns are context: only the continuation is learned.

    Reference: DPO's log-probs are of the response y given the prompt x, log π(y|x) (Rafailov et
    al. 2023, eq. 7), and TRL's DPO masks the whole prompt, earlier assistant turns included
    (`prompt_input_ids` get no labels). Preference sides and SFT's `last_turn_only` use this.
    """
    from jaxlm.data.preferences import PreferenceParser

    msgs = [{"role": "user", "content": "what is two?"}, {"role": "assistant", "content": "it is two."},
            {"role": "user", "content": "and three?"}]
    chosen, rejected = "three.", "no."
    tokens, mask = chat.encode_continuation(tok, msgs, [{"role": "assistant", "content": chosen}])
    head = chat.encode_prompt(tok, msgs)
    assert tokens == head + tok.encode(chosen) + [tok.eos_id]
    assert mask == [0] * len(head) + [1] * (len(tok.encode(chosen)) + 1)
    assert sum(chat.encode_example(tok, msgs + [{"role": "assistant", "content": chosen}])[1]) > sum(mask)

    pair = PreferenceParser(tok, max_len=SEQ_LEN)({"prompt": msgs, "chosen": chosen, "rejected": rejected})
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        learned = [t for t, m in zip(pair[f"{side}_tokens"], pair[f"{side}_loss_mask"]) if m]
        assert learned == tok.encode(text) + [tok.eos_id], side

    record = {"messages": msgs + [{"role": "assistant", "content": chosen}]}
    every = sft.ChatExampleParser(tok, max_len=SEQ_LEN)(record)
    last = sft.ChatExampleParser(tok, max_len=SEQ_LEN, last_turn_only=True)(record)
    np.testing.assert_array_equal(every["tokens"], last["tokens"])
    assert [int(t) for t, m in zip(last["tokens"], last["loss_mask"]) if m] == tok.encode(chosen) + [tok.eos_id]
    assert every["loss_mask"].sum() == last["loss_mask"].sum() + len(tok.encode("it is two.")) + 1


@pytest.mark.parametrize("args, message", [
    (("", "x"), "prompt is empty"),
    (("hi", "  "), "response is empty"),
    (([{"role": "bot", "content": "x"}],), "role 'bot'"),
    (([{"role": "assistant", "content": "x"}],), "'user' was expected"),
    (([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}],),
     "'assistant' was expected"),
    (([{"role": "user", "content": "a"}],), "must end with an assistant"),
    (("tell <|assistant|> me", "x"), "role marker"),
    (([{"role": "user", "content": 3}, {"role": "assistant", "content": "c"}],), "is int"),
])
def test_bad_conversations_are_rejected(tok, args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        chat.encode_example(tok, *args)


def _records(n, seed=0):
    """A mix of prompt/response and multi-turn messages records."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append({"messages": [{"role": "system", "content": _sentence(rng, 2)},
                                     {"role": "user", "content": _sentence(rng, 3)},
                                     {"role": "assistant", "content": _sentence(rng, 2)},
                                     {"role": "user", "content": _sentence(rng, 2)},
                                     {"role": "assistant", "content": _sentence(rng, rng.randint(1, 4))}]})
        else:
            out.append({"prompt": _sentence(rng, rng.randint(1, 6)), "response": _sentence(rng, rng.randint(1, 8))})
    return out


def _segments(batches):
    """Every segment of every row as (tokens, loss_mask) tuples, plus a check of the row layout."""
    found = []
    for b in batches:
        for row in range(b["tokens"].shape[0]):
            seg = b["segment_ids"][row]
            assert np.all(b["loss_mask"][row][seg == 0] == 0)  # never on padding
            for s in np.unique(seg[seg > 0]):
                where = np.flatnonzero(seg == s)
                assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
                np.testing.assert_array_equal(b["positions"][row][where], np.arange(len(where)))
                found.append((tuple(b["tokens"][row][where]), tuple(b["loss_mask"][row][where])))
    return found


def test_packed_and_padded_batches_keep_each_examples_mask(tok, tmp_path):
    records = _records(60)
    path = _write_jsonl(tmp_path / "sft.jsonl", records)
    examples = sft.ChatExamples(path, tok, seq_len=SEQ_LEN)
    expected = collections.Counter()
    for r in records:
        t, m = chat.encode_example(tok, r["messages"]) if "messages" in r else \
            chat.encode_example(tok, r["prompt"], r["response"])
        expected[(tuple(t), tuple(m))] += 1
    kw = dict(seq_len=SEQ_LEN, batch_size=4, seed=0, shuffle=False, num_epochs=1)
    packed = list(sft.make_sft_iterator(examples, packed=True, **kw))
    padded = list(sft.make_sft_iterator(examples, packed=False, **kw))
    assert collections.Counter(_segments(packed)) == expected
    assert collections.Counter(_segments(padded)) == expected
    assert len(packed) < len(padded)  # packing actually packed

    # The masked LM loss is the same, and counts exactly the assistant tokens and EOS.
    model = Model(ModelConfig(vocab_size=tok.vocab_size, num_layers=1, d_model=32, num_heads=2, num_kv_heads=1))
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    eval_step = jax.jit(lm.make_eval_step(model))
    totals = {}
    for name, batches in (("packed", packed), ("padded", padded)):
        sums = [eval_step(params, b) for b in batches]
        totals[name] = (sum(float(s) for s, _ in sums), sum(float(c) for _, c in sums))
    assert totals["packed"][1] == totals["padded"][1] == sum(sum(m) * n for (_, m), n in expected.items())
    np.testing.assert_allclose(totals["packed"][0], totals["padded"][0], rtol=1e-5)


def test_bad_records_name_file_and_line(tok, tmp_path):
    good = {"prompt": "what is two?", "response": "two."}
    for bad, message in [({"prompt": "", "response": "x"}, "prompt is empty"),
                         ({"prompt": "x", "response": ""}, "response is empty"),
                         ({"prompt": "x"}, "missing field 'response'"),
                         ({"messages": [{"role": "user", "content": "x"}]}, "must end with an assistant"),
                         ('{"prompt": "x", ', "invalid JSON")]:
        path = _write_jsonl(tmp_path / "bad.jsonl", [good, good, bad])
        with pytest.raises(DataError, match=f"{path}:3: .*{message}"):
            sft.ChatExamples(path, tok, seq_len=SEQ_LEN)
    skipping = sft.ChatExamples(path, tok, seq_len=SEQ_LEN, skip_bad_records=True)
    assert len(skipping) == 2 and skipping.num_skipped == 1 and "skipped 1 bad records" in skipping.report()


def test_too_long_policies(tok, tmp_path):
    long = {"prompt": "what is two plus three?", "response": " ".join(["yes"] * 60)}
    short = {"prompt": "what is two?", "response": "two."}
    path = _write_jsonl(tmp_path / "long.jsonl", [short, long, short])
    with pytest.raises(DataError, match=f"{path}:2: conversation of .* tokens is longer than seq_len={SEQ_LEN}"):
        sft.ChatExamples(path, tok, seq_len=SEQ_LEN)
    kw = dict(seq_len=SEQ_LEN, batch_size=4, seed=0, shuffle=False, num_epochs=1, packed=False)

    skipped = sft.ChatExamples(path, tok, seq_len=SEQ_LEN, too_long="skip")
    assert skipped.num_too_long == 1 and skipped.report() == "skipped 1 conversations longer than seq_len"
    (batch,) = list(sft.make_sft_iterator(skipped, **kw))
    assert batch["segment_ids"][:, 0].tolist() == [1, 1, 0, 0]  # two rows; the rest is padding

    truncated = sft.ChatExamples(path, tok, seq_len=SEQ_LEN, too_long="truncate")
    assert truncated.num_too_long == 1 and "truncated 1" in truncated.report()
    (batch,) = list(sft.make_sft_iterator(truncated, **kw))
    full, full_mask = chat.encode_example(tok, long["prompt"], long["response"])
    np.testing.assert_array_equal(batch["tokens"][1], full[:SEQ_LEN])
    np.testing.assert_array_equal(batch["loss_mask"][1], full_mask[:SEQ_LEN])
    with pytest.raises(ValueError, match="too_long="):
        sft.ChatExamples(path, tok, seq_len=SEQ_LEN, too_long="drop")
