"""Policy evaluation: KL to itself is 0, summaries are the means of the records, refusal rates."""

import types

import jax
import numpy as np
import pytest

from jaxlm import eval as eval_lib
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.model import Model, ModelConfig
from jaxlm.reward_model import ScalarHeadModel


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    texts = [f"what is {a} plus {b}? it is {a + b}." for a in range(10) for b in range(10)]
    tok = train_tokenizer(iter(texts * 3), str(d / "tok"), vocab_size=300)
    model = Model(ModelConfig(vocab_size=tok.vocab_size, num_layers=1, d_model=32, num_heads=2, max_seq_len=64))
    return tok, model, model.init(jax.random.PRNGKey(0))


def fake_judge(prompt, response):
    return types.SimpleNamespace(total=float(len(response) % 3) / 2, parts={"len_mod": float(len(response) % 2)})


def test_kl_to_itself_is_zero_and_summary_is_mean(setup):
    tok, model, params = setup
    prompts = ["what is 1 plus 2?", "what is 3 plus 4?", "what is 5 plus 5?"]
    rm = ScalarHeadModel(model.cfg)
    rm_params = rm.init(jax.random.PRNGKey(1))
    result = eval_lib.evaluate_policy(model, params, tok, prompts, families=["harmful", "harmless", "harmless"],
                                      judge=fake_judge, is_refusal=lambda t: t.startswith("what"),
                                      reference=(model, params), reward=(rm, rm_params), max_new_tokens=8,
                                      batch_size=2)
    assert len(result.records) == 3
    assert result.summary["kl_to_reference"] == 0.0
    assert result.summary["reward"] == 0.0  # a zero head scores every answer 0
    golds = [r["gold"] for r in result.records]
    assert result.summary["gold"] == pytest.approx(np.mean(golds))
    assert result.summary["gold/harmless"] == pytest.approx(np.mean(golds[1:]))
    assert result.summary["refusal_rate/harmful"] == float(result.records[0]["refusal"])
    for r in result.records:
        assert r["gold"] == fake_judge(r["prompt"], r["response"]).total
        assert 1 <= r["length"] <= 8


def test_kl_to_a_different_reference_is_positive(setup):
    tok, model, params = setup
    other = model.init(jax.random.PRNGKey(7))
    other["lm_head"] = other["lm_head"] * 300.0  # a peaked reference: far from the near-uniform policy
    result = eval_lib.evaluate_policy(model, params, tok, ["what is 1 plus 1?"] * 4, judge=fake_judge,
                                      is_refusal=lambda t: False, reference=(model, other), max_new_tokens=6,
                                      batch_size=4)
    assert result.summary["kl_to_reference"] > 0.0


def test_sampled_gold_is_the_judge_mean_over_the_samples(setup):
    """gold_sampled per prompt = the judge's mean over `num_samples` temperature-1 answers drawn with
    the documented keys (sample j of batch i: fold_in(rng, i), then fold_in(·, j) for j > 0); the
    summary is the mean over prompts and per family; num_samples=0 draws none."""
    from jaxlm import sampling
    from jaxlm.data import chat

    tok, model, params = setup
    prompts = ["what is 1 plus 2?", "what is 3 plus 4?"]
    rng = jax.random.PRNGKey(5)
    result = eval_lib.evaluate_policy(model, params, tok, prompts, families=["a", "b"], judge=fake_judge,
                                      is_refusal=lambda t: False, max_new_tokens=6, batch_size=2, rng=rng,
                                      num_samples=3)
    tokens, lengths = sampling.prompts_to_batch([chat.encode_prompt(tok, p) for p in prompts], tok.pad_id, 16)
    golds = [[], []]
    for j in range(3):
        key = jax.random.fold_in(rng, 0) if j == 0 else jax.random.fold_in(jax.random.fold_in(rng, 0), j)
        out = sampling.generate(model, params, tokens, lengths, rng=key, temperature=1.0, max_new_tokens=6,
                                eos_id=chat.stop_ids(tok), pad_id=tok.pad_id)
        for row in range(2):
            text = chat.decode_response(tok, [int(t) for t in out.tokens[row, :int(out.lengths[row])]])
            golds[row].append(fake_judge(prompts[row], text).total)
    for record, g in zip(result.records, golds):
        assert record["gold_sampled"] == pytest.approx(np.mean(g))
    assert result.summary["gold_sampled"] == pytest.approx(np.mean([np.mean(g) for g in golds]))
    assert result.summary["gold_sampled/b"] == pytest.approx(np.mean(golds[1]))
    assert result.summary["samples_per_prompt"] == 3
    greedy_only = eval_lib.evaluate_policy(model, params, tok, prompts, judge=fake_judge, is_refusal=lambda t: False,
                                           max_new_tokens=6, batch_size=2, num_samples=0)
    assert "gold_sampled" not in greedy_only.summary and "gold_sampled" not in greedy_only.records[0]
    with pytest.raises(ValueError, match="num_samples"):
        eval_lib.evaluate_policy(model, params, tok, prompts, judge=fake_judge, is_refusal=lambda t: False,
                                 num_samples=-1)


def test_without_a_judge_there_are_no_gold_fields(setup):
    """No judge: the same answers, lengths and KL, and no gold, parts, gold_sampled or refusal fields."""
    tok, model, params = setup
    prompts = ["what is 1 plus 2?", "what is 3 plus 4?"]
    common = dict(families=["harmful", "harmless"], reference=(model, params), max_new_tokens=6, batch_size=2,
                  num_samples=2)
    bare = eval_lib.evaluate_policy(model, params, tok, prompts, **common)
    judged = eval_lib.evaluate_policy(model, params, tok, prompts, judge=fake_judge, is_refusal=lambda t: False,
                                      **common)
    for r in bare.records:
        assert not {"gold", "parts", "gold_sampled", "refusal"} & set(r)
    assert not [k for k in bare.summary if k.startswith(("gold", "part/", "refusal_rate"))]
    assert [r["response"] for r in bare.records] == [r["response"] for r in judged.records]
    for key in ("length", "ended", "kl_to_reference", "num_prompts", "samples_per_prompt"):
        assert bare.summary[key] == judged.summary[key]
    assert "gold" in judged.summary and "refusal_rate/harmful" in judged.summary


def test_paired_difference_by_hand():
    from experiments import report

    model = [{"gold": 1.0}, {"gold": 0.5}, {"gold": 0.0}]
    sft = [{"gold": 0.0}, {"gold": 0.5}, {"gold": 0.5}]
    mean, se = report.paired_difference(model, sft, "gold")  # differences 1, 0, -0.5
    assert mean == pytest.approx(1 / 6)
    assert se == pytest.approx(np.std([1.0, 0.0, -0.5], ddof=1) / np.sqrt(3))
    assert report.paired_difference(model[:1], sft[:1], "gold") is None


def test_report_red_team_prompts_are_held_out(tmp_path):
    """The report's red-team rate is measured on prompts no stage trains on: disjoint from the
    training-side red-team prompts (which CAI revises) and distinct among themselves."""
    import json

    from experiments import report
    from jaxlm.data.tinyworld import tasks, world as W

    (tmp_path / "summary.json").write_text(json.dumps({"seed": 3}))
    held_out = report.heldout_redteam_prompts(str(tmp_path), 40)
    training = set(tasks.redteam_prompts(W.World.generate(3), 400, 3))
    assert len(held_out) == len(set(held_out)) == 40
    assert not set(held_out) & training
    assert report.heldout_redteam_prompts(str(tmp_path), 0) == []
