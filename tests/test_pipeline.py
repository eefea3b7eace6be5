"""The main job end to end at toy sizes (experiments/configs/pipeline_smoke.py): every stage runs,
hands its output to the next, and the report has a row per model; a rerun skips finished stages
and resumes an unfinished one from its checkpoint."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["data", "tokenizer", "pretrain", "sft", "grpo", "preferences", "reward", "ppo", "dpo", "cai", "evaluate"]
MODELS = ["base", "SFT", "PPO", "DPO", "CAI", "GRPO"]


def _pipeline(workdir):
    return subprocess.run([sys.executable, "-m", "experiments.pipeline", f"--workdir={workdir}",
                           "--config=experiments/configs/pipeline_smoke.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1500)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    result = _pipeline(workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return workdir, result.stdout + result.stderr


def test_every_stage_finishes_and_the_report_has_a_row_per_model(run):
    workdir, out = run
    assert "data=2 × fsdp=1 × tensor=1 (2 devices)" in out  # cpu_devices=2: every stage splits its batches
    for i, stage in enumerate(STAGES, 1):
        assert f"[{i}/{len(STAGES)}] {stage}: finished in" in out
        assert os.path.exists(workdir / stage / "DONE"), stage
    timings = json.load(open(workdir / "timings.json"))
    assert list(timings) == STAGES and all(t >= 0 for t in timings.values())

    evaluation = json.load(open(workdir / "evaluation.json"))
    assert list(evaluation) == MODELS
    prompts = [r["prompt"] for r in evaluation["SFT"]["records"]]
    assert len(prompts) == 8
    for name in MODELS:  # Every model answers the same prompts, scored the same way.
        summary, records = evaluation[name]["summary"], evaluation[name]["records"]
        assert [r["prompt"] for r in records] == prompts, name
        assert 0.0 <= summary["gold"] <= 1.0 and "reward" in summary and "kl_to_reference" in summary, name
        assert 0.0 <= summary["gold_sampled"] <= 1.0 and summary["samples_per_prompt"] == 2, name
        assert 0.0 <= summary["redteam_harmful_or_rude"] <= 1.0, name
    assert evaluation["SFT"]["summary"]["kl_to_reference"] == 0.0  # SFT is the reference

    report = open(workdir / "report.md").read()
    table = [line for line in report.splitlines() if line.startswith("| ") and "|---" not in line]
    assert table[0].startswith("| model | gold (greedy) | gold (sampled) |")
    assert [row.split("|")[1].strip() for row in table[1:1 + len(MODELS)]] == MODELS
    assert "| model − SFT | gold (greedy) | gold (sampled) |" in report
    checks = report.split("## Checks")[1].split("##")[0]
    for claim in ("base < SFT (gold, greedy)", "PPO > SFT (gold, sampled", "DPO > SFT (gold, greedy",
                  "reward model within 5 points of the Bayes accuracy", "CAI: fewer rude or harmful"):
        assert claim in checks, claim
    assert "a judge blind to content:" in checks  # Beside the Bayes accuracy: what checking answers adds.
    assert "Reward model held-out accuracy" in report and "PPO's KL to SFT: " in report
    compared = report.split("## Comparing the stages")[1].split("\n## ")[0]
    for row in ("goal", "data", "supervision", "compute", "wall time", "key challenge, measured"):
        assert f"| **{row}** |" in compared, row
    for column in ("Pre-training", "Fine-tuning (SFT)", "Reward model", "RLHF with PPO", "DPO", "Constitutional AI",
                   "GRPO (reasoning)"):
        assert column in next(line for line in compared.splitlines() if line.startswith("| |")), column
    compute = next(line for line in compared.splitlines() if line.startswith("| **compute** |"))
    assert compute.count("device-seconds (2 × ") == 7, compute  # every stage's column: 2 CPU devices each
    for plot in ("losses.png", "ppo_reward_vs_kl.png", "dpo_margins.png", "grpo_accuracy_length.png"):
        assert (workdir / "plots" / plot).stat().st_size > 1000, plot
        assert f"plots/{plot}" in report
    assert "## Wall time per stage" in report and "| **total** |" in report
    assert os.path.exists(workdir / "report.html")


def test_rerun_skips_finished_stages_and_resumes_an_unfinished_one(run):
    workdir, _ = run
    os.remove(workdir / "dpo" / "DONE")  # As if the pipeline had been killed after DPO's last checkpoint.
    result = _pipeline(workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for i, stage in enumerate(STAGES, 1):
        if stage != "dpo":
            assert f"[{i}/{len(STAGES)}] {stage}: done earlier" in result.stdout, stage
    assert "Resuming from step 4" in result.stdout
    assert os.path.exists(workdir / "dpo" / "DONE")


def test_checks_pass_only_at_two_standard_errors(tmp_path):
    """A claimed gain counts at two standard errors of the per-prompt difference or more; between
    zero and two it is "not shown", below zero it fails (the bar `experiments.report` names; the
    report once showed "✓ PPO > SFT: +0.001 ± 0.032 (+0.0 s.e.)")."""
    from experiments import report

    assert report.verdict(0.10, 0.04) == report.PASS and report.verdict(0.10, 0.05) == report.PASS
    assert report.verdict(0.001, 0.032) == report.NOT_SHOWN and report.verdict(0.0, 0.0) == report.NOT_SHOWN
    assert report.verdict(-0.001, 0.5) == report.FAIL and report.verdict(0.2, 0.0) == report.PASS

    def model(gold, harmful=()):
        records = [{"gold": g, "gold_sampled": g} for g in gold]
        red = [{"parts": {"polite": 1.0, "refuses_harm": 0.0 if h else 1.0}} for h in harmful]
        return {"summary": {"gold": sum(gold) / len(gold), "redteam_harmful_or_rude": sum(harmful) / max(len(red), 1)},
                "records": records, "redteam": red}

    sft = [0.2, 0.4, 0.6, 0.8] * 5
    results = {"base": model([0.0] * 20), "SFT": model(sft, [1, 0] * 10),
               "PPO": model([g + (0.01 if i % 2 else -0.01) for i, g in enumerate(sft)]),  # +0.000 ± 0.005
               "DPO": model([g + 0.1 + (0.01 if i % 2 else -0.01) for i, g in enumerate(sft)]),  # +0.1 ± 0.005
               "CAI": model(sft, [1, 0] * 9 + [0, 1])}  # same harmful rate as SFT
    found = {claim: status for claim, status, _ in report.checks(str(tmp_path), results)}
    assert found["base < SFT (gold, greedy)"] == report.PASS
    assert found["PPO > SFT (gold, greedy)"] == report.NOT_SHOWN
    assert found["DPO > SFT (gold, sampled)"] == report.PASS
    assert found["CAI: fewer rude or harmful red-team answers than SFT"] == report.NOT_SHOWN
    results["PPO"] = model([g - 0.05 for g in sft])
    found = {claim: status for claim, status, _ in report.checks(str(tmp_path), results)}
    assert found["PPO > SFT (gold, greedy)"] == report.FAIL


def test_grpo_column_counts_every_sampler_call_and_device_seconds(tmp_path):
    """The comparison table's GRPO column, against a count by hand: 2 iterations × 2 prompts × 4
    completions (16 trained rows), one refill call, rows of 6 + 4 = 10 slots. Sampling is one forward
    pass per slot of every sampled row ((2 + 1) calls × 2 × 4 = 24 rows), β > 0 adds a reference
    pass per trained row (16), one epoch of updates three passes per trained row (48)."""
    from experiments import comparison
    from jaxlm.model import ModelConfig

    cfg = ModelConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1)
    run = tmp_path / "grpo"
    run.mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "reasoning_prompts.jsonl").write_text('{"prompt": "a"}\n' * 7)
    (run / "config.json").write_text(json.dumps({
        "stage": "grpo", "devices": {"count": 2, "processes": 1, "platform": "cpu"},
        "data": {"dir": "", "max_prompt_len": 6, "prompts_file": ""},
        "rollout": {"prompts": 2, "group_size": 4, "max_new_tokens": 4},
        "train": {"iterations": 2}, "grpo": {"beta": 0.04, "epochs": 1}, "reward_model": {"path": ""}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "eval_accuracy": 0.0},
        {"step": 1, "accuracy": 0.25, "refills": 1, "completion_length": 4.0},
        {"step": 2, "accuracy": 0.5, "refills": 0, "completion_length": 2.0}]))
    row = comparison.forward_flops_per_slot(cfg, 10) * 10
    facts = comparison.stage_facts(str(tmp_path), "grpo", cfg, results={})
    assert facts["flops"] == pytest.approx(24 * row + 16 * row + 3 * 16 * row, rel=1e-12)
    assert "24 completions sampled (2 iterations × 2 prompts × 4, 1 refill calls)" in facts["data"]
    assert facts["data"].startswith("7 prompts") and "4.0 → 3.0 tokens" not in facts["challenge"]
    assert "completion length 3.0 → 3.0 tokens" in facts["challenge"]  # the means of the first and last 5
    assert comparison.device_count(str(tmp_path), "grpo") == 2
