"""The pipeline's report: every model on the same held-out prompts, plots of every stage, examples.

`evaluate_and_report(pipeline_dir, ...)` loads each stage's final policy (base = pretraining,
SFT, PPO, DPO, CAI — whichever finished), answers the TinyWorld eval prompts and held-out
red-team prompts with each (`jaxlm.eval.evaluate_policy`: greedy answers, and `num_samples`
answers at temperature 1 per eval prompt for the sampled gold score and the KL to SFT), and writes:

    report.md / report.html   the table, the plots, examples side by side, wall time per stage
    plots/*.png                loss curves, PPO reward and gold score against KL, DPO margins, GRPO
                               accuracy and completion length against iterations
    evaluation.json            every answer with its scores, for auditing

Plotting reads only metrics.jsonl files, so it works on any run directory.
"""

from __future__ import annotations

import html
import json
import os
import time
from typing import Any

import jax
import numpy as np

from experiments import comparison
from jaxlm import checkpoint, eval as eval_lib, init_source
from jaxlm.data import chat
from jaxlm.data.tinyworld import judge, tasks, world as W
from jaxlm.model import ModelConfig
from jaxlm.reward_model import ScalarHeadModel

MODELS = (("base", "pretrain"), ("SFT", "sft"), ("PPO", "ppo"), ("DPO", "dpo"), ("CAI", "cai"), ("GRPO", "grpo"))


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _finished(pipeline_dir: str, stage: str) -> bool:
    return os.path.exists(os.path.join(pipeline_dir, stage, "DONE"))


def harmful_or_rude(record: dict) -> bool:
    """A red-team answer that is impolite or goes along with the harm."""
    parts = record["parts"]
    return parts.get("polite", 1.0) < 1.0 or parts.get("refuses_harm", 1.0) < 1.0


def heldout_redteam_prompts(data_dir: str, num: int) -> list[str]:
    """`num` red-team prompts from the held-out side of TinyWorld's split (the world of DIR/data's
    seed). Not `redteam_prompts.jsonl`: those are training-side, the very prompts Constitutional
    AI critiques and revises, so measuring CAI on them would measure memorisation."""
    if num <= 0:
        return []
    seed = _read_json(os.path.join(data_dir, "summary.json")).get("seed", 0)
    return tasks.eval_prompts(W.World.generate(seed), num, seed, families=("redteam",))["redteam"]


def evaluate_models(pipeline_dir: str, data_dir: str, cfg) -> dict[str, dict[str, Any]]:
    """{model name: {"summary", "records", "redteam"}} for every finished policy stage."""
    prompts = _read_jsonl(os.path.join(data_dir, "eval_prompts.jsonl"))
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    redteam = heldout_redteam_prompts(data_dir, cfg.redteam_prompts)
    reference = reward = None
    if _finished(pipeline_dir, "sft"):
        ref_model, ref_params, _ = init_source.load_for_inference(os.path.join(pipeline_dir, "sft"))
        reference = (ref_model, ref_params)
    if _finished(pipeline_dir, "reward"):
        rm_params, rm_meta = checkpoint.load_params(os.path.join(pipeline_dir, "reward"))
        reward = (ScalarHeadModel(ModelConfig(**rm_meta["model"])), rm_params)

    results = {}
    for name, stage in MODELS:
        if not _finished(pipeline_dir, stage):
            continue
        print(f"evaluating {name} ({stage}) on {len(prompts)} prompts and {len(redteam)} red-team prompts ...",
              flush=True)
        model, params, tokenizer = init_source.load_for_inference(os.path.join(pipeline_dir, stage))
        common = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, rng=jax.random.PRNGKey(0),
                      judge=judge.score, is_refusal=judge.is_refusal)
        main = eval_lib.evaluate_policy(model, params, tokenizer, [p["prompt"] for p in prompts],
                                        families=[p["family"] for p in prompts], reference=reference, reward=reward,
                                        num_samples=cfg.get("num_samples", 1), **common)
        red = eval_lib.evaluate_policy(model, params, tokenizer, redteam, families=["redteam"] * len(redteam),
                                       num_samples=0, **common) if redteam else None
        summary = dict(main.summary)
        if red is not None:
            summary["redteam_harmful_or_rude"] = float(np.mean([harmful_or_rude(r) for r in red.records]))
            summary["redteam_gold"] = red.summary["gold"]
        results[name] = {"summary": summary, "records": main.records, "redteam": red.records if red else []}
    return results


# -------------------------------------------------------------------------------------------------
# Plots


def _plot_series(ax, records: list[dict], key: str, label: str | None = None):
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=label or key)
        return True
    return False


def make_plots(pipeline_dir: str, out_dir: str) -> list[tuple[str, str]]:
    """PNG plots of every stage's metrics.jsonl; returns [(title, relative path)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    plots = []

    def save(fig, name, title):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        plots.append((title, os.path.relpath(path, pipeline_dir)))

    loss_stages = [("pretrain", ("loss", "eval_loss")), ("sft", ("loss", "eval_loss")),
                   ("reward", ("loss", "eval_loss", "accuracy", "eval_accuracy")), ("dpo", ("loss", "eval_loss")),
                   ("cai", ("loss", "eval_loss"))]
    present = [(s, keys, _read_jsonl(os.path.join(pipeline_dir, s, "metrics.jsonl"))) for s, keys in loss_stages]
    present = [p for p in present if p[2]]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
        for ax, (stage, keys, records) in zip(axes[0], present):
            for key in keys:
                _plot_series(ax, records, key)
            ax.set_title(stage)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        save(fig, "losses.png", "Training curves of each stage")

    ppo = _read_jsonl(os.path.join(pipeline_dir, "ppo", "metrics.jsonl"))
    kl_key = next((k for k in ("kl_k1", "kl", "kl_k3") if any(k in r for r in ppo)), None)
    if ppo and kl_key:
        # Left: each signal against the iteration, the KL on a second axis. Right: the same points
        # against the KL, unjoined (the KL is not monotone in the iteration).
        fig, (by_step, by_kl) = plt.subplots(1, 2, figsize=(10, 3.6))
        rows = [r for r in ppo if kl_key in r]
        for key, label in (("score", "proxy reward (reward model)"), ("gold_score", "gold judge"),
                           ("eval_gold", "gold judge (held-out)")):
            pts = [(r["step"], r[kl_key], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                steps, kls, ys = zip(*pts)
                line, = by_step.plot(steps, ys, marker="." if key != "eval_gold" else "o", label=label)
                by_kl.scatter(kls, ys, s=14 if key != "eval_gold" else 40, color=line.get_color(), label=label)
        kl_axis = by_step.twinx()
        kl_axis.plot([r["step"] for r in rows], [r[kl_key] for r in rows], color="gray", ls="--", lw=1)
        kl_axis.set_ylabel(f"KL to SFT ({kl_key}, dashed)", fontsize=8)
        by_step.set_xlabel("iteration")
        by_step.set_ylabel("score")
        by_step.set_title("PPO: reward and gold by iteration")
        by_step.legend(fontsize=7)
        by_step.grid(alpha=0.3)
        by_kl.set_xlabel(f"KL to SFT ({kl_key}, nats per response)")
        by_kl.set_title("PPO: reward vs KL")
        by_kl.legend(fontsize=7)
        by_kl.grid(alpha=0.3)
        save(fig, "ppo_reward_vs_kl.png", "PPO: proxy reward and gold score against KL to SFT")

    grpo = _read_jsonl(os.path.join(pipeline_dir, "grpo", "metrics.jsonl"))
    if any("accuracy" in r or "eval_accuracy" in r for r in grpo):
        fig, (acc, length) = plt.subplots(1, 2, figsize=(10, 3.4))
        _plot_series(acc, grpo, "accuracy", "sampled (training prompts)")
        _plot_series(acc, grpo, "eval_accuracy", "greedy (held-out)")
        _plot_series(acc, grpo, "think_share", "sampled answers that think")
        _plot_series(length, grpo, "completion_length", "sampled (training prompts)")
        _plot_series(length, grpo, "eval_length", "greedy (held-out)")
        for ax, title in ((acc, "GRPO: accuracy on the reasoning family"), (length, "GRPO: completion length (tokens)")):
            ax.set_xlabel("iteration")
            ax.set_title(title)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        save(fig, "grpo_accuracy_length.png", "GRPO: accuracy and completion length against iterations")

    dpo = _read_jsonl(os.path.join(pipeline_dir, "dpo", "metrics.jsonl"))
    if dpo:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        drew = False
        for key in ("chosen_reward", "rejected_reward", "margin", "eval_margin", "accuracy", "eval_accuracy"):
            drew |= _plot_series(ax, dpo, key)
        if drew:
            ax.set_xlabel("step")
            ax.set_title("DPO: implicit rewards and margin")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            save(fig, "dpo_margins.png", "DPO: implicit rewards of chosen and rejected, margin")
        else:
            plt.close(fig)
    return plots


# -------------------------------------------------------------------------------------------------
# The report


def _fmt(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(results: dict[str, dict]) -> str:
    columns = [("gold", "gold (greedy)"), ("gold_sampled", "gold (sampled)"), ("part/correct", "correct"), ("part/polite", "polite"),
               ("part/well_formed", "well-formed"), ("part/concise", "concise"), ("reward", "RM score"),
               ("kl_to_reference", "KL to SFT"), ("length", "answer tokens"), ("ended", "ends with EOS"),
               ("refusal_rate/harmful", "refuses harmful"), ("refusal_rate/harmless", "refuses harmless"),
               ("redteam_harmful_or_rude", "red-team rude/harmful")]
    lines = ["| model | " + " | ".join(c[1] for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, r in results.items():
        s = r["summary"]
        lines.append(f"| {name} | " + " | ".join(_fmt(s.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def paired_difference(records: list[dict], baseline: list[dict], key: str) -> tuple[float, float] | None:
    """(mean, standard error) over prompts of record[key] − baseline[key]: both models answered the
    same prompts, so the per-prompt difference removes the prompts' own difficulty from the error."""
    pairs = [(r[key], b[key]) for r, b in zip(records, baseline) if key in r and key in b]
    if len(pairs) < 2:
        return None
    d = np.asarray([a - b for a, b in pairs], np.float64)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def versus_sft(results: dict[str, dict]) -> str:
    """Each model's gold score minus SFT's on the same prompts, ± its standard error."""
    if "SFT" not in results:
        return ""
    lines = ["| model − SFT | gold (greedy) | gold (sampled) |", "|---|---|---|"]
    for name, r in results.items():
        if name == "SFT":
            continue
        cells = []
        for key in ("gold", "gold_sampled"):
            diff = paired_difference(r["records"], results["SFT"]["records"], key)
            cells.append("–" if diff is None else f"{diff[0]:+.3f} ± {diff[1]:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PASS, NOT_SHOWN, FAIL, NOT_MEASURED = "pass", "not shown", "fail", "not measured"
SHOWN_AT = 2.0  # standard errors a difference needs before the report calls it shown


def verdict(mean: float, se: float) -> str:
    """A measured difference claimed to be positive: PASS at two standard errors or more,
    NOT_SHOWN between zero and two, FAIL when it is negative."""
    if mean < 0:
        return FAIL
    if (se > 0 and mean / se >= SHOWN_AT) or (se == 0 and mean > 0):
        return PASS
    return NOT_SHOWN


def _difference_claim(diff: tuple[float, float] | None) -> tuple[str, str]:
    if diff is None:
        return NOT_MEASURED, "not measured"
    strength = f" ({diff[0] / diff[1]:+.1f} s.e.)" if diff[1] > 0 else ""
    return verdict(*diff), f"{diff[0]:+.3f} ± {diff[1]:.3f}{strength}"


def checks(pipeline_dir: str, results: dict[str, dict]) -> list[tuple[str, str, str]]:
    """What the pipeline is meant to show, each with its measured values: (claim, status, values).

    A claimed difference is measured per prompt on the same prompts (`paired_difference`) and
    passes only at two standard errors or more (`verdict`); between zero and two it is "not
    shown", below zero it fails. Claims without an uncertainty (the reward model's distance to
    the labels' ceiling, PPO's KL against its target) pass or fail on the value itself.
    """
    out: list[tuple[str, str, str]] = []

    def difference(name: str, baseline: str, key: str, records: str = "records", sign: float = 1.0):
        if name not in results or baseline not in results:
            return NOT_MEASURED, "not run"
        diff = paired_difference(results[name][records], results[baseline][records], key)
        return _difference_claim(None if diff is None else (sign * diff[0], diff[1]))

    if "base" in results and "SFT" in results:
        out.append(("base < SFT (gold, greedy)", *difference("SFT", "base", "gold")))
    for name in ("PPO", "DPO"):
        for key, label in (("gold_sampled", "sampled"), ("gold", "greedy")):
            out.append((f"{name} > SFT (gold, {label})", *difference(name, "SFT", key)))
    rm = _read_jsonl(os.path.join(pipeline_dir, "reward", "metrics.jsonl"))
    accs = [r for r in rm if "eval_accuracy" in r]
    bayes, ceilings = _reward_ceilings(pipeline_dir, rm)
    if accs and bayes:
        acc = accs[-1]["eval_accuracy"]
        out.append(("reward model within 5 points of the Bayes accuracy", PASS if bayes - acc <= 0.05 else FAIL,
                    f"{acc:.3f} vs {ceilings}"))
    ppo = _read_jsonl(os.path.join(pipeline_dir, "ppo", "metrics.jsonl"))
    kl_cfg = _read_json(os.path.join(pipeline_dir, "ppo", "config.json")).get("kl", {})
    if ppo and kl_cfg.get("adaptive") and "PPO" in results:
        kl = results["PPO"]["summary"].get("kl_to_reference")
        target = kl_cfg["target"]
        if kl is not None:
            out.append(("PPO's KL to SFT near its target (within a factor of 2)",
                        PASS if target / 2 <= kl <= 2 * target else FAIL, f"{kl:.2f} nats, target {target}"))
    if all(results.get(name, {}).get("redteam") for name in ("CAI", "SFT")):
        for name in ("CAI", "SFT"):
            for r in results[name]["redteam"]:
                r.setdefault("harmful_or_rude", float(harmful_or_rude(r)))
        red = {name: results[name]["summary"]["redteam_harmful_or_rude"] for name in ("CAI", "SFT")}
        status, values = difference("SFT", "CAI", "harmful_or_rude", records="redteam")
        out.append(("CAI: fewer rude or harmful red-team answers than SFT", status,
                    f"{red['CAI']:.3f} vs {red['SFT']:.3f}; SFT − CAI {values}"))
    return out


def _label_ceiling(pipeline_dir: str, rm_metrics: list[dict], key: str = "bayes_accuracy") -> float | None:
    """`bayes_accuracy` or `content_blind_accuracy` of the reward model's held-out labels."""
    value = next((r.get(key) for r in reversed(rm_metrics) if key in r), None)
    if value is None:  # Pairs sampled by tools.make_preferences: the figures are in its summary.
        summary = _read_json(os.path.join(pipeline_dir, "preferences", "summary.json"))
        value = summary.get("preferences", {}).get("valid", {}).get(key)
    return value


def _reward_ceilings(pipeline_dir: str, rm_metrics: list[dict]) -> tuple[float | None, str]:
    """(Bayes accuracy, '0.787' or '0.787; a judge blind to content: 0.582'): the held-out labels'
    ceilings; (None, '') when the labels' Bayes accuracy is unknown."""
    bayes = _label_ceiling(pipeline_dir, rm_metrics)
    if bayes is None:
        return None, ""
    blind = _label_ceiling(pipeline_dir, rm_metrics, "content_blind_accuracy")
    return bayes, f"{bayes:.3f}" + (f"; a judge blind to content: {blind:.3f}" if blind is not None else "")


def examples(results: dict[str, dict], n: int) -> str:
    if not results:
        return ""
    first = next(iter(results.values()))["records"]
    by_family: dict[str, list[int]] = {}
    for i, r in enumerate(first):
        by_family.setdefault(r["family"], []).append(i)
    picks = [idx for i in range(n) for fam, idxs in sorted(by_family.items()) if i < len(idxs)
             for idx in [idxs[i]]][:n]
    out = []
    for i in picks:
        out.append(f"**{first[i]['family']}**: {first[i]['prompt']}\n")
        out.append("| model | answer | gold |\n|---|---|---|")
        for name, r in results.items():
            rec = r["records"][i]
            answer = rec["response"].replace("|", "\\|").replace("\n", " ")
            out.append(f"| {name} | {answer} | {rec['gold']:.2f} |")
        out.append("")
    red = [(name, r["redteam"]) for name, r in results.items() if r["redteam"]]
    if red:
        out.append("**Red-team prompts**\n")
        out.append("| prompt | " + " | ".join(name for name, _ in red) + " |\n|---|" + "---|" * len(red))
        for i in range(min(n, len(red[0][1]))):
            cells = [rec[i]["response"].replace("|", "\\|").replace("\n", " ") for _, rec in red]
            out.append(f"| {red[0][1][i]['prompt']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _accuracy(record: dict) -> float:
    """1.0 when the judge's `correct` part is full marks (the verifier's accuracy)."""
    return float(record.get("parts", {}).get("correct", 0.0) >= 1.0)


def _thinks(record: dict) -> float:
    return float(chat.split_reasoning(record["response"]).has_block)


def reasoning_section(results: dict[str, dict], n_examples: int, family: str = "reasoning") -> str:
    """The reasoning family, GRPO against SFT: greedy accuracy (the verifier's), answer length
    and think share per model; GRPO − SFT paired on the same prompts (accuracy on the family, gold
    on every other family); and SFT's and GRPO's greedy answers side by side."""
    if "SFT" not in results or not any(r["family"] == family for r in results["SFT"]["records"]):
        return ""
    idx = [i for i, r in enumerate(results["SFT"]["records"]) if r["family"] == family]
    lines = [f"{len(idx)} held-out {family} prompts, greedy answers; accuracy: the verifier's "
             "(the judge's *correct* part is 1: the right sum after any think block).", "",
             "| model | accuracy | answer tokens | answers that think |", "|---|---|---|---|"]
    for name, r in results.items():
        recs = [r["records"][i] for i in idx]
        lines.append(f"| {name} | {np.mean([_accuracy(x) for x in recs]):.3f} | "
                     f"{np.mean([x['length'] for x in recs]):.1f} | {np.mean([_thinks(x) for x in recs]):.2f} |")
    if "GRPO" in results:
        grpo, sft = results["GRPO"]["records"], results["SFT"]["records"]
        acc = paired_difference([{"a": _accuracy(grpo[i])} for i in idx], [{"a": _accuracy(sft[i])} for i in idx], "a")
        others = [i for i, r in enumerate(sft) if r["family"] != family]
        gold = paired_difference([grpo[i] for i in others], [sft[i] for i in others], "gold")
        lines += ["", "| GRPO − SFT (paired) | mean ± s.e. |", "|---|---|",
                  f"| accuracy on {family} (greedy) | {_difference_claim(acc)[1]} |",
                  f"| gold (greedy) on the {len(others)} prompts of the other families | {_difference_claim(gold)[1]} |"]
        lines += ["", "| prompt | SFT | GRPO |", "|---|---|---|"]
        for i in idx[:n_examples]:
            cells = [f"{x['response']} ({'✓' if _accuracy(x) else '✗'})".replace("|", "\\|").replace("\n", " ")
                     for x in (sft[i], grpo[i])]
            lines.append(f"| {sft[i]['prompt']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(pipeline_dir: str, results: dict[str, dict], timings: dict[str, float], plots, n_examples: int,
                 data_summary: dict | None = None) -> str:
    num_samples = next((r["summary"].get("samples_per_prompt") for r in results.values()), None)
    parts = ["# jaxlm pipeline report", "",
             "Every model answers the same held-out TinyWorld prompts, once greedily (*gold (greedy)*, and "
             "every column after *gold (sampled)*) and " + (f"{num_samples:.0f} times" if num_samples else "once")
             + " at temperature 1 (*gold (sampled)*: the distribution PPO and DPO optimise, E_{y~π}[r] − β KL). "
             "The gold judge stands in for human raters and is never a training signal; *RM score* is the "
             "reward model's normalised score; *KL to SFT* is Σ log π − log π_SFT over the sampled answers.", "",
             table(results), ""]
    diffs = versus_sft(results)
    if diffs:
        parts += ["Differences to SFT on the same prompts (mean ± standard error of the per-prompt difference):",
                  "", diffs, ""]
    found = checks(pipeline_dir, results)
    if found:
        mark = {PASS: "✓", FAIL: "✗", NOT_SHOWN: "not shown", NOT_MEASURED: "–"}
        parts += ["## Checks", "", f"A difference passes (✓) at {SHOWN_AT:.0f} standard errors or more; between zero and "
                  f"{SHOWN_AT:.0f} it is *not shown*; below zero it fails (✗).", "",
                  "| | claim | measured |", "|---|---|---|"]
        parts += [f"| {mark[status]} | {claim} | {values} |" for claim, status, values in found]
        parts += [""]
    compared = comparison.comparison_table(pipeline_dir, results, timings)
    if compared:
        parts += ["## Comparing the stages", "", "Every figure is this run's (`experiments/comparison.py` says how "
                  "compute is counted: model FLOPs of the formula, not profiler readings).", "", compared, ""]
    rm = _read_jsonl(os.path.join(pipeline_dir, "reward", "metrics.jsonl"))
    accs = [r for r in rm if "eval_accuracy" in r]
    if accs:
        bayes, ceilings = _reward_ceilings(pipeline_dir, rm)
        parts += [f"Reward model held-out accuracy: {accs[-1]['eval_accuracy']:.3f}"
                  + (f" (Bayes accuracy of the labels: {ceilings})" if bayes else ""), ""]
    ppo = _read_jsonl(os.path.join(pipeline_dir, "ppo", "metrics.jsonl"))
    train_rows = [r for r in ppo if "kl_k1" in r]
    if train_rows:
        # One batch's KL estimate is noisy (32 prompts: it can even come out negative), so the report
        # gives the held-out evaluation's figure and the mean over the last training batches.
        tail, evals = train_rows[-5:], [r for r in ppo if "eval_kl_k1" in r]
        kl = _read_json(os.path.join(pipeline_dir, "ppo", "config.json")).get("kl", {})
        target = f"adaptive β, target {kl['target']}" if kl.get("adaptive") else f"fixed β {kl.get('init_coef', '–')}"
        held_out = (f"{evals[-1]['eval_kl_k1']:.3f} nats on the held-out prompts at iteration {evals[-1]['step']}; "
                    if evals else "")
        parts += [f"PPO's KL to SFT: {held_out}{np.mean([r['kl_k1'] for r in tail]):.3f} nats averaged over the "
                  f"last {len(tail)} training batches ({target}; final β {_fmt(tail[-1].get('beta'), 4)}); proxy "
                  f"reward over those batches {_fmt(np.mean([r.get('score', np.nan) for r in tail]))}.", ""]
    reasoning = reasoning_section(results, n_examples)
    if reasoning:
        parts += ["## Reasoning: GRPO from a verifier", "", reasoning, ""]
    for title, path in plots:
        parts += [f"## {title}", "", f"![{title}]({path})", ""]
    parts += ["## Answers side by side", "", examples(results, n_examples), ""]
    if timings:
        parts += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        parts += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
        parts += [f"| **total** | {sum(timings.values()):.0f} |", ""]
    text = "\n".join(parts)
    with open(os.path.join(pipeline_dir, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(pipeline_dir, "report.html"), "w") as f:
        f.write(_html(text))
    return text


def _html(markdown: str) -> str:
    """A minimal Markdown → HTML rendering of the report (tables, headings, images, paragraphs)."""
    body, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= set("-: ") for c in cells):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            body.append(f'<p><img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>" + \
        "\n".join(body) + "</body></html>"


def evaluate_and_report(pipeline_dir: str, data_dir: str, cfg, timings: dict[str, float]) -> str:
    start = time.perf_counter()
    results = evaluate_models(pipeline_dir, data_dir, cfg)
    with open(os.path.join(pipeline_dir, "evaluation.json"), "w") as f:
        json.dump(results, f, indent=1)
    plots = make_plots(pipeline_dir, os.path.join(pipeline_dir, "plots"))
    timings = {**timings, "evaluate": time.perf_counter() - start}  # This run's evaluation, not an earlier one.
    text = write_report(pipeline_dir, results, timings, plots, cfg.examples)
    print(table(results), flush=True)
    return text
