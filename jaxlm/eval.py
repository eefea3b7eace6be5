"""Evaluation of a policy on held-out prompts: judge scores, reward-model scores, KL to a
reference, answer length and refusal rates — the numbers in every stage's report row.

Two kinds of answers are drawn per prompt, because they answer different questions:
- a **greedy** answer: what the model says when asked; the judge, the reward model,
  lengths and refusal rates are measured on it (deterministic, so stages compare fairly);
- `num_samples` **sampled** answers (temperature 1), the distribution RLHF optimises: PPO and
  DPO maximise E_{y~π}[r(y)] − β KL(π‖π_ref), an expectation under π's own samples, which the
  greedy answer does not see (a policy can move probability from wrong to right answers
  without changing its mode). On them: `gold_sampled` (the judge's mean over all samples,
  and per family) and, with a reference, KL(π‖π_ref) = the mean of
  Σ_t log π(y_t) − log π_ref(y_t).

The caller brings the judge: `judge(prompt, response) -> result with .total and .parts` (the
"gold" score, e.g. a toy world's programmatic judge) and `is_refusal(text) -> bool`. Without a
judge there are no gold fields (`gold`, `parts`, `gold_sampled`), without `is_refusal` no refusal
fields; nothing here trains on either.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import logprobs, sampling
from jaxlm.data import chat


@dataclasses.dataclass
class PolicyEval:
    summary: dict[str, float]  # means over prompts (and per family: "gold/<family>")
    records: list[dict[str, Any]]  # one per prompt: prompt, family, response, gold, parts, ...


@functools.lru_cache(maxsize=32)
def _sequence_logp_fn(model):
    def fn(params, batch):
        return logprobs.sequence_log_probs(model, params, batch["tokens"], batch["positions"], batch["segment_ids"],
                                           batch["loss_mask"])
    return jax.jit(fn)


@functools.lru_cache(maxsize=32)
def _score_fn(reward_model):
    return jax.jit(lambda params, b: reward_model.score(params, b["tokens"], b["positions"], b["segment_ids"]))


def _layout(prompt_tokens, prompt_lengths, response_tokens, response_mask) -> dict[str, jax.Array]:
    """`sampling.prompt_response_layout` with the response as the targets (`loss_mask`, full width)."""
    batch = sampling.prompt_response_layout(prompt_tokens, prompt_lengths, response_tokens, response_mask)
    real = batch.pop("response_mask").astype(jnp.int32)
    batch["loss_mask"] = jnp.concatenate([jnp.zeros_like(batch["segment_ids"][:, :-real.shape[1]]), real], axis=1)
    return batch


def _batches(encoded: list[list[int]], batch_size: int, pad_id: int, bucket: int):
    """Fixed-size left-padded batches (the last filled with copies of its first row)."""
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        rows = chunk + [chunk[0]] * (batch_size - len(chunk))
        tokens, lengths = sampling.prompts_to_batch(rows, pad_id, bucket)
        yield start, len(chunk), tokens, lengths


def evaluate_policy(model, params, tokenizer, prompts: Sequence[str], *, families: Sequence[str] | None = None,
                    judge: Callable | None = None, is_refusal: Callable[[str], bool] | None = None,
                    reference: tuple[Any, Any] | None = None, reward: tuple[Any, Any] | None = None,
                    max_new_tokens: int = 48, batch_size: int = 64, rng: jax.Array | None = None,
                    bucket: int = 16, num_samples: int = 1) -> PolicyEval:
    """Answer every prompt greedily and `num_samples` times at temperature 1; score the answers.

    judge: `judge(prompt, response) -> result with .total (float) and .parts (dict of floats)`,
    the gold score of each answer; None: no gold fields.
    is_refusal: `is_refusal(text) -> bool`; None: no refusal fields.
    reference: (Model, params) of the policy to measure KL against (e.g. the SFT model);
    reward: (ScalarHeadModel, params) of a reward model to report its mean score.
    num_samples: sampled answers per prompt (0: greedy only, and no KL).
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    families = list(families) if families is not None else ["all"] * len(prompts)
    encoded = [chat.encode_prompt(tokenizer, p) for p in prompts]
    records: list[dict[str, Any]] = [{} for _ in prompts]
    kl_values: list[float] = []
    sampled_gold: list[list[float]] = [[] for _ in prompts]
    seq_logp = _sequence_logp_fn(model)
    for i, (start, n, tokens, lengths) in enumerate(_batches(encoded, batch_size, tokenizer.pad_id, bucket)):
        common = dict(max_new_tokens=max_new_tokens, eos_id=chat.stop_ids(tokenizer), pad_id=tokenizer.pad_id)
        greedy = sampling.generate(model, params, tokens, lengths, rng=None, greedy=True, **common)
        if reward is not None:
            batch = _layout(tokens, lengths, greedy.tokens, greedy.mask)
            reward_scores = np.asarray(_score_fn(reward[0])(reward[1], batch))
        for j in range(num_samples):
            key = jax.random.fold_in(rng, i) if j == 0 else jax.random.fold_in(jax.random.fold_in(rng, i), j)
            sampled = sampling.generate(model, params, tokens, lengths, rng=key, temperature=1.0, **common)
            if reference is not None:
                batch = _layout(tokens, lengths, sampled.tokens, sampled.mask)
                kl = np.asarray(seq_logp(params, batch) - _sequence_logp_fn(reference[0])(reference[1], batch))
                kl_values.extend(float(x) for x in kl[:n])
            if judge is None:
                continue
            s_tokens, s_lengths = jax.device_get((sampled.tokens, sampled.lengths))
            for row in range(n):
                text = chat.decode_response(tokenizer, [int(t) for t in s_tokens[row, :int(s_lengths[row])]])
                sampled_gold[start + row].append(float(judge(prompts[start + row], text).total))
        out_tokens, out_lengths, out_ended = jax.device_get((greedy.tokens, greedy.lengths, greedy.ended))
        for row in range(n):
            ids = [int(t) for t in out_tokens[row, :int(out_lengths[row])]]
            text = chat.decode_response(tokenizer, ids)
            result = judge(prompts[start + row], text) if judge is not None else None
            records[start + row] = {
                "prompt": prompts[start + row], "family": families[start + row], "response": text,
                **({"gold": float(result.total), "parts": {k: float(v) for k, v in result.parts.items()}}
                   if result is not None else {}),
                **({"refusal": bool(is_refusal(text))} if is_refusal is not None else {}),
                "length": len(ids), "ended": bool(out_ended[row]),
                **({"reward": float(reward_scores[row])} if reward is not None else {}),
            }
    for record, golds in zip(records, sampled_gold):
        if golds:
            record["gold_sampled"] = float(np.mean(golds))
    summary = summarize(records, kl_values)
    summary["samples_per_prompt"] = float(num_samples)
    return PolicyEval(summary=summary, records=records)


def summarize(records: list[dict[str, Any]], kl_values: Sequence[float] = ()) -> dict[str, float]:
    """Means over records, per judge part and per family; refusal rates on harmful/harmless prompts.

    Judge fields (`gold`, `parts`, `gold_sampled`) and `refusal` are summarised where the records
    have them (`evaluate_policy` without a judge or `is_refusal` leaves them out)."""
    judged = [r for r in records if "gold" in r]
    summary: dict[str, float] = {
        **({"gold": float(np.mean([r["gold"] for r in judged]))} if judged else {}),
        "length": float(np.mean([r["length"] for r in records])),
        "ended": float(np.mean([r["ended"] for r in records])),
        "num_prompts": float(len(records)),
    }
    parts = defaultdict(list)
    by_family = defaultdict(list)
    sampled_by_family = defaultdict(list)
    refusals = defaultdict(list)
    for r in records:
        for k, v in r.get("parts", {}).items():
            parts[k].append(v)
        if "gold" in r:
            by_family[r["family"]].append(r["gold"])
        if "refusal" in r:
            refusals[r["family"]].append(r["refusal"])
        if "gold_sampled" in r:
            sampled_by_family[r["family"]].append(r["gold_sampled"])
    summary.update({f"part/{k}": float(np.mean(v)) for k, v in sorted(parts.items())})
    summary.update({f"gold/{k}": float(np.mean(v)) for k, v in sorted(by_family.items())})
    if sampled_by_family:
        summary["gold_sampled"] = float(np.mean([r["gold_sampled"] for r in records if "gold_sampled" in r]))
        summary.update({f"gold_sampled/{k}": float(np.mean(v)) for k, v in sorted(sampled_by_family.items())})
    for family in ("harmful", "harmless"):
        if family in refusals:
            summary[f"refusal_rate/{family}"] = float(np.mean(refusals[family]))
    if records and "reward" in records[0]:
        summary["reward"] = float(np.mean([r["reward"] for r in records]))
    if len(kl_values):
        summary["kl_to_reference"] = float(np.mean(kl_values))
    return summary
