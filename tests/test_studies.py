"""experiments.studies: the numbers behind each verdict, the sentences written from them (a claim the
numbers do not support is written as not supported), the facts split that keeps some facts out of
the corpus, the cloze scorer against a direct computation, and the smoke run of every study."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import studies
from jaxlm.data.tinyworld import corpus, probes, world as W

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -------------------------------------------------------------------------------------------------
# Differences, standard errors, verdicts


def test_differences_and_their_standard_errors_by_hand():
    m, se = studies.mean_se([1.0, 2.0, 3.0, 6.0])  # mean 3, sample sd sqrt(14/3), se = sd / 2
    assert m == pytest.approx(3.0) and se == pytest.approx(np.sqrt(14 / 3) / 2, rel=1e-12)
    d, se = studies.paired([3.0, 5.0, 4.0], [1.0, 2.0, 2.0])  # differences 2, 3, 2
    assert d == pytest.approx(7 / 3) and se == pytest.approx(np.sqrt(1 / 3) / np.sqrt(3), rel=1e-12)
    d, se = studies.unpaired_difference([1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0])
    assert d == pytest.approx(0.25) and se == pytest.approx(np.hypot(np.sqrt(1 / 3) / 2, 0.25), rel=1e-12)


def test_verdicts_follow_the_reports_rule():
    assert studies.judged((0.2, 0.1)) == "shown"  # 2.0 s.e.
    assert studies.judged((0.19, 0.1)) == "not shown"
    assert studies.judged((-0.01, 0.1)) == "contradicted"
    assert studies.judged(None) == "not measured"
    assert studies.weakest("shown", "not shown") == "not shown"
    assert studies.weakest("shown", "contradicted", "not shown") == "contradicted"


# -------------------------------------------------------------------------------------------------
# Sentences from made-up numbers: the claim never changes, the verdict follows the numbers


def _kl(gold_fixed: tuple, kl_free: tuple) -> dict:
    labels = {"free": "β = 0", "fixed": "β = 0.1", "adaptive": "adaptive β"}
    return {"iterations": 40, "last": 5, "prompts": 200, "labels": labels,
            "kl": {"β = 0": kl_free, "β = 0.1": (0.5, 0.05), "adaptive β": (0.9, 0.1)},
            "gold_vs_free": {"β = 0.1": gold_fixed, "adaptive β": (0.01, 0.01)},
            "peak": (0.5, 20), "final": (0.4, 0.02)}


def _clip(diff: tuple) -> dict:
    labels = {"on": "clip", "off": "no clip"}
    return {"learning_rate": 3e-4, "iterations": 40, "last": 5, "prompts": 200, "labels": labels,
            "score": {"clip": (0.5, 0.1), "no clip": (1.5, 0.1)}, "kl": {"clip": (1.0, 0.1), "no clip": (3.0, 0.2)},
            "clip_fraction": (0.1, 0.01), "gold_on_minus_off": diff}


def _dpo(dpo_gold: tuple, dpo_minus_ppo: tuple) -> dict:
    return {"prompts": 200, "main": {"dpo": "DPO β = 0.5", "ppo": "PPO adaptive"}, "dpo_minus_ppo": dpo_minus_ppo,
            "points": {"DPO β = 0.5": {"kind": "dpo", "kl": 0.4, "gold": dpo_gold, "flops": 1e12},
                       "PPO adaptive": {"kind": "ppo", "kl": 0.6, "gold": (0.03, 0.01), "flops": 3e12},
                       "DPO β = 0.1": {"kind": "dpo", "kl": 2.0, "gold": (-0.02, 0.01), "flops": 1e12}}}


def _facts(pretrain_new: float, sft_new: float) -> dict:
    recall = {"pretrain/new": (pretrain_new, 0.05, 30), "sft/new": (sft_new, 0.05, 30), "sft/trained": (0.9, 0.05, 30)}
    return {"recall": recall, "base": {"pretrain": (0.6, 0.05), "sft": (0.1, 0.05), "both": (0.6, 0.05)},
            "chance": 0.09, "difference": studies.unpaired_from(recall["pretrain/new"][:2], recall["sft/new"][:2])}


def _scale(rise: tuple, above_copy: tuple) -> dict:
    points = {"small, 105 steps": {"accuracy": (0.2, 0.02), "flops": 1e12},
              "pipeline, 420 steps": {"accuracy": (0.6, 0.02), "flops": 1e14}}
    return {"items": 400, "points": points, "chance": 0.08, "copy": 0.33, "rise": rise, "above_copy": above_copy}


def _reward(rise: tuple) -> dict:
    row = lambda acc: {"accuracy": acc, "bayes_accuracy": 0.8, "content_blind_accuracy": 0.6}  # noqa: E731
    points = {"a": {"flops": 1e12, "families": {"harmful": row(0.6), "all": row(0.55)}},
              "b": {"flops": 1e14, "families": {"harmful": row(0.7), "all": row(0.6)}}}
    return {"pairs": 300, "points": points, "rise": rise}


CASES = {  # study: (sentence function, numbers that support the claim, that contradict it, that do not show it)
    "kl": (studies.kl_sentences, _kl((0.05, 0.01), (2.0, 0.1)), _kl((-0.05, 0.01), (2.0, 0.1)),
           _kl((0.01, 0.01), (2.0, 0.1))),
    "clip": (studies.clip_sentences, _clip((0.05, 0.01)), _clip((-0.05, 0.01)), _clip((0.01, 0.01))),
    "dpo": (studies.dpo_sentences, _dpo((0.05, 0.01), (0.03, 0.01)), _dpo((-0.05, 0.01), (-0.08, 0.01)),
            _dpo((0.05, 0.01), (0.01, 0.01))),
    "facts": (studies.facts_sentences, _facts(0.6, 0.1), _facts(0.1, 0.6), _facts(0.2, 0.15)),
    "scale": (studies.scale_sentences, _scale((0.4, 0.03), (0.27, 0.03)), _scale((-0.1, 0.03), (0.27, 0.03)),
              _scale((0.4, 0.03), (0.02, 0.03))),
    "reward": (studies.reward_sentences, _reward((0.05, 0.02)), _reward((-0.05, 0.02)), _reward((0.01, 0.02))),
}


@pytest.mark.parametrize("study", list(CASES))
def test_sentences_state_the_claim_and_what_the_numbers_show(study):
    fn, supported, contradicted, unclear = CASES[study]
    outcomes = {name: fn(m) for name, m in (("shown", supported), ("contradicted", contradicted),
                                            ("not shown", unclear))}
    claims = {claim for claim, _, _ in outcomes.values()}
    assert len(claims) == 1  # The claim is the same whatever was measured.
    for expected, (_, measured, verdict) in outcomes.items():
        assert verdict == expected, (study, expected, measured)
        assert measured.endswith(f": {expected}."), measured
        assert "±" in measured and "s.e." in measured


def test_kl_sentence_says_when_the_over_optimisation_curve_does_not_show():
    m = _kl((0.05, 0.01), (2.0, 0.1))
    assert "the over-optimisation curve shows" in studies.kl_sentences(m)[1]  # 0.5 → 0.40 ± 0.02
    m["final"] = (0.49, 0.02)
    assert "the over-optimisation curve does not show" in studies.kl_sentences(m)[1]


def test_plots_and_studies_md_from_results(tmp_path):
    rows = [{"step": i, "score": 0.1 * i, "gold_score": 0.5, "kl_k1": 0.05 * i} for i in range(1, 11)]
    paths = [studies.plot_series(str(tmp_path / "plots" / "kl.png"), {"a": rows, "b": rows},
                                 [("score", "proxy"), ("kl_k1", "KL")],
                                 scatter=("kl_k1", "gold_score", "KL", "gold against KL")),
             studies.plot_frontier(str(tmp_path / "plots" / "dpo.png"), _dpo((0.05, 0.01), (0.0, 0.01))["points"]),
             studies.plot_bars(str(tmp_path / "plots" / "facts.png"), {"x": (0.5, 0.1), "y": (0.1, 0.05)}, 0.09, "t"),
             studies.plot_scale(str(tmp_path / "plots" / "scale.png"),
                                {k: {**v, "size": k.split(",")[0]}
                                 for k, v in _scale((0, 1), (0, 1))["points"].items()},
                                0.08, 0.33),
             studies.plot_reward(str(tmp_path / "plots" / "reward.png"), _reward((0, 1))["points"])]
    for p in paths:
        assert os.path.getsize(p) > 1000, p
    claim, measured, verdict = studies.facts_sentences(_facts(0.1, 0.6))
    (tmp_path / "facts").mkdir()
    (tmp_path / "facts" / "result.json").write_text(json.dumps(
        {"title": "Fine-tuning does not teach new facts", "claim": claim, "measured": measured, "verdict": verdict,
         "plot": "plots/facts.png", "figures": {}}))
    text = open(studies.write_studies_md(str(tmp_path), ["facts", "kl"])).read()
    assert f"**Claim.** {claim}" in text and f"**Measured.** {measured}" in text
    assert "![facts](plots/facts.png)" in text and "## kl\n\nNot run yet." in text


# -------------------------------------------------------------------------------------------------
# The facts split and the probes


@pytest.fixture(scope="module")
def split():
    return probes.FactSplit.make(W.World.generate(0), 0)


def test_fact_split_groups_cover_the_world_and_the_corpus_keeps_no_sft_fact(split):
    names = [n for g in probes.GROUPS for n in split.groups[g]]
    assert sorted(names) == sorted(split.world.names)  # disjoint, complete
    docs = list(probes.filtered_corpus(split, 3000, 0))
    assert len(docs) == 3000
    original = list(corpus.corpus_documents(split.world, 3000, 0))
    assert docs[:10] == [d for d in original if not split.reveals_sft_fact(d)][:10]  # the pipeline's, filtered
    doc_words = [{W.bare(w) for w in W.words(d)} for d in docs]
    for fact in split.facts("sft"):
        for d, words in zip(docs, doc_words):
            assert not (fact.name.lower() in words and fact.value.lower() in words), (fact, d)
    # The corpus does state the other groups' facts (else the study would measure nothing).
    stated = lambda f: any(f.answer[:-1].lower() in d.lower() for d in docs)  # noqa: E731
    assert sum(map(stated, split.facts("pretrain"))) > len(split.facts("pretrain")) // 2


def test_fact_questions_sft_records_and_recall(split):
    records = split.sft_records(repeats=2)
    asked = {r["prompt"] for r in records}
    for f in split.facts("sft"):
        assert f.question(0) in asked and f.question(1) not in asked  # the held-out phrasing is never asked
    for f in split.facts("pretrain"):
        assert f.question(0) not in asked and f.question(1) not in asked
    assert len(records) == 2 * (len(split.facts("sft")) + 2 * len(split.facts("both")))
    fact = probes.Fact("Mia", "colour", "red", "kite")
    assert probes.recalled("Mia's kite is red.", fact) and not probes.recalled("Mia's kite is blue, not red.", fact)
    assert not probes.recalled("I do not know.", fact)
    words = set()
    for f in split.facts("both"):
        words |= set(W.words(f.question(0) + " " + f.question(1) + " " + f.answer))
    for item in probes.context_cloze_items(split.world, 50, 0):
        words |= set(W.words(item.prefix))
        assert item.answer in item.in_context and item.answer in item.candidates
    assert all(W.is_known(w) for w in words), [w for w in words if not W.is_known(w)]


class _CharTokenizer:
    bos_id = 1

    def encode(self, text):
        return [4 + (ord(c) % 40) for c in text]


def test_cloze_choice_is_the_candidate_with_the_highest_log_probability():
    from jaxlm.model import Model, ModelConfig
    model = Model(ModelConfig(vocab_size=64, num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, max_seq_len=64))
    params = model.init(jax.random.PRNGKey(0))
    tok = _CharTokenizer()
    items = [probes.ClozeItem("ab is", "red", ("red", "blue", "tan"), ("red", "tan")),
             probes.ClozeItem("cd is", "ox", ("ox", "cow"), ("cow",))]
    correct, copied = studies.cloze_correct(model, params, tok, items, batch_size=8)

    width = 32  # right padding (segment 0) changes no earlier position's logits
    apply = jax.jit(lambda t, s: model.apply(params, t, np.arange(width)[None], s).logits)

    def reference(prefix, cand):  # log p of " cand." after [BOS] + prefix, from the full logits
        ids = [1] + tok.encode(f"{prefix} {cand}.")
        start = 1 + len(tok.encode(prefix))
        tokens, segments = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
        tokens[0, :len(ids)], segments[0, :len(ids)] = ids, 1
        logp = jax.nn.log_softmax(np.asarray(apply(tokens, segments)[0], np.float64), axis=-1)
        return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))

    for i, item in enumerate(items):
        choice = max(item.candidates, key=lambda c: reference(item.prefix, c))
        assert correct[i] == (choice == item.answer) and copied[i] == (choice in item.in_context), (item, choice)


# -------------------------------------------------------------------------------------------------
# Smoke: every study through the real binaries on the smoke pipeline


@pytest.mark.skipif(not os.environ.get("JAXLM_SLOW_TESTS"), reason="~8 CPU-minutes (every study's runs on a smoke "
                    "pipeline): JAXLM_SLOW_TESTS=1 runs it; the tests above cover every plot and sentence")
def test_smoke_run_writes_every_plot_and_sentence_and_a_rerun_skips(tmp_path):
    cmd = [sys.executable, "-m", "experiments.studies", f"--workdir={tmp_path}",
           "--config=experiments/configs/studies_smoke.py"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    text = open(tmp_path / "studies.md").read()
    for study in studies.STUDIES:
        r = json.load(open(tmp_path / study / "result.json"))
        assert os.path.getsize(tmp_path / r["plot"]) > 1000, study
        assert f"**Claim.** {r['claim']}" in text and f"**Measured.** {r['measured']}" in text, study
        assert r["verdict"] in ("shown", "not shown", "contradicted", "not measured"), study
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done earlier, skipped") == len(studies.STUDIES), again.stdout
