r"""The textbook's claims, measured: each study a plot and two sentences in DIR/studies.md.

    python -m experiments.studies --workdir=DIR [--pipeline_dir=PIPELINE] \
        [--config=experiments/configs/studies_tiny.py]

Studies (`--config.studies`, run in that order):
  kl      the KL penalty keeps the policy close and prevents degeneration: PPO at β = 0, a fixed β
          and the pipeline's adaptive β; proxy reward, gold score and KL against iterations
  clip    PPO's clipping keeps updates small: clipping on versus off at a larger learning rate
  dpo     DPO replaces the RL loop: DPO at several β on the reward model's own pairs against the
          PPO runs, gold score against KL to SFT and against compute
  facts   fine-tuning does not teach new facts: facts only in the pre-training corpus against
          facts only in SFT answers, recall on phrasings SFT never asked (jaxlm.data.tinyworld.probes)
  scale   in-context learning appears with scale: cloze accuracy on made-up contexts for model
          sizes × pre-training budgets, against compute
  reward  the reward model learns what raters can tell apart: held-out accuracy per family from
          pre-trained trunks of growing compute, against the Bayes and content-blind ceilings

Every training run is a stage binary started as a subprocess, like the pipeline's, in
DIR/runs/<run>/<stage>/, with the configuration of the pipeline's own run of that stage
(experiments/configs/from_run.py on PIPELINE/<stage>/config.json) changed only by the study's
flags; the pipeline's finished runs are reused as they are (its pretraining, SFT, reward model,
PPO and DPO runs are the studies' starting points). Without --pipeline_dir the pipeline of
`--config.pipeline` runs first into DIR/pipeline. A finished run leaves DONE in its directory,
a finished study DIR/<study>/DONE (with result.json); rerunning the command skips both and
resumes an interrupted run from its checkpoint.

Each study's measured sentence gives standard errors where the quantity has one and the
report's verdict (`experiments.report.verdict`): shown at 2 standard errors or more, not shown
between 0 and 2, contradicted below 0. The sentences come from the numbers alone
(`*_sentences` functions), whatever they show.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from typing import Any

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/studies_tiny.py", "Studies config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the studies' runs, plots and studies.md.",
                               required=True)
_PIPELINE_DIR = flags.DEFINE_string("pipeline_dir", None, "A finished pipeline run (experiments.pipeline) whose "
                                    "stages the studies start from. Empty: run --config.pipeline into DIR/pipeline.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FROM_RUN = os.path.join(ROOT, "experiments", "configs", "from_run.py")
NEEDED_STAGES = ("data", "tokenizer", "pretrain", "sft", "preferences", "reward", "ppo", "dpo")
# The pipeline stages each study starts from (finished: DONE), so a study can run before the rest.
STUDY_NEEDS = {"kl": ("data", "sft", "reward", "ppo"), "clip": ("data", "sft", "reward", "ppo"),
               "dpo": ("data", "preferences", "sft", "reward", "ppo", "dpo"),
               "facts": ("data", "tokenizer", "pretrain", "sft"), "scale": ("data", "tokenizer", "pretrain"),
               "reward": ("data", "tokenizer", "pretrain", "preferences")}
# Stages whose config a study's runs start from, but not their results: running is enough (config.json).
STUDY_CONFIGS = {"reward": ("reward",)}
STUDIES = tuple(STUDY_NEEDS)
# PPO runs skip their own held-out evals: every policy is evaluated once, the same way, afterwards.
NO_EVAL = ("--config.eval.every=0",)
RULE = "shown at ≥ 2 s.e., not shown between 0 and 2, contradicted below 0"
WORDS = {"pass": "shown", "not shown": "not shown", "fail": "contradicted", "not measured": "not measured"}


# -------------------------------------------------------------------------------------------------
# Numbers: differences with standard errors, verdicts


def mean_se(xs) -> tuple[float, float]:
    """(mean, standard error of the mean); se 0 for fewer than two values."""
    x = np.asarray(list(xs), np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def unpaired_difference(a, b) -> tuple[float, float]:
    """mean(a) − mean(b) and its standard error, sqrt(se_a² + se_b²): independent samples."""
    (ma, sa), (mb, sb) = mean_se(a), mean_se(b)
    return ma - mb, float(np.hypot(sa, sb))


def paired(a, b) -> tuple[float, float]:
    """mean(a − b) and its standard error over paired items (the same prompts, items or pairs)."""
    return mean_se(np.asarray(a, np.float64) - np.asarray(b, np.float64))


def judged(diff: tuple[float, float] | None) -> str:
    """The report's verdict on a difference claimed positive, in words: shown / not shown / contradicted."""
    from experiments.report import verdict
    if diff is None or not np.isfinite(diff[0]):
        return WORDS["not measured"]
    return WORDS[verdict(diff[0], diff[1] if np.isfinite(diff[1]) else 0.0)]


def weakest(*verdicts: str) -> str:
    """A claim made of several parts is as strong as its weakest part."""
    order = ("contradicted", "not measured", "not shown", "shown")
    return min(verdicts, key=order.index)


def pm(diff: tuple[float, float], digits: int = 3, signed: bool = True) -> str:
    """'+0.041 ± 0.012 (+3.4 s.e.)' (signed) or '0.412 ± 0.020'."""
    m, se = diff
    text = f"{m:+.{digits}f}" if signed else f"{m:.{digits}f}"
    text += f" ± {se:.{digits}f}"
    if signed and se > 0:
        text += f" ({m / se:+.1f} s.e.)"
    return text


def flops(x: float) -> str:
    from experiments.comparison import _num
    return _num(x, "FLOP")


# -------------------------------------------------------------------------------------------------
# The sentences: claim and measurement, from numbers alone (tests feed them made-up numbers)


def kl_sentences(m: dict) -> tuple[str, str, str]:
    """m: iterations, last, prompts, fixed_beta, kl {label: (mean, se)}, gold_vs_free {label: diff},
    labels {free, fixed, adaptive}, peak (value, iteration), final (mean, se)."""
    L = m["labels"]
    claim = ("The KL penalty keeps the policy close to the SFT model and prevents degeneration: PPO without it "
             "(β = 0) drifts further from SFT and ends with a lower gold score than a penalised run (Gao et al. "
             "2022: the gold score rises, then falls as the KL grows).")
    kl_gap = unpaired_from(m["kl"][L["free"]], m["kl"][L["fixed"]])
    v_kl, v_gold = judged(kl_gap), judged(m["gold_vs_free"][L["fixed"]])
    kls = ", ".join(f"{pm(m['kl'][label], 2, signed=False)} ({label})" for label in m["kl"])
    peak, final = m["peak"], m["final"]
    curve = peak[0] - final[0] >= 2 * final[1] and final[1] > 0 and peak[1] < m["iterations"] - m["last"] + 1
    adaptive = ""
    if L.get("adaptive") in m["gold_vs_free"]:
        adaptive = f"; {L['adaptive']} minus β = 0: {pm(m['gold_vs_free'][L['adaptive']])}"
    measured = (f"After {m['iterations']} iterations the KL to SFT (mean of the last {m['last']} batches ± s.e.) was "
                f"{kls}; β = 0 minus {L['fixed']}: {pm(kl_gap, 2)}, {v_kl}. Gold (sampled, {m['prompts']} held-out "
                f"prompts) of {L['fixed']} minus β = 0: {pm(m['gold_vs_free'][L['fixed']])}, {v_gold}{adaptive}. "
                f"The β = 0 run's training gold ({m['last']}-batch means) peaked at {peak[0]:.3f} (iteration "
                f"{peak[1]}) and ended at {pm(final, signed=False)}: the over-optimisation curve "
                f"{'shows' if curve else 'does not show'}. Verdict ({RULE}): {weakest(v_kl, v_gold)}.")
    return claim, measured, weakest(v_kl, v_gold)


def unpaired_from(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """(mean, se) of a − b from two independent (mean, se)."""
    return a[0] - b[0], float(np.hypot(a[1], b[1]))


def clip_sentences(m: dict) -> tuple[str, str, str]:
    """m: learning_rate, iterations, last, prompts, labels {on, off}, score/kl {label: (mean, se)},
    clip_fraction (mean, se) of the clipped run, gold_on_minus_off (diff)."""
    on, off = m["labels"]["on"], m["labels"]["off"]
    claim = ("PPO keeps each update small (its clipped probability ratio), so the policy cannot hack the reward "
             "model catastrophically: with clipping off, at the same budget, the proxy reward runs ahead and the "
             "gold score ends lower.")
    v = judged(m["gold_on_minus_off"])
    measured = (f"At learning rate {m['learning_rate']:g} for {m['iterations']} iterations: reward-model score of the "
                f"last {m['last']} batches {pm(m['score'][on], 2, False)} ({on}) vs {pm(m['score'][off], 2, False)} "
                f"({off}); KL to SFT {pm(m['kl'][on], 2, False)} vs {pm(m['kl'][off], 2, False)} nats; share of "
                f"clipped tokens with clipping {m['clip_fraction'][0]:.3f}; gold (sampled, {m['prompts']} held-out "
                f"prompts) clipped minus unclipped: {pm(m['gold_on_minus_off'])}. Verdict ({RULE}): {v}.")
    return claim, measured, v


def dpo_sentences(m: dict) -> tuple[str, str, str]:
    """m: prompts, main {dpo, ppo} labels, points {label: {kind, kl, gold (diff vs SFT), flops}},
    dpo_minus_ppo (diff)."""
    d, p = m["points"][m["main"]["dpo"]], m["points"][m["main"]["ppo"]]
    claim = ("DPO replaces the RL loop: on the same preferences as PPO's reward model, with no reward model and no "
             "sampling, it raises the gold score over SFT as PPO does, at a like KL and for less compute.")
    v_sft, v_ppo = judged(d["gold"]), judged(m["dpo_minus_ppo"])
    others = "; ".join(f"{label} {pt['gold'][0]:+.3f} at {pt['kl']:.2f} nats" for label, pt in m["points"].items()
                       if label not in m["main"].values())
    measured = (f"Gold (sampled) minus SFT on {m['prompts']} held-out prompts: {m['main']['dpo']} {pm(d['gold'])} at "
                f"KL {d['kl']:.2f} nats for {flops(d['flops'])}, {v_sft}; {m['main']['ppo']} {pm(p['gold'])} at "
                f"{p['kl']:.2f} nats for {flops(p['flops'])}; DPO minus PPO {pm(m['dpo_minus_ppo'])}, {v_ppo} "
                f"(other runs: {others or 'none'}). Verdict ({RULE}; both parts): {weakest(v_sft, v_ppo)}.")
    return claim, measured, weakest(v_sft, v_ppo)


def facts_sentences(m: dict) -> tuple[str, str, str]:
    """m: recall {"group/phrasing": (mean, se, n)}, difference (diff), base {group: (mean, se)}, chance."""
    r = m["recall"]
    claim = ("Fine-tuning does not teach new facts; it reshapes how the model uses what it knows: after SFT the "
             "model answers a new phrasing of a question about facts it read in pre-training, but not about facts "
             "it saw only in SFT answers.")
    v = judged(m["difference"])
    cell = lambda key: f"{pm(r[key][:2], signed=False)} ({r[key][2]} facts)"
    measured = (f"Greedy recall after SFT on the phrasing SFT never asked: facts only in pre-training "
                f"{cell('pretrain/new')}, "
                f"facts only in SFT answers {cell('sft/new')}, difference {pm(m['difference'])}; on the question SFT "
                f"trained the SFT-only facts on: {cell('sft/trained')}; before SFT, the base model's closed-book cloze "
                f"recall: pre-training-only {m['base']['pretrain'][0]:.3f}, SFT-only {m['base']['sft'][0]:.3f} "
                f"(chance {m['chance']:.3f}). Verdict ({RULE}): {v}.")
    return claim, measured, v


def scale_sentences(m: dict) -> tuple[str, str, str]:
    """m: items, points {label: {accuracy (mean, se), flops}} (in compute order), rise (diff, largest minus
    smallest compute), above_copy (diff: largest compute minus copying a random context value), chance, copy."""
    claim = ("Capabilities such as in-context learning appear with scale: reading a fact off the context (not "
             "memory) improves with model size and pre-training compute, from copying any value the context states "
             "to picking the right one.")
    v_rise, v_copy = judged(m["rise"]), judged(m["above_copy"])
    points = "; ".join(f"{label} {pt['accuracy'][0]:.3f} ({flops(pt['flops'])})" for label, pt in m["points"].items())
    shares = [pt["copied"] for pt in m["points"].values() if "copied" in pt]
    copying = (f" Share of answers that are some value the context states: {shares[0]:.3f} at the smallest compute, "
               f"{shares[-1]:.3f} at the largest (a context-blind pick from the pool: {m['blind_copy']:.3f})."
               if shares and "blind_copy" in m else "")
    measured = (f"Cloze accuracy on {m['items']} made-up contexts (chance {m['chance']:.3f}, copying a random context "
                f"value {m['copy']:.3f}): {points}. Largest minus smallest compute: {pm(m['rise'])}, {v_rise}; "
                f"largest compute minus copying: {pm(m['above_copy'])}, {v_copy}.{copying} "
                f"Verdict ({RULE}; both parts): "
                f"{weakest(v_rise, v_copy)}.")
    return claim, measured, weakest(v_rise, v_copy)


def reward_sentences(m: dict) -> tuple[str, str, str]:
    """m: pairs, points {label: {flops, families {family: {accuracy, bayes_accuracy, content_blind_accuracy}}}}
    (compute order; family "all" included), rise (diff: largest minus smallest compute, all pairs)."""
    labels = list(m["points"])
    lo, hi = m["points"][labels[0]]["families"]["all"], m["points"][labels[-1]]["families"]["all"]
    claim = ("The reward model learns what raters can tell apart: with more pre-training compute behind its trunk, "
             "its held-out accuracy rises toward the Bayes ceiling of the raters' noisy labels, family by family.")
    v = judged(m["rise"])
    fams = "; ".join(f"{f} {row['accuracy']:.2f} / {row['bayes_accuracy']:.2f} / {row['content_blind_accuracy']:.2f}"
                     for f, row in m["points"][labels[-1]]["families"].items() if f != "all")
    measured = (f"Held-out accuracy on {m['pairs']} pairs: {lo['accuracy']:.3f} from {labels[0]} to "
                f"{hi['accuracy']:.3f} from {labels[-1]} (difference {pm(m['rise'])}), against a Bayes ceiling of "
                f"{hi['bayes_accuracy']:.3f} "
                f"and a content-blind judge's {hi['content_blind_accuracy']:.3f}; per family at the largest compute "
                f"(accuracy / Bayes / content-blind): {fams}. Verdict ({RULE}): {v}.")
    return claim, measured, v


# -------------------------------------------------------------------------------------------------
# Plots


def _figure(ncols: int, width: float = 4.2, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_series(path: str, series: dict[str, list[dict]], keys: list[tuple[str, str]],
                scatter: tuple[str, str, str, str] | None = None) -> str:
    """One panel per (metrics key, title) against iteration, one line per run; `scatter`: a last
    panel (x key, y key, x label, title), a point per iteration (e.g. gold against KL)."""
    plt, fig, axes = _figure(len(keys) + (scatter is not None))
    for ax, (key, title) in zip(axes, keys):
        for label, rows in series.items():
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=label)
        ax.set_title(title)
        ax.set_xlabel("iteration")
    if scatter is not None:
        ax = axes[-1]
        for label, rows in series.items():
            points = [(r[scatter[0]], r[scatter[1]]) for r in rows if scatter[0] in r and scatter[1] in r]
            if points:
                ax.plot(*zip(*points), ".", alpha=0.6, label=label)
        ax.set_xlabel(scatter[2])
        ax.set_title(scatter[3])
    axes[0].legend(fontsize=7)
    return _save(plt, fig, path)


def plot_frontier(path: str, points: dict[str, dict]) -> str:
    """Gold minus SFT (± s.e.) against KL to SFT and against compute, PPO and DPO marked apart."""
    plt, fig, axes = _figure(2)
    for label, pt in points.items():
        style = "o" if pt["kind"] == "dpo" else "s"
        for ax, x in zip(axes, (pt["kl"], pt["flops"])):
            ax.errorbar([x], [pt["gold"][0]], yerr=[pt["gold"][1]], fmt=style, capsize=3, label=label)
    for ax, xlabel in zip(axes, ("KL to SFT (nats)", "training compute (FLOPs)")):
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("gold (sampled) − SFT")
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=7)
    return _save(plt, fig, path)


def plot_bars(path: str, bars: dict[str, tuple[float, float]], chance: float, title: str) -> str:
    plt, fig, axes = _figure(1, width=6.0)
    ax = axes[0]
    labels = list(bars)
    ax.bar(range(len(labels)), [bars[k][0] for k in labels], yerr=[bars[k][1] for k in labels], capsize=3)
    ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=7)
    ax.axhline(chance, color="grey", ls="--", lw=0.8, label="chance")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_scale(path: str, points: dict[str, dict], chance: float, copy: float) -> str:
    plt, fig, axes = _figure(1, width=5.0)
    ax = axes[0]
    by_size: dict[str, list] = {}
    for pt in points.values():
        by_size.setdefault(pt["size"], []).append(pt)
    for size, pts in by_size.items():
        pts = sorted(pts, key=lambda p: p["flops"])
        ax.errorbar([p["flops"] for p in pts], [p["accuracy"][0] for p in pts], yerr=[p["accuracy"][1] for p in pts],
                    marker="o", capsize=3, label=size)
    ax.axhline(chance, color="grey", ls="--", lw=0.8, label="chance")
    ax.axhline(copy, color="grey", ls=":", lw=0.8, label="copy a context value")
    ax.set_xscale("log")
    ax.set_xlabel("pre-training compute (FLOPs)")
    ax.set_ylabel("in-context cloze accuracy")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_reward(path: str, points: dict[str, dict]) -> str:
    """Accuracy per family against pre-training compute; dashed: Bayes, dotted: content-blind."""
    plt, fig, axes = _figure(1, width=5.5)
    ax = axes[0]
    labels = list(points)
    xs = [points[k]["flops"] for k in labels]
    families = list(points[labels[0]]["families"])
    for i, family in enumerate(families):
        color = f"C{i}"
        ax.plot(xs, [points[k]["families"][family]["accuracy"] for k in labels], marker="o", color=color, label=family)
        last = points[labels[-1]]["families"][family]
        ax.axhline(last["bayes_accuracy"], color=color, ls="--", lw=0.7)
        ax.axhline(last["content_blind_accuracy"], color=color, ls=":", lw=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("pre-training compute of the trunk (FLOPs)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("dashed: Bayes ceiling, dotted: content-blind", fontsize=9)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


# -------------------------------------------------------------------------------------------------
# Files


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


def training_rows(run_dir: str) -> list[dict]:
    """metrics.jsonl's per-iteration lines (not the eval_* lines)."""
    return [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "score" in r and "eval_score" not in r]


def last_mean(rows: list[dict], key: str, k: int) -> tuple[float, float]:
    """Mean ± s.e. of `key` over the last k rows (each a batch mean of fresh prompts)."""
    return mean_se([r[key] for r in rows if key in r][-k:])


def moving_peak(rows: list[dict], key: str, k: int) -> tuple[float, int]:
    """(highest k-row moving mean, the iteration it ends at)."""
    values = [r[key] for r in rows if key in r]
    steps = [r["step"] for r in rows if key in r]
    if len(values) < k:
        return float("nan"), 0
    means = np.convolve(values, np.ones(k) / k, mode="valid")
    i = int(np.argmax(means))
    return float(means[i]), int(steps[i + k - 1])


def write_studies_md(workdir: str, order: list[str]) -> str:
    """DIR/studies.md from every finished study's result.json, in `order`."""
    lines = ["# The textbook's claims, measured", "",
             f"Each study: the claim, then what was measured. Verdicts: {RULE} (`experiments.report.verdict`).", ""]
    for study in order:
        path = os.path.join(workdir, study, "result.json")
        if not os.path.exists(path):
            lines += [f"## {study}", "", "Not run yet.", ""]
            continue
        with open(path) as f:
            r = json.load(f)
        lines += [f"## {r['title']}", "", f"**Claim.** {r['claim']}", "", f"**Measured.** {r['measured']}", "",
                  f"![{study}]({r['plot']})", ""]
    out = os.path.join(workdir, "studies.md")
    with open(out + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(out + ".tmp", out)
    return out


# -------------------------------------------------------------------------------------------------
# Measurements on models


def cloze_correct(model, params, tokenizer, items, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """For each `probes.ClozeItem`: (correct, copied) booleans. The model's choice is the candidate
    with the highest log-probability of " <candidate>." after [BOS] + prefix; copied: the choice is
    one of the values the context states."""
    import jax

    from jaxlm import logprobs
    rows, owners = [], []
    for i, item in enumerate(items):
        prefix = [tokenizer.bos_id] + tokenizer.encode(item.prefix)
        for cand in item.candidates:
            full = [tokenizer.bos_id] + tokenizer.encode(f"{item.prefix} {cand}.")
            start = next((j for j, (a, b) in enumerate(zip(prefix, full)) if a != b), min(len(prefix), len(full)))
            rows.append((full, start))
            owners.append(i)
    width = 16 * -(-max(len(r[0]) for r in rows) // 16)
    fn = jax.jit(lambda p, t, pos, seg, m: logprobs.sequence_log_probs(model, p, t, pos, seg, m))
    scores = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_size - n)
        tokens = np.zeros((batch_size, width), np.int32)
        seg, pos, mask = np.zeros_like(tokens), np.zeros_like(tokens), np.zeros_like(tokens)
        for j, (ids, start) in enumerate(chunk):
            tokens[j, :len(ids)], seg[j, :len(ids)], pos[j, :len(ids)] = ids, 1, np.arange(len(ids))
            mask[j, start:len(ids)] = 1
        scores.extend(np.asarray(fn(params, tokens, pos, seg, mask))[:n].tolist())
    correct, copied = np.zeros(len(items), bool), np.zeros(len(items), bool)
    k = 0
    for i, item in enumerate(items):
        choice = item.candidates[int(np.argmax(scores[k:k + len(item.candidates)]))]
        correct[i], copied[i] = choice == item.answer, choice in item.in_context
        k += len(item.candidates)
    return correct, copied


# -------------------------------------------------------------------------------------------------
# The runner


@dataclasses.dataclass
class Section:
    title: str
    claim: str
    measured: str
    verdict: str
    plot: str  # relative to DIR
    figures: dict


class Studies:
    def __init__(self, cfg, workdir: str, pipeline_dir: str | None):
        self.cfg, self.dir = cfg, os.path.abspath(workdir)
        self.pipeline_given = bool(pipeline_dir)
        self.pipeline_dir = os.path.abspath(pipeline_dir) if pipeline_dir else self.path("pipeline")
        self.order = [s.strip() for s in cfg.studies.split(",") if s.strip()]
        unknown = [s for s in self.order if s not in STUDIES]
        if unknown:
            raise app.UsageError(f"--config.studies: unknown study(s) {unknown}; known: {', '.join(STUDIES)}")
        self._loaded: dict[str, Any] = {}

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def pipe(self, *parts: str) -> str:
        return os.path.join(self.pipeline_dir, *parts)

    # --- subprocesses -------------------------------------------------------------------------

    def child_env(self) -> dict[str, str]:
        """As the pipeline's: with cpu_devices > 1 the host CPU is split into that many devices."""
        env = dict(os.environ)
        n = self.cfg.get("cpu_devices", 0)
        if n and n > 1 and "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
        return env

    def _call(self, cmd: list[str], what: str):
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        result = subprocess.run(cmd, cwd=ROOT, env=self.child_env())
        if result.returncode != 0:
            raise RuntimeError(f"{what} failed (exit code {result.returncode}); rerun the same studies command to "
                               "resume it")

    def ensure_pipeline(self):
        if self.pipeline_given and not os.path.isdir(self.pipeline_dir):
            raise app.UsageError(f"--pipeline_dir={self.pipeline_dir}: no such directory")
        if not self.pipeline_given:
            stages = ",".join(NEEDED_STAGES)
            self._call([sys.executable, "-m", "experiments.pipeline", f"--workdir={self.pipeline_dir}",
                        f"--config={os.path.join(ROOT, self.cfg.pipeline.config)}", f"--config.stages={stages}",
                        *shlex.split(self.cfg.pipeline.flags)], "the pipeline")

    def check_stages(self, study: str):
        missing = [s for s in STUDY_NEEDS[study] if not os.path.exists(self.pipe(s, "DONE"))]
        missing += [s for s in STUDY_CONFIGS.get(study, ()) if not os.path.exists(self.pipe(s, "config.json"))]
        if missing:
            raise RuntimeError(f"study {study} starts from the pipeline's stage(s) {missing}, not finished (no DONE) "
                               f"or not started (no config.json) in {self.pipeline_dir}; run them with "
                               "experiments.pipeline, then rerun")

    def run(self, name: str, stage: str, *run_flags: str, extra: str = "") -> str:
        """DIR/runs/<name>/<stage>: the pipeline's `stage` run again with `run_flags`; skipped when DONE."""
        out = self.path("runs", name, stage)
        if os.path.exists(os.path.join(out, "DONE")):
            return out
        t0 = time.perf_counter()
        config = f"--config={FROM_RUN}:{self.pipe(stage, 'config.json')}"
        self._call([sys.executable, "-m", f"experiments.{stage}", config,
                    f"--workdir={out}", *run_flags, *shlex.split(extra)], f"run {name} ({stage})")
        write_json(os.path.join(out, "DONE"), {"seconds": time.perf_counter() - t0,
                                               "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        return out

    # --- loading and evaluating models (in this process) ---------------------------------------

    def load(self, run_dir: str):
        if run_dir not in self._loaded:
            from jaxlm import init_source
            self._loaded[run_dir] = init_source.load_for_inference(run_dir)
        return self._loaded[run_dir]

    def policy_eval(self, name: str, run_dir: str) -> dict:
        """{summary, records} of a policy on the pipeline's held-out prompts (jaxlm.eval.evaluate_policy:
        greedy and `eval.num_samples` sampled answers, KL to the pipeline's SFT model, its reward
        model's score); cached in DIR/evals/<name>.json."""
        cache = self.path("evals", f"{name}.json")
        if os.path.exists(cache):
            with open(cache) as f:
                return json.load(f)
        import jax

        from jaxlm import checkpoint, eval as eval_lib
        from jaxlm.data.tinyworld import judge
        from jaxlm.model import ModelConfig
        from jaxlm.reward_model import ScalarHeadModel
        e = self.cfg.eval
        prompts = read_jsonl(self.pipe("data", "eval_prompts.jsonl"))
        prompts = prompts[: e.max_prompts] if e.max_prompts else prompts
        ref_model, ref_params, _ = self.load(self.pipe("sft"))
        if "reward" not in self._loaded:
            rm_params, rm_meta = checkpoint.load_params(self.pipe("reward"))
            self._loaded["reward"] = (ScalarHeadModel(ModelConfig(**rm_meta["model"])), rm_params)
        model, params, tokenizer = self.load(run_dir)
        print(f"evaluating {name} ({run_dir}) on {len(prompts)} held-out prompts ...", flush=True)
        result = eval_lib.evaluate_policy(
            model, params, tokenizer, [p["prompt"] for p in prompts], families=[p["family"] for p in prompts],
            judge=judge.score, reference=(ref_model, ref_params), reward=self._loaded["reward"],
            max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, rng=jax.random.PRNGKey(0),
            num_samples=e.num_samples)
        out = {"summary": result.summary,
               "records": [{k: r[k] for k in ("prompt", "family", "gold", "gold_sampled", "response") if k in r}
                           for r in result.records]}
        write_json(cache, out)
        self._loaded.pop(run_dir, None)  # Policies are evaluated once; keep memory flat.
        return out

    def gold_difference(self, a: dict, b: dict) -> tuple[float, float]:
        """Paired difference of the sampled gold score, a − b, over the same prompts."""
        from experiments.report import paired_difference
        return paired_difference(a["records"], b["records"], "gold_sampled") or (float("nan"), float("nan"))

    def stage_flops(self, run_dir: str) -> float:
        """Training FLOPs of a finished run, counted as the report's comparison table counts them."""
        from experiments import comparison
        from jaxlm import init_source
        from jaxlm.model import ModelConfig
        cfg = ModelConfig(**init_source.load_meta(run_dir)["model"])
        facts = comparison.stage_facts(os.path.dirname(run_dir), os.path.basename(run_dir), cfg, {})
        return float(facts["flops"]) if facts else float("nan")

    # --- the studies ----------------------------------------------------------------------------

    def ppo_runs(self) -> dict[str, str]:
        """The KL study's PPO runs, which the DPO study compares against: {label: run dir}."""
        c = self.cfg.kl
        kl = read_json(self.pipe("ppo", "config.json")).get("kl", {})
        pipeline_label = (f"adaptive β (target {kl.get('target')})" if kl.get("adaptive")
                          else f"β = {kl.get('init_coef')} (pipeline)")
        return {
            "β = 0": self.run("ppo_beta0", "ppo", *NO_EVAL, "--config.kl.adaptive=False", "--config.kl.init_coef=0.0",
                              extra=c.flags),
            f"β = {c.fixed_beta:g}": self.run("ppo_beta_fixed", "ppo", *NO_EVAL, "--config.kl.adaptive=False",
                                              f"--config.kl.init_coef={c.fixed_beta}", extra=c.flags),
            pipeline_label: self.pipe("ppo"),
        }

    def study_kl(self) -> Section:
        runs = self.ppo_runs()
        labels = dict(zip(("free", "fixed", "adaptive"), runs))
        k = self.cfg.last
        series = {label: training_rows(d) for label, d in runs.items()}
        evals = {label: self.policy_eval(os.path.basename(os.path.dirname(d)) if d != self.pipe("ppo") else
                                         "pipeline_ppo", d) for label, d in runs.items()}
        free = series[labels["free"]]
        m = {"iterations": len(free), "last": k, "prompts": len(evals[labels["free"]]["records"]),
             "labels": labels, "kl": {label: last_mean(rows, "kl_k1", k) for label, rows in series.items()},
             "gold_vs_free": {label: self.gold_difference(evals[label], evals[labels["free"]])
                              for label in runs if label != labels["free"]},
             "kl_eval": {label: e["summary"].get("kl_to_reference") for label, e in evals.items()},
             "peak": moving_peak(free, "gold_score", k), "final": last_mean(free, "gold_score", k)}
        plot = plot_series(self.path("plots", "kl.png"), series,
                           [("score", "reward-model score (proxy)"), ("gold_score", "gold score"),
                            ("kl_k1", "KL to SFT (nats)")],
                           scatter=("kl_k1", "gold_score", "KL to SFT (nats)", "gold score against KL"))
        return Section("The KL penalty keeps the policy close", *kl_sentences(m), plot, m)

    def study_clip(self) -> Section:
        c = self.cfg.clip
        common = [*NO_EVAL, f"--config.policy_optim.learning_rate={c.learning_rate}"]
        labels = {"on": "clip ε = 0.2", "off": f"no clipping (ε = {c.off_eps:g})"}
        runs = {labels["on"]: self.run("ppo_clip_on", "ppo", *common, "--config.ppo.clip_eps=0.2", extra=c.flags),
                labels["off"]: self.run("ppo_clip_off", "ppo", *common, f"--config.ppo.clip_eps={c.off_eps}",
                                        extra=c.flags)}
        k = self.cfg.last
        series = {label: training_rows(d) for label, d in runs.items()}
        evals = {label: self.policy_eval(os.path.basename(os.path.dirname(d)), d) for label, d in runs.items()}
        m = {"learning_rate": c.learning_rate, "iterations": len(series[labels["on"]]), "last": k,
             "prompts": len(evals[labels["on"]]["records"]), "labels": labels,
             "score": {label: last_mean(rows, "score", k) for label, rows in series.items()},
             "kl": {label: last_mean(rows, "kl_k1", k) for label, rows in series.items()},
             "clip_fraction": mean_se([r["clip_fraction"] for r in series[labels["on"]] if "clip_fraction" in r]),
             "gold_on_minus_off": self.gold_difference(evals[labels["on"]], evals[labels["off"]])}
        plot = plot_series(self.path("plots", "clip.png"), series,
                           [("score", "reward-model score (proxy)"), ("gold_score", "gold score"),
                            ("kl_k1", "KL to SFT (nats)"), ("clip_fraction", "clipped share of tokens")])
        return Section("PPO's clipping keeps updates small", *clip_sentences(m), plot, m)

    def study_dpo(self) -> Section:
        c = self.cfg.dpo
        betas = [float(b) for b in str(c.betas).split(",") if b.strip()]
        if c.main_beta not in betas:
            raise app.UsageError(f"--config.dpo.main_beta={c.main_beta} must be one of --config.dpo.betas={c.betas}")
        dpo_runs = {f"DPO β = {b:g}": self.run(f"dpo_beta{b:g}", "dpo", f"--config.loss.beta={b}",
                                              f"--config.data.dir={self.pipe('preferences')}",
                                              "--config.eval.judge=False", "--config.eval.every=0", extra=c.flags)
                    for b in betas}
        ppo_runs = {f"PPO {label}": d for label, d in self.ppo_runs().items()}
        sft = self.policy_eval("sft", self.pipe("sft"))
        points = {}
        for label, d in {**dpo_runs, **ppo_runs}.items():
            name = "pipeline_ppo" if d == self.pipe("ppo") else os.path.basename(os.path.dirname(d))
            e = self.policy_eval(name, d)
            points[label] = {"kind": "dpo" if label.startswith("DPO") else "ppo", "kl": e["summary"]["kl_to_reference"],
                             "gold": self.gold_difference(e, sft), "flops": self.stage_flops(d), "eval": name}
        main = {"dpo": f"DPO β = {c.main_beta:g}", "ppo": list(ppo_runs)[-1]}
        m = {"prompts": len(sft["records"]), "main": main, "points": points,
             "dpo_minus_ppo": self.gold_difference(self.policy_eval(points[main["dpo"]]["eval"], dpo_runs[main["dpo"]]),
                                                   self.policy_eval("pipeline_ppo", self.pipe("ppo")))}
        plot = plot_frontier(self.path("plots", "dpo.png"), points)
        return Section("DPO replaces the RL loop", *dpo_sentences(m), plot, m)

    def facts_data(self) -> dict:
        """DIR/facts/data: the filtered corpus (as many documents as the pipeline's) and SFT data (the
        pipeline's demonstrations plus the fact questions); the split in split.json."""
        from jaxlm.data.tinyworld import corpus, probes, world as W
        out = self.path("facts", "data")
        summary = read_json(self.pipe("data", "summary.json"))
        seed = summary.get("seed", 0)
        split = probes.FactSplit.make(W.World.generate(seed), seed)
        if not os.path.exists(os.path.join(out, "split.json")):
            for name in ("train", "valid"):
                n = sum(1 for _ in open(self.pipe("data", f"corpus_{name}.jsonl")))
                corpus.write_jsonl(os.path.join(out, f"corpus_{name}.jsonl"),
                                   ({"text": d} for d in probes.filtered_corpus(split, n, seed, stream=name)))
            sft = read_jsonl(self.pipe("data", "sft_train.jsonl")) + split.sft_records(self.cfg.facts.repeats)
            import random
            random.Random(seed).shuffle(sft)
            corpus.write_jsonl(os.path.join(out, "sft_train.jsonl"), sft)
            write_json(os.path.join(out, "split.json"), {"groups": split.groups, "seed": seed})
        return {"dir": out, "split": split}

    def study_facts(self) -> Section:
        from jaxlm import eval as eval_lib
        from jaxlm.data.tinyworld import probes
        c = self.cfg.facts
        data = self.facts_data()
        base = self.run("facts", "pretrain", f"--config.data.train_files={data['dir']}/corpus_train.jsonl",
                        f"--config.data.valid_files={data['dir']}/corpus_valid.jsonl",
                        f"--config.data.tokenizer={self.pipe('tokenizer', 'tokenizer.model')}", extra=c.pretrain_flags)
        sft = self.run("facts", "sft", f"--config.init_from={base}",
                       f"--config.data.train_files={data['dir']}/sft_train.jsonl",
                       f"--config.data.valid_files={self.pipe('data', 'sft_valid.jsonl')}",
                       "--config.eval.judge=False", extra=c.sft_flags)
        split = data["split"]
        model, params, tokenizer = self.load(sft)
        recall = {}
        for group, phrasing, key in (("pretrain", 1, "pretrain/new"), ("pretrain", 0, "pretrain/sft form"),
                                     ("sft", 1, "sft/new"), ("sft", 0, "sft/trained"),
                                     ("both", 1, "both/new (trained)"), ("both", 0, "both/sft form (trained)")):
            facts = split.facts(group)
            result = eval_lib.evaluate_policy(model, params, tokenizer, [f.question(phrasing) for f in facts],
                                              num_samples=0, max_new_tokens=24, batch_size=self.cfg.eval.batch_size)
            hits = [probes.recalled(r["response"], f) for r, f in zip(result.records, facts)]
            recall[key] = (*mean_se(hits), len(hits))
        base_model, base_params, base_tok = self.load(base)
        base_recall = {}
        for group in probes.GROUPS:
            correct, _ = cloze_correct(base_model, base_params, base_tok, probes.fact_cloze_items(split.facts(group)))
            base_recall[group] = mean_se(correct)
        facts_all = [f for g in probes.GROUPS for f in split.facts(g)]
        chance = float(np.mean([1.0 / len(f.pool) for f in facts_all]))
        m = {"recall": recall, "base": base_recall, "chance": chance,
             "difference": unpaired_from(recall["pretrain/new"][:2], recall["sft/new"][:2]),
             "groups": split.groups}
        bars = {f"after SFT: {k}": v[:2] for k, v in recall.items()}
        bars.update({f"base cloze: {g}": v for g, v in base_recall.items()})
        plot = plot_bars(self.path("plots", "facts.png"), bars, chance,
                         "recall of facts by where they were seen (group/question)")
        return Section("Fine-tuning does not teach new facts", *facts_sentences(m), plot, m)

    def pretrain_run(self, size: str, steps: int | str) -> dict:
        """One of the scale study's pre-training runs, {label, dir, size, steps, name}: the pipeline's
        pretraining config with `scale.sizes[size]`'s flags, for `steps` ("pipeline": the pipeline's).
        The pipeline's own size at its own steps is the pipeline's run."""
        c = self.cfg.scale
        if size not in c.sizes:
            raise app.UsageError(f"model size {size!r} is not in --config.scale.sizes ({', '.join(c.sizes)})")
        pipeline_steps = read_json(self.pipe("pretrain", "config.json"))["train"]["steps"]
        steps = pipeline_steps if steps == "pipeline" else int(steps)
        name = f"pretrain_{size}_{steps}"
        if not c.sizes[size] and steps == pipeline_steps:
            d, name = self.pipe("pretrain"), "pipeline_pretrain"
        else:
            every = min(steps, 200)
            d = self.run(name, "pretrain", f"--config.train.steps={steps}", f"--config.train.checkpoint_every={every}",
                         f"--config.train.eval_every={every}",
                         f"--config.optim.warmup_steps={min(50, max(1, steps // 5))}",
                         extra=f"{c.sizes[size]} {c.flags}")
        return {"label": f"{size}, {steps} steps", "dir": d, "size": size, "steps": steps, "name": name}

    def pretrain_runs(self) -> list[dict]:
        """Every size × every budget of the scale study."""
        return [self.pretrain_run(size, s.strip()) for size in self.cfg.scale.sizes
                for s in str(self.cfg.scale.steps).split(",") if s.strip()]

    def study_scale(self) -> Section:
        from jaxlm.data.tinyworld import probes, world as W
        seed = read_json(self.pipe("data", "summary.json")).get("seed", 0)
        items = probes.context_cloze_items(W.World.generate(seed), self.cfg.scale.num_items, seed)
        points = {}
        for r in self.pretrain_runs():
            label = r["label"]
            model, params, tokenizer = self.load(r["dir"])
            correct, copied = cloze_correct(model, params, tokenizer, items)
            self._loaded.pop(r["dir"], None)
            points[label] = {"size": r["size"], "steps": r["steps"], "flops": self.stage_flops(r["dir"]),
                             "accuracy": mean_se(correct), "copied": float(np.mean(copied)),
                             "correct": correct.astype(int).tolist()}
        points = dict(sorted(points.items(), key=lambda kv: kv[1]["flops"]))
        labels = list(points)
        chance = float(np.mean([1.0 / len(i.candidates) for i in items]))
        copy = float(np.mean([1.0 / len(i.in_context) for i in items]))
        hi, lo = points[labels[-1]]["correct"], points[labels[0]]["correct"]
        m = {"items": len(items), "points": points, "chance": chance, "copy": copy,
             "blind_copy": float(np.mean([len(i.in_context) / len(i.candidates) for i in items])),
             "rise": paired(hi, lo), "above_copy": paired(hi, [1.0 / len(i.in_context) for i in items])}
        plot = plot_scale(self.path("plots", "scale.png"), points, chance, copy)
        for pt in points.values():
            pt.pop("correct")
        return Section("In-context learning appears with scale", *scale_sentences(m), plot, m)

    def study_reward(self) -> Section:
        from tools.reward_breakdown import family_accuracy, score_responses
        from jaxlm import checkpoint
        from jaxlm.data.tokenizer import Tokenizer
        from jaxlm.model import ModelConfig
        from jaxlm.reward_model import ScalarHeadModel
        c = self.cfg.reward
        specs = [s.strip().split(":") for s in c.inits.split(";") if s.strip()]
        if any(len(spec) != 2 for spec in specs):
            raise app.UsageError(f"--config.reward.inits={c.inits!r}: expected 'size:steps;size:steps;...'")
        pairs = read_jsonl(self.pipe("preferences", "preferences_valid.jsonl"))
        points = {}
        for size, steps in specs:
            init = self.pretrain_run(size, steps)
            label = init["label"]
            d = self.run(f"reward_from_{init['name']}", "reward", f"--config.init_from={init['dir']}",
                         "--config.normalize.on=data", extra=c.flags)
            params, meta = checkpoint.load_params(d)
            rm, tokenizer = ScalarHeadModel(ModelConfig(**meta["model"])), Tokenizer.load(meta["tokenizer"])
            chosen = score_responses(rm, params, tokenizer, [(r["prompt"], r["chosen"]) for r in pairs], 64)
            rejected = score_responses(rm, params, tokenizer, [(r["prompt"], r["rejected"]) for r in pairs], 64)
            points[label] = {"flops": self.stage_flops(init["dir"]),
                             "families": family_accuracy(pairs, chosen, rejected),
                             "right": (chosen > rejected).astype(int).tolist()}
        points = dict(sorted(points.items(), key=lambda kv: kv[1]["flops"]))
        labels = list(points)
        m = {"pairs": len(pairs), "points": points,
             "rise": paired(points[labels[-1]]["right"], points[labels[0]]["right"])}
        plot = plot_reward(self.path("plots", "reward.png"), points)
        for pt in points.values():
            pt.pop("right")
        return Section("The reward model learns what raters can tell apart", *reward_sentences(m), plot, m)

    # --- driving --------------------------------------------------------------------------------

    def run_all(self) -> list[str]:
        """Every study in order; a failed study is reported and the next one runs. Returns the failed ones."""
        os.makedirs(self.dir, exist_ok=True)
        self.ensure_pipeline()
        failed = []
        for i, study in enumerate(self.order, 1):
            header = f"[{i}/{len(self.order)}] study {study}"
            done = self.path(study, "DONE")
            if os.path.exists(done):
                print(f"{header}: done earlier, skipped", flush=True)
                continue
            print(f"\n{'=' * 80}\n{header}\n{'=' * 80}", flush=True)
            t0 = time.perf_counter()
            try:
                self.check_stages(study)
            except RuntimeError as e:
                print(f"{header}: not started: {e}", flush=True)
                failed.append(study)
                continue
            try:
                section = getattr(self, f"study_{study}")()
            except Exception:  # noqa: BLE001  One study's failure must not cost the others' results.
                traceback.print_exc()
                failed.append(study)
                continue
            section.plot = os.path.relpath(section.plot, self.dir)
            write_json(self.path(study, "result.json"), dataclasses.asdict(section))
            write_json(done, {"seconds": time.perf_counter() - t0, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
            write_studies_md(self.dir, list(dict.fromkeys([*self.order, *STUDIES])))
            print(f"{header}: {section.verdict} ({time.perf_counter() - t0:.0f}s)\n  {section.measured}", flush=True)
        out = write_studies_md(self.dir, list(dict.fromkeys([*self.order, *STUDIES])))
        print(f"\nStudies written to {out}" + (f"; failed: {failed} (rerun to retry)" if failed else ""), flush=True)
        return failed


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    failed = Studies(_CONFIG.value, _WORKDIR.value, _PIPELINE_DIR.value).run_all()
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    app.run(main)
