"""The stages compared: one column per stage, every figure read from the pipeline's run directory.

`comparison_table(pipeline_dir, results, timings)` is the report's "Comparing the stages" table:
for each finished stage its goal and kind of supervision (fixed text), and, measured from the
run: the data it learned from (what, and how much), its compute, its wall time, and its key
challenge with the symptom this run shows.

Compute is model FLOPs, counted the way MFU counts them (`tools.bench`): a forward pass costs
2·N + 4·L·T·d per token slot (N: every matmul parameter, the output head once, the input
embedding not; T: the row's length), a training step three forward passes. Token slots are what
the step computes over (rows × length, padding included), so the figure is the work done, not
the real tokens seen. Sampling is counted as one forward pass per prompt and generated slot;
PPO adds its four scoring passes (policy, reference, critic, reward model) and the updates of
policy and critic per epoch; DPO its reference pass; CAI the generation of its answers,
critiques and revisions; GRPO its sampling (every call, refills included), the reference pass when
β > 0 (the old log-probs come from the sampler: no pass) and its updates. Device-seconds are the
stage's wall time × the devices its run saw (config.json's `devices`, written by the loop). The
FLOP counts are estimates of that formula, not profiler readings.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from jaxlm.data import chat
from jaxlm.model import ModelConfig

GOALS = {
    "pretrain": ("Pre-training", "predict the next token of raw text: language and facts", "self-supervised"),
    "sft": ("Fine-tuning (SFT)", "answer instructions in the chat format", "supervised, teacher-forced"),
    "reward": ("Reward model", "score answers as raters would", "preference classification (Bradley-Terry)"),
    "ppo": ("RLHF with PPO", "raise the reward model's score, staying near SFT", "reinforcement learning"),
    "dpo": ("DPO", "prefer chosen over rejected answers, staying near SFT", "preference classification on the policy"),
    "cai": ("Constitutional AI", "critique and revise its own answers by principles, then learn the revisions",
            "self-generated supervision (SL-CAI)"),
    "grpo": ("GRPO (reasoning)", "answer checkable problems correctly, rewarded by a program",
             "reinforcement learning from a verifier (critic-free: the group's mean is the baseline)"),
}


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _count_lines(path: str) -> int | None:
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def forward_flops_per_slot(cfg: ModelConfig, length: int) -> float:
    """2·N + 4·L·T·d: one forward pass's FLOPs per token slot of a row of `length` tokens."""
    matmul_params = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.d_model
    return 2.0 * matmul_params + 4.0 * cfg.num_layers * length * cfg.num_heads * cfg.head_size


def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "–"
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def _model_config(pipeline_dir: str) -> ModelConfig | None:
    """The pipeline's model (every stage shares pretraining's shape), from pretraining's checkpoint."""
    from jaxlm import init_source

    try:
        return ModelConfig(**init_source.load_meta(os.path.join(pipeline_dir, "pretrain"))["model"])
    except (FileNotFoundError, KeyError, ValueError):
        return None


def _last(rows: list[dict], key: str) -> float | None:
    return next((r[key] for r in reversed(rows) if key in r), None)


def _first(rows: list[dict], key: str) -> float | None:
    return next((r[key] for r in rows if key in r), None)


def _data_file(c: dict, name: str, default_dir: str) -> str:
    files = c.get("data", {}).get("train_files", "")
    if files and "," not in files and "*" not in files:
        return files
    return os.path.join(c.get("data", {}).get("dir") or default_dir, name)


def stage_facts(pipeline_dir: str, stage: str, cfg: ModelConfig, results: dict[str, dict]) -> dict[str, Any] | None:
    """{data, flops, challenge} of one finished stage, or None if its config is missing."""
    d = os.path.join(pipeline_dir, stage)
    c = _read_json(os.path.join(d, "config.json"))
    if not c:
        return None
    metrics = _read_jsonl(os.path.join(d, "metrics.jsonl"))
    data_dir = os.path.join(pipeline_dir, "data")
    gold = lambda name, key="gold": results.get(name, {}).get("summary", {}).get(key)
    fmt = lambda x, digits=3: "–" if x is None else f"{x:.{digits}f}"

    if stage in ("pretrain", "sft"):
        B, T, steps = c["data"]["batch_size"], c["data"]["seq_len"], c["train"]["steps"]
        slots = steps * B * T
        flops = 3 * forward_flops_per_slot(cfg, T) * slots
        if stage == "pretrain":
            docs = _count_lines(c["data"].get("train_files", ""))
            data = f"{_num(docs)} documents of TinyWorld text; {_num(slots)} token slots ({steps} steps × {B} × {T})"
            challenge = (f"learning from raw text alone: held-out loss {fmt(_last(metrics, 'eval_loss'))} "
                         f"(perplexity {fmt(_last(metrics, 'eval_perplexity'), 1)}); train loss "
                         f"{fmt(_last(metrics, 'loss'))}")
        else:
            examples = _count_lines(_data_file(c, "sft_train.jsonl", data_dir))
            data = f"{_num(examples)} demonstrations; {_num(slots)} token slots ({steps} steps × {B} rows × {T})"
            challenge = (f"teaches the format, not new facts: gold (greedy) base {fmt(gold('base'))} → SFT "
                         f"{fmt(gold('SFT'))}")
    elif stage in ("reward", "dpo"):
        B, T, steps = c["data"]["batch_size"], c["data"]["seq_len"], c["train"]["steps"]
        pair_dir = c["data"].get("dir") or data_dir
        comparisons = _count_lines(_data_file(c, "preferences_train.jsonl", pair_dir))
        slots = steps * B * 2 * T
        data = f"{_num(comparisons)} comparisons; {steps * B} pairs seen ({_num(slots)} token slots)"
        if stage == "reward":
            flops = 3 * forward_flops_per_slot(cfg, T) * slots
            acc = _last(metrics, "eval_accuracy")
            bayes = _last(metrics, "bayes_accuracy")
            if bayes is None:
                bayes = _read_json(os.path.join(pipeline_dir, "preferences", "summary.json")).get(
                    "preferences", {}).get("valid", {}).get("bayes_accuracy")
            challenge = (f"learning what raters can tell apart: held-out accuracy {fmt(acc)} against the labels' "
                         f"Bayes ceiling {fmt(bayes)}")
        else:
            flops = 4 * forward_flops_per_slot(cfg, T) * slots  # policy (3 passes) + reference (1)
            challenge = (f"drift without a reward model: KL to SFT {fmt(gold('DPO', 'kl_to_reference'))} nats; chosen "
                         f"log-prob {fmt(_first(metrics, 'chosen_logp'), 1)} → {fmt(_last(metrics, 'chosen_logp'), 1)}")
    elif stage == "ppo":
        B, iters = c["rollout"]["batch_size"], c["train"]["iterations"]
        P, new, epochs = c["data"]["max_prompt_len"], c["rollout"]["max_new_tokens"], c["ppo"]["epochs"]
        episodes, T = iters * B, P + new
        fwd = forward_flops_per_slot(cfg, T) * episodes * T
        sampling = fwd  # one forward pass per prompt and generated slot (prefill + decode)
        flops = sampling + 4 * fwd + epochs * 2 * 3 * fwd  # + scoring passes + policy and critic updates
        prompts = _count_lines(os.path.join(c["data"].get("dir") or data_dir, "rl_prompts.jsonl"))
        data = (f"{_num(prompts)} prompts; {episodes} sampled episodes ({iters} iterations × {B}), "
                f"≤ {new} new tokens each; sampling {_num(sampling, 'FLOP')} of the total")
        train_rows = [r for r in metrics if "score" in r and "eval_score" not in r]
        head, tail = train_rows[:5], train_rows[-5:]
        mean = lambda rows: sum(r["score"] for r in rows) / len(rows) if rows else None
        d_gold = (None if gold("PPO", "gold_sampled") is None or gold("SFT", "gold_sampled") is None
                  else gold("PPO", "gold_sampled") - gold("SFT", "gold_sampled"))
        challenge = (f"over-optimising a proxy: reward-model score {fmt(mean(head), 2)} → {fmt(mean(tail), 2)} (first "
                     f"and last 5 batches) while gold (sampled) moves {'–' if d_gold is None else f'{d_gold:+.3f}'} "
                     f"vs SFT, at KL {fmt(gold('PPO', 'kl_to_reference'))} nats")
    elif stage == "cai":
        B, T, steps = c["train"]["batch_size"], c["train"]["seq_len"], c["train"]["steps"]
        revisions = _read_jsonl(os.path.join(d, "revisions.jsonl"))
        examples = _count_lines(os.path.join(d, "sl_train.jsonl"))
        rounds = sum(len(r.get("rounds", [])) for r in revisions)
        new = c["sl"]["max_new_tokens"]
        sampling = forward_flops_per_slot(cfg, T) * (len(revisions) + 2 * rounds) * (T // 2 + new)
        slots = steps * B * T
        flops = sampling + 3 * forward_flops_per_slot(cfg, T) * slots
        data = (f"{len(revisions)} red-team answers revised ({rounds} critique-revision rounds); {_num(examples)} "
                f"training examples with SFT data mixed in; {_num(slots)} token slots")
        red = lambda name: results.get(name, {}).get("summary", {}).get("redteam_harmful_or_rude")
        refusals = lambda name: results.get(name, {}).get("summary", {}).get("refusal_rate/harmless")
        challenge = (f"harmless without refusing everything: red-team rude/harmful SFT {fmt(red('SFT'))} → CAI "
                     f"{fmt(red('CAI'))}; refuses harmless SFT {fmt(refusals('SFT'))} → CAI {fmt(refusals('CAI'))}")
    elif stage == "grpo":
        P, G, iters = c["rollout"]["prompts"], c["rollout"]["group_size"], c["train"]["iterations"]
        new = c["rollout"]["max_new_tokens"]
        T = c["data"]["max_prompt_len"] + new
        train_rows = [r for r in metrics if "accuracy" in r]
        calls = sum(1 + int(r.get("refills", 0)) for r in train_rows) or iters  # sampler calls, refills too
        sampled, trained = calls * P * G, iters * P * G
        fwd = forward_flops_per_slot(cfg, T) * T  # one completion's row
        sampling = fwd * sampled
        scoring = fwd * trained if c["grpo"]["beta"] > 0 else 0.0  # the frozen reference
        if c.get("reward_model", {}).get("path"):
            scoring += fwd * sampled  # a learned reward scores every sampled completion
        flops = sampling + scoring + c["grpo"]["epochs"] * 3 * fwd * trained
        prompts_file = c["data"].get("prompts_file") or os.path.join(c["data"].get("dir") or data_dir,
                                                                     "reasoning_prompts.jsonl")
        data = (f"{_num(_count_lines(prompts_file))} prompts with checkable answers; {_num(sampled)} completions "
                f"sampled ({iters} iterations × {P} prompts × {G}, {calls - iters} refill calls), ≤ {new} new tokens "
                f"each; sampling {_num(sampling, 'FLOP')} of the total")
        reasoning = lambda name: [r for r in results.get(name, {}).get("records", []) if r["family"] == "reasoning"]
        accuracy = lambda name: (sum(r.get("parts", {}).get("correct", 0.0) >= 1.0 for r in reasoning(name))
                                 / len(reasoning(name)) if reasoning(name) else None)
        thinks = lambda name: (sum(chat.split_reasoning(r["response"]).has_block for r in reasoning(name))
                               / len(reasoning(name)) if reasoning(name) else None)
        lengths = [r["completion_length"] for r in train_rows if "completion_length" in r]
        mean = lambda xs: sum(xs) / len(xs) if xs else None
        challenge = (f"reward from a program, not a judge of reasoning: reasoning accuracy (greedy) SFT "
                     f"{fmt(accuracy('SFT'))} → GRPO {fmt(accuracy('GRPO'))}; completion length "
                     f"{fmt(mean(lengths[:5]), 1)} → {fmt(mean(lengths[-5:]), 1)} tokens (first and last 5 "
                     f"iterations); answers that think SFT {fmt(thinks('SFT'), 2)} → GRPO {fmt(thinks('GRPO'), 2)}")
    else:
        return None
    return {"data": data, "flops": flops, "challenge": challenge}


def device_count(pipeline_dir: str, stage: str) -> int | None:
    """The devices the stage's run saw (all processes), from its config.json; None for older runs."""
    devices = _read_json(os.path.join(pipeline_dir, stage, "config.json")).get("devices") or {}
    return devices.get("count")


def comparison_table(pipeline_dir: str, results: dict[str, dict], timings: dict[str, float]) -> str:
    """The Markdown table (rows: goal, data, supervision, compute, wall time, key challenge), or ''."""
    cfg = _model_config(pipeline_dir)
    if cfg is None:
        return ""
    columns = []
    for stage, (title, goal, supervision) in GOALS.items():
        if not os.path.exists(os.path.join(pipeline_dir, stage, "DONE")):
            continue
        facts = stage_facts(pipeline_dir, stage, cfg, results)
        if facts is None:
            continue
        seconds, devices = timings.get(stage), device_count(pipeline_dir, stage)
        speed = f" ({_num(facts['flops'] / seconds, 'FLOP/s')})" if seconds else ""
        device_seconds = f"; {devices * seconds:.0f} device-seconds ({devices} × {seconds:.0f} s)" if (
            seconds and devices) else ""
        columns.append((title, {"goal": goal, "data": facts["data"], "supervision": supervision,
                                "compute": f"{_num(facts['flops'], 'FLOP')}{speed}{device_seconds}",
                                "wall time": "–" if seconds is None else f"{seconds:.0f} s",
                                "key challenge, measured": facts["challenge"]}))
    if not columns:
        return ""
    rows: list[tuple[str, Callable]] = [(k, lambda col, k=k: col[k]) for k in
                                        ("goal", "data", "supervision", "compute", "wall time",
                                         "key challenge, measured")]
    lines = ["| | " + " | ".join(title for title, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    for name, get in rows:
        lines.append(f"| **{name}** | " + " | ".join(get(col).replace("|", "/") for _, col in columns) + " |")
    return "\n".join(lines)
