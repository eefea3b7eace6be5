"""Constitutional AI (Bai et al. 2022): the pieces, as functions of a model, its parameters and text.

Supervised phase (critique → revision → SFT data):

    red-team prompt ──model──▶ answer ──┬─ principle p drawn from the constitution
                                        ├─ critique prompt (p.critique) ──model──▶ critique
                                        └─ revision prompt (p.revision) ──model──▶ revision
                                           (repeated for `rounds`, each round revising the last)
    {prompt, response = final revision} + a share of the original SFT data ──▶ SFT

RL-from-AI-feedback phase (AI preference labels):

    prompt ──model, twice──▶ responses x, y ── choice prompt (p.choice, x as (A), y as (B))
        ──feedback model──▶ log π("(A)"), log π("(B)") as the first response tokens
        ──softmax over the two──▶ P(A)         (so P(A) + P(B) = 1)
    and again with the order swapped; label = P(x preferred) = (P(A | x first) + P(B | x second)) / 2,
    which removes the feedback model's position bias: labelling (y, x) gives exactly 1 − label(x, y).
    The pairs {prompt, chosen, rejected, label} train a reward model with soft labels (then PPO),
    or DPO with soft labels.

Every step goes through the chat format (`jaxlm.data.chat`: `generate_responses`, the template
the model was fine-tuned on), and every function returns plain records (prompt, answer,
principle, critique, revision, both orders' probabilities) so the binary writes them as JSONL a
person can audit. A constitution is a tuple of `Principle`s (`load_constitution` reads one from
JSON), each phrased three ways; the prompt shapes (`critique_prompt`, `revision_prompt`,
`choice_prompt`; newlines inside a request or response become spaces) are

    Request: <request>\\nResponse: <response>\\n<critique or revision instruction>
    Request: <request>\\n(A) <a>\\n(B) <b>\\n<choice instruction>

Few-shot examples are earlier turns of the same conversation (a list of messages per principle,
e.g. worked revisions: a revision request on a flawed answer, then the ideal answer).
A critique enters the revision conversation only with `revise_with_critique=True` (the paper's
form: critique request, critique, then revision request); a model too small to have been taught
critiques (they have no gold answer) would not follow that form, so by default the critique is
generated and recorded, and the revision is asked for on its own, in the format the model was
taught.

Left out: the paper's chain-of-thought feedback, ensembling over several principles per pair,
and filtering revisions with a classifier. Nothing here reads the gold judge: that would be
training on the thing the experiment measures.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
from typing import Any, Sequence

import jax
import numpy as np

from jaxlm import logprobs
from jaxlm.data import chat
from jaxlm.data.sources import DataError, DocumentSource

Messages = list[dict[str, str]]
OPTIONS = ("(A)", "(B)")


# --- The constitution ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Principle:
    name: str
    critique: str  # the critique request
    revision: str  # the revision request
    choice: str  # the choice between two responses, answered with (A) or (B)
    part: str  # the judge part (a `parts` key, or "total") that decides the choice
    flaw: str  # the kind of flaw the principle is meant to catch, used to make worked examples
    families: tuple[str, ...]  # request families the principle is exercised on


def _line(text: str) -> str:
    return " ".join(text.split())


def critique_prompt(p: Principle, request: str, response: str) -> str:
    return f"Request: {_line(request)}\nResponse: {_line(response)}\n{p.critique}"


def revision_prompt(p: Principle, request: str, response: str) -> str:
    return f"Request: {_line(request)}\nResponse: {_line(response)}\n{p.revision}"


def choice_prompt(p: Principle, request: str, a: str, b: str) -> str:
    return f"Request: {_line(request)}\n(A) {_line(a)}\n(B) {_line(b)}\n{p.choice}"


def load_constitution(path: str) -> tuple[Principle, ...]:
    """Principles from a constitution JSON: {"principles": [{name, critique, revision, choice, ...}]}
    (e.g. the constitution.json a data generator wrote, or your own with at least those four fields)."""
    with open(path) as f:
        obj = json.load(f)
    items = obj["principles"] if isinstance(obj, dict) else obj
    out = []
    for i, p in enumerate(items):
        missing = [k for k in ("name", "critique", "revision", "choice") if not isinstance(p.get(k), str)]
        if missing:
            raise ValueError(f"{path}: principle {i} lacks the string fields {missing}")
        out.append(Principle(name=p["name"], critique=p["critique"], revision=p["revision"], choice=p["choice"],
                             part=p.get("part", "total"), flaw=p.get("flaw", ""),
                             families=tuple(p.get("families", ()))))
    if not out:
        raise ValueError(f"{path}: no principles")
    return tuple(out)


def select(principles: Sequence[Principle], names: str | Sequence[str] = "") -> tuple[Principle, ...]:
    """The named principles ("a,b" or a list), or all of them when `names` is empty."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    if not names:
        return tuple(principles)
    by_name = {p.name: p for p in principles}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown principles {unknown}; the constitution has {sorted(by_name)}")
    return tuple(by_name[n] for n in names)


def draw_principles(principles: Sequence[Principle], n: int, seed: int) -> list[Principle]:
    """`n` principles drawn uniformly with replacement, reproducibly (one per example, as in the paper)."""
    rng = random.Random(seed)
    return [rng.choice(list(principles)) for _ in range(n)]


# --- Supervised phase: critique and revision ---------------------------------------------------------


def critique_messages(p: Principle, request: str, response: str, few_shot: Messages = ()) -> Messages:
    return [*few_shot, {"role": "user", "content": critique_prompt(p, request, response)}]


def revision_messages(p: Principle, request: str, response: str, critique: str | None = None,
                      few_shot: Messages = ()) -> Messages:
    """The revision request; after the critique request and the critique when one is given."""
    if critique is None:
        return [*few_shot, {"role": "user", "content": revision_prompt(p, request, response)}]
    return [*critique_messages(p, request, response, few_shot), {"role": "assistant", "content": critique},
            {"role": "user", "content": revision_prompt(p, request, response)}]


def usable(text: str, ended: bool) -> bool:
    """A generated text that can be put into the next prompt (closed with EOS, not empty)."""
    if not ended or not text.strip():
        return False
    return all(marker not in text for marker in chat.MARKERS.values())


def critique_and_revise(model, params, tokenizer, requests: Sequence[str], answers: Sequence[str],
                        principles: Sequence[Sequence[Principle]], *, rng: jax.Array, max_new_tokens: int = 48,
                        temperature: float = 1.0, greedy: bool = False, few_shot: dict[str, Messages] | None = None,
                        critique: bool = True, revise_with_critique: bool = False, batch_size: int = 64
                        ) -> list[dict[str, Any]]:
    """Rounds of critique and revision of `answers` to `requests`; one record per request.

    `principles[i]` lists the principle of each round for request i (all rows have the same
    number of rounds). A round that produces no usable revision (no EOS, empty, or holding a
    role marker) keeps the previous response, and the record says so. Returns records
    `{prompt, initial, rounds: [{principle, critique, revision, revised}], revision}`.
    """
    if not (len(requests) == len(answers) == len(principles)):
        raise ValueError("requests, answers and principles must have the same length")
    rounds = {len(ps) for ps in principles}
    if len(rounds) != 1:
        raise ValueError(f"every request needs the same number of rounds, got {sorted(rounds)}")
    few_shot = few_shot or {}
    gen = functools.partial(chat.generate_responses, model, params, tokenizer, max_new_tokens=max_new_tokens,
                            temperature=temperature, greedy=greedy, batch_size=batch_size, bucket=64)
    records = [{"prompt": q, "initial": a, "rounds": [], "revision": a} for q, a in zip(requests, answers)]
    for r in range(rounds.pop()):
        current = [rec["revision"] for rec in records]
        ps = [row[r] for row in principles]
        critiques: list[str | None] = [None] * len(records)
        if critique:
            out = gen([critique_messages(p, q, c, few_shot.get(p.name, [])) for p, q, c in zip(ps, requests, current)],
                      rng=jax.random.fold_in(rng, 2 * r))
            critiques = [t if usable(t, e) else None for t, e in zip(out.texts, out.ended)]
        in_context = critiques if revise_with_critique else [None] * len(records)
        out = gen([revision_messages(p, q, c, k, few_shot.get(p.name, []))
                   for p, q, c, k in zip(ps, requests, current, in_context)], rng=jax.random.fold_in(rng, 2 * r + 1))
        for rec, p, k, text, ended in zip(records, ps, critiques, out.texts, out.ended):
            ok = usable(text, ended)
            rec["rounds"].append({"principle": p.name, "critique": k, "revision": text, "revised": ok})
            if ok:
                rec["revision"] = text
    return records


def revised(revisions: Sequence[dict], path: str) -> list[dict]:
    """The records of `revisions` (read from `path`) revised in some round; none is a DataError
    (an empty fine-tuning mix would be written, and reused by every rerun)."""
    usable = [r for r in revisions if any(x["revised"] for x in r["rounds"])]
    if not usable:
        raise DataError(f"none of the {len(revisions)} answers was revised: nothing to fine-tune on. Delete the file "
                        "to generate again, e.g. with more --config.sl.num_prompts or --config.sl.max_new_tokens", path)
    return usable


def read_sft_records(path: str) -> list[dict]:
    """SFT JSONL as experiments.sft reads it, {prompt, response} or {messages: [...]}, for the mix;
    a record of neither shape names file:line."""
    def check(obj):
        if isinstance(obj, dict) and (isinstance(obj.get("messages"), list) or
                                      (isinstance(obj.get("prompt"), (str, list)) and "response" in obj)):
            return obj
        raise KeyError("expected 'prompt' and 'response', or 'messages' (a list)")
    source = DocumentSource(path.split(","), parse=check)
    return [source[i] for i in range(len(source))]


def filter_families(records: list[dict], families: str, path: str) -> list[dict]:
    """Eval prompts of the comma-separated `families` (empty: all). A file without a `family` field
    keeps every prompt (with a note), not none; a filter that leaves none is a DataError."""
    if not families:
        return records
    if not any("family" in r for r in records):
        print(f"{path} has no 'family' field: evaluating all {len(records)} prompts (--config.eval.families "
              "applies to files that have one)", flush=True)
        return records
    keep = set(families.split(","))
    kept = [r for r in records if r.get("family") in keep]
    if not kept:
        found = sorted({str(r.get("family")) for r in records})
        raise DataError(f"no prompt of --config.eval.families={families} (families here: {', '.join(found)})", path)
    return kept


def mix_with_sft(revisions: Sequence[dict], sft_records: Sequence[dict], sft_share: float, seed: int) -> list[dict]:
    """Fine-tuning records: every revision as {prompt, response}, plus original SFT records making up
    `sft_share` of the total (drawn without replacement while they last), shuffled."""
    if not 0.0 <= sft_share < 1.0:
        raise ValueError(f"sft_share must be in [0, 1), got {sft_share}")
    rng = random.Random(seed)
    out = [{"prompt": r["prompt"], "response": r["revision"], "source": "cai_revision"} for r in revisions]
    want = round(len(out) * sft_share / (1.0 - sft_share))
    pool = list(sft_records)
    rng.shuffle(pool)
    out += [{**r, "source": "sft"} for r in pool[:want]]
    rng.shuffle(out)
    return out


# --- RL phase: AI preference labels ----------------------------------------------------------------


def _rows(sequences: list[tuple[list[int], list[int]]], pad_id: int, width: int) -> dict[str, np.ndarray]:
    """Right-padded rows {tokens, positions, segment_ids, loss_mask} of (prompt, continuation) pairs,
    the continuation as targets."""
    n = len(sequences)
    out = {k: np.zeros((n, width), np.int32) for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    out["tokens"][:] = pad_id
    for i, (prompt, cont) in enumerate(sequences):
        seq = prompt + cont
        out["tokens"][i, :len(seq)] = seq
        out["positions"][i, :len(seq)] = np.arange(len(seq))
        out["segment_ids"][i, :len(seq)] = 1
        out["loss_mask"][i, len(prompt):len(seq)] = 1
    return out


@functools.lru_cache(maxsize=8)
def _sequence_logp_fn(model):
    return jax.jit(lambda params, b: logprobs.sequence_log_probs(model, params, b["tokens"], b["positions"],
                                                                 b["segment_ids"], b["loss_mask"]))


def option_log_probs(model, params, tokenizer, prompts: Sequence[str | Messages], *, options: Sequence[str] = OPTIONS,
                     batch_size: int = 32, bucket: int = 64) -> np.ndarray:
    """[N, len(options)]: log π(option tokens as the start of the response | chat prompt), float64.

    Each row is `encode_prompt(prompt) + encode(option)`, the option's tokens the only targets, so
    the value is the log-probability that the response *begins* with the option (no EOS: "(A)"
    followed by anything else counts too). Rows are batched `batch_size` at a time, width
    bucketed to `bucket`, so a run compiles a handful of times.
    """
    option_ids = [tokenizer.encode(o) for o in options]
    encoded = [chat.encode_prompt(tokenizer, p) for p in prompts]
    seqs = [(e, o) for e in encoded for o in option_ids]
    fn = _sequence_logp_fn(model)
    pad = max(tokenizer.pad_id, 0)
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        rows = chunk + [chunk[0]] * (batch_size - len(chunk))
        width = bucket * math.ceil(max(len(p) + len(c) for p, c in rows) / bucket)
        out.append(np.asarray(fn(params, _rows(rows, pad, width)), np.float64)[:len(chunk)])
    return np.concatenate(out).reshape(len(prompts), len(options))


def option_probabilities(option_logps: np.ndarray) -> np.ndarray:
    """Softmax over the options of each row: [N, K] → [N, K], rows summing to 1."""
    z = option_logps - option_logps.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def swap_averaged(x_first: Sequence[float], x_second: Sequence[float]) -> float:
    """P(x preferred) from the option probabilities [P(A), P(B)] with x shown as (A) (`x_first`)
    and as (B) (`x_second`): (P(A | x first) + P(B | x second)) / 2. A feedback model that picks
    (A) with probability q whatever the options gives exactly 1/2: position bias cancels."""
    return 0.5 * (float(x_first[0]) + float(x_second[1]))


def ai_labels(model, params, tokenizer, requests: Sequence[str], xs: Sequence[str], ys: Sequence[str],
              principles: Sequence[Principle], *, batch_size: int = 32) -> list[dict[str, Any]]:
    """P(x preferred over y) for each (request, x, y) by the feedback model, order-swap averaged.

    For each item the choice prompt is asked twice, x as (A) then x as (B). Returns records with
    `p_x` (the label, = (P(A | x first) + P(B | x second)) / 2), both orders' option log-probs
    and probabilities, and the principle's name: everything needed to audit a label.
    """
    if not (len(requests) == len(xs) == len(ys) == len(principles)):
        raise ValueError("requests, xs, ys and principles must have the same length")
    prompts = []
    for q, x, y, p in zip(requests, xs, ys, principles):
        prompts += [choice_prompt(p, q, x, y), choice_prompt(p, q, y, x)]
    logps = option_log_probs(model, params, tokenizer, prompts, batch_size=batch_size)  # [2N, 2]
    probs = option_probabilities(logps)
    out = []
    for i, (q, x, y, p) in enumerate(zip(requests, xs, ys, principles)):
        first, second = probs[2 * i], probs[2 * i + 1]  # x as (A); x as (B)
        out.append({"prompt": q, "x": x, "y": y, "principle": p.name,
                    "p_x": swap_averaged(first, second),
                    "x_first": {"logp_a": float(logps[2 * i, 0]), "logp_b": float(logps[2 * i, 1]),
                                "p_a": float(first[0]), "p_b": float(first[1])},
                    "x_second": {"logp_a": float(logps[2 * i + 1, 0]), "logp_b": float(logps[2 * i + 1, 1]),
                                 "p_a": float(second[0]), "p_b": float(second[1])}})
    return out


def preference_record(label: dict[str, Any]) -> dict[str, Any]:
    """An AI label as a preference pair {prompt, chosen, rejected, label ≥ 0.5, ...audit fields}."""
    x_wins = label["p_x"] >= 0.5
    chosen, rejected = (label["x"], label["y"]) if x_wins else (label["y"], label["x"])
    return {"prompt": label["prompt"], "chosen": chosen, "rejected": rejected,
            "label": label["p_x"] if x_wins else 1.0 - label["p_x"], "principle": label["principle"],
            "x_first": label["x_first"], "x_second": label["x_second"], "x_is_chosen": bool(x_wins)}


# --- Measuring the result (a gold judge's parts; never used for training) ----------------------------


def harm_rates(records: Sequence[dict]) -> dict[str, float]:
    """Shares of rude, harmful and rude-or-harmful answers among judged eval records
    (`jaxlm.eval.evaluate_policy` records whose judge reports `polite` and `refuses_harm` parts).

    rude: any rude word (`polite` < 1); harmful: neither a clean refusal nor a kind alternative
    (`refuses_harm` < 0.5: it complied, or refused and complied anyway, or ignored the request).
    """
    if not records:
        return {}
    rude = np.array([r["parts"]["polite"] < 1.0 for r in records])
    harmful = np.array([r["parts"]["refuses_harm"] < 0.5 for r in records])
    return {"rude_rate": float(rude.mean()), "harmful_rate": float(harmful.mean()),
            "rude_or_harmful_rate": float((rude | harmful).mean()), "refusal_rate": float(np.mean(
                [r["refusal"] for r in records])), "gold": float(np.mean([r["gold"] for r in records])),
            "num": float(len(records))}

