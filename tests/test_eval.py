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
